"""CPU settings are applied by unet_core.runtime.configure(), never by importing unet_core.

Each case runs in a fresh interpreter: the test process itself may have been configured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import gc, json, os, sys
    import numpy as np

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def kept_after_free():
        # 128 MiB touched then freed: glibc's default unmaps it at once (RSS drops back);
        # the tuned allocator keeps it in the heap for the next convolution buffer.
        gc.collect()
        before = rss_mib()
        a = np.ones(128 * 2**20, dtype=np.uint8)
        del a
        gc.collect()
        return rss_mib() - before

    before = dict(os.environ)
    import unet_core
    import unet_core.model, unet_core.predict, unet_core.training.loop  # torch and the rest
    from unet_core import _malloc
    out = {"env_unchanged": dict(os.environ) == before, "tuned_on_import": _malloc._done,
           "kept_untuned": kept_after_free()}
    if "--configure" in sys.argv:
        from unet_core.runtime import configure
        first = configure()
        second = configure()
        out.update(policy=os.environ.get("OMP_WAIT_POLICY"), tuned=first.malloc_tuned,
                   same=first == second, kept_tuned=kept_after_free(),
                   torch_loaded_before=first.torch_loaded_before)
    print(json.dumps(out))
    """
)


def _probe(*args: str, **env: str) -> dict[str, object]:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY",)}
    full = {k: v for k, v in full.items() if not k.startswith("MALLOC_")}
    full.pop("SEGFLOW_MALLOC_TUNING", None)
    full.update(PYTHONPATH=str(ROOT), **env)
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=full,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the allocator tuning is for glibc on Linux",
)


@needs_glibc
def test_import_changes_nothing_and_configure_applies_the_settings():
    out = _probe("--configure")
    assert out["env_unchanged"] is True
    assert out["tuned_on_import"] is False
    assert out["kept_untuned"] < 32  # freed memory went back to the kernel
    assert out["policy"] == "PASSIVE"
    assert out["tuned"] is True
    assert out["same"] is True  # idempotent
    assert out["kept_tuned"] > 100  # now kept in the heap for reuse
    assert out["torch_loaded_before"] is True


@needs_glibc
def test_explicit_settings_win():
    out = _probe("--configure", OMP_WAIT_POLICY="ACTIVE", SEGFLOW_MALLOC_TUNING="0")
    assert out["env_unchanged"] is True
    assert out["policy"] == "ACTIVE"
    assert out["tuned"] is False
    assert out["kept_tuned"] < 32
