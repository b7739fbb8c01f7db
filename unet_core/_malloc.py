"""Keep glibc from handing large buffers back to the kernel after every convolution.

PyTorch's exact CPU convolutions (im2col + GEMM) allocate and free buffers of tens to
hundreds of MiB per layer. glibc serves allocations that large with a fresh ``mmap`` and
returns them with ``munmap`` on free, so every forward pass touches (and the kernel zeroes)
the same memory again: measured here, half of a forward pass's time went to those page
faults. Worker threads make it worse: each gets its own arena, whose heaps are too small for
such buffers, so they always go to ``mmap``.

:func:`tune` raises the mmap and trim thresholds and keeps all threads on the main heap, so
freed buffers are reused. It changes nothing on other C libraries, and
``SEGFLOW_MALLOC_TUNING=0`` turns it off. Explicit ``MALLOC_*`` environment variables win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: Bytes: allocations below this come from the heap, and up to this much free memory at the
#: top of the heap is kept for reuse instead of being returned to the kernel.
THRESHOLD = 512 * 2**20

_done = False


def tune() -> bool:
    """Apply the settings once per process; True when they are in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("SEGFLOW_MALLOC_TUNING") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    settings = {
        "MALLOC_ARENA_MAX": (_M_ARENA_MAX, 1),
        "MALLOC_MMAP_THRESHOLD_": (_M_MMAP_THRESHOLD, THRESHOLD),
        "MALLOC_TRIM_THRESHOLD_": (_M_TRIM_THRESHOLD, THRESHOLD),
    }
    for env, (param, value) in settings.items():
        if env not in os.environ:
            mallopt(ctypes.c_int(param), ctypes.c_int(value))
    _done = True
    return True
