"""Helpers shared by the benchmarks: peak memory, machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def emit(result: dict[str, Any]) -> None:
    """Print the result as one JSON line and keep a copy in bench/out/<name>.json."""
    OUT.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=None, sort_keys=False)
    (OUT / f"{result['benchmark']}.json").write_text(text + "\n")
    sys.stdout.write(text + "\n")


# ------------------------------------------------------------------ shared by the suite

ROOT = Path(__file__).resolve().parents[1]


def load_average() -> dict[str, float]:
    """1/5/15-minute load averages: how busy the machine was (other work skews timings)."""
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def parse_json_output(text: str) -> dict[str, Any]:
    """The JSON object a benchmark printed: the whole output, else the last JSON line."""
    text = text.strip()
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            return value
    except json.JSONDecodeError:
        pass
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        candidate = lines[i] if lines[i].startswith("{") else None
        if candidate is None:
            continue
        for chunk in (candidate, "\n".join(lines[i:])):
            try:
                value = json.loads(chunk)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError(f"no JSON object in the output: {text[-300:]!r}")


def run_measured(
    argv: list[str],
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    cwd: Path | None = None,
    sample_every: float | None = None,
) -> dict[str, Any]:
    """Run a command; return rc, wall seconds, its stdout/stderr and its peak RSS.

    Peak RSS comes from ``wait4`` on that child (``ru_maxrss``: the largest of the child
    and the descendants it waited for), so it is this command's figure alone. With
    ``sample_every`` (seconds), ``rss_samples`` holds ``(t, MiB)`` of the child over time.
    """
    import signal
    import subprocess
    import tempfile
    import time

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=err, env=full_env, cwd=cwd or ROOT, start_new_session=True
        )
        deadline = None if timeout is None else t0 + timeout
        timed_out = False
        samples: list[tuple[float, float]] = []
        next_sample = t0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            now = time.perf_counter()
            if sample_every and now >= next_sample:
                samples.append((round(now - t0, 2), round(_rss_mib(proc.pid), 1)))
                next_sample = now + sample_every
            if deadline is not None and time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                timed_out = True
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    return {
        "rc": proc.returncode,
        "timed_out": timed_out,
        "wall_s": wall,
        "peak_rss_mib": usage.ru_maxrss / 1024.0,
        "rss_samples": samples,
        "stdout": stdout,
        "stderr": stderr,
    }


def _rss_mib(pid: int) -> float:
    """Current RSS of a process (MiB), 0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def run_child(
    module: str,
    args: list[str],
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python -m module *args`` (a benchmark's child mode) and return its JSON,
    with ``child_peak_rss_mib`` and ``child_wall_s`` measured from outside."""
    res = run_measured([sys.executable, "-m", module, *args], timeout=timeout, env=env)
    if res["rc"] != 0:
        raise RuntimeError(
            f"{module} {' '.join(args)} failed (rc {res['rc']}):\n{res['stderr'][-3000:]}"
        )
    data = parse_json_output(res["stdout"])
    data["child_peak_rss_mib"] = round(res["peak_rss_mib"], 1)
    data["child_wall_s"] = round(res["wall_s"], 2)
    return data


def write_image_store(
    url: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    seed: int = 0,
    slab: int | None = None,
) -> None:
    """A uint16 ZYX OME-Zarr image made slab by slab (never the whole volume in memory):
    smooth bright blobs drifting through z over Poisson-like noise, with global statistics
    stored as the ingest step would store them."""
    import numpy as np
    import zarr

    from tasks.ngff import Multiscale, compressors, image_ome
    from unet_core.normalize import StatsAccumulator

    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    blobs = np.zeros((ny, nx), np.float32)
    for _ in range(max(8, ny * nx // 8192)):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        r = rng.uniform(3, 12)
        box = (
            slice(max(0, int(cy - 4 * r)), int(cy + 4 * r)),
            slice(max(0, int(cx - 4 * r)), int(cx + 4 * r)),
        )
        blobs[box] += rng.uniform(800, 3000) * np.exp(
            -((yy[box] - cy) ** 2 + (xx[box] - cx) ** 2) / (2 * r * r)
        )
    noise = [rng.integers(80, 120, size=(ny, nx), dtype=np.uint16) for _ in range(5)]
    root = zarr.open_group(url, mode="w")
    arr = root.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        dtype="uint16",
        fill_value=0,
        compressors=compressors(),
        dimension_names=["z", "y", "x"],
    )
    acc = StatsAccumulator(np.uint16)
    step = slab or chunks[0]
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        part = np.empty((z1 - z0, ny, nx), np.uint16)
        for z in range(z0, z1):
            plane = np.roll(blobs, (3 * z, 2 * z), axis=(0, 1)) * (0.8 + 0.2 * np.cos(z / 9.0))
            part[z - z0] = np.minimum(plane + noise[z % len(noise)], 65535).astype(np.uint16)
        arr[z0:z1] = part
        acc.add(part)
    root.attrs.update(
        {
            "ome": image_ome(Multiscale.build("zyx", [1.0, 1.0, 1.0])),
            "segflow": {"stats": acc.result().model_dump()},
        }
    )


def open_array(url: str, path: str, mode: str = "r") -> Any:
    """The zarr array at ``path`` inside the group at ``url`` (a clear error otherwise)."""
    import zarr

    node = zarr.open_group(url, mode=mode)[path]  # type: ignore[arg-type]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{url}/{path} is not a zarr array")
    return node
