"""Process-wide CPU settings for PyTorch, applied by the entry points, not on import.

:func:`configure` is called first thing by the ``segflow`` command, the demo, each Prefect
flow at its start, the Dask worker side before it loads its first model, and the
benchmarks. Importing :mod:`unet_core` changes nothing in the process. Library users who
want the same speed call it themselves, before importing PyTorch.

It applies two settings, both measured on the engine benchmark:

- ``OMP_WAIT_POLICY=PASSIVE`` unless already set: OpenMP threads that spin while waiting
  collapse (measured 30x slower) when they share the cores with Dask's I/O threads or other
  processes; sleeping waits cost little. The OpenMP runtime reads it when PyTorch loads, so
  it acts on a process that has not imported torch yet and on every process started from
  it later (Dask workers, flow-run subprocesses).
- glibc allocator tuning (:func:`unet_core._malloc.tune`: large convolution buffers are
  reused instead of re-faulted on every forward pass, 2x faster exact CPU inference;
  ``SEGFLOW_MALLOC_TUNING=0`` turns it off).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from unet_core import _malloc


@dataclass(frozen=True)
class RuntimeSettings:
    """What :func:`configure` left in effect."""

    omp_wait_policy: str
    malloc_tuned: bool
    torch_loaded_before: bool  # OMP_WAIT_POLICY then only reaches processes started later


def configure() -> RuntimeSettings:
    """Apply the settings; idempotent and cheap, so every entry point may call it."""
    torch_loaded = "torch" in sys.modules
    policy = os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return RuntimeSettings(
        omp_wait_policy=policy, malloc_tuned=_malloc.tune(), torch_loaded_before=torch_loaded
    )


__all__ = ["RuntimeSettings", "configure"]
