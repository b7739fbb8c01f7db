"""Benchmark: streamed ingest vs the naive path (read the whole TIFF, write zarr once).

    .venv/bin/python bench/ingest.py [--gib 1.0] [--repeat 2] [--keep]

Makes a synthetic uint16 z-stack TIFF of at least 1 GiB under bench/out/ (git-ignored;
page by page, so making it needs little memory), then runs each path in its own
subprocess and prints one JSON object: throughput (MiB of image per second, the work only,
not the interpreter start) and peak RSS (the subprocess's ru_maxrss, imports included) of

- ``ingest``: ``tasks.ingest.ingest_volume`` with its defaults (Dask threads, two per core,
  64×128×128 chunks, zstd, global statistics),
- ``naive``: ``tifffile.imread`` of the whole file, then one ``zarr`` write with the same
  chunks and compressor (and no statistics).

The paths alternate ``--repeat`` times (the file stays in the page cache for both); the
best time and the largest peak RSS of each are reported. Targets: ingest throughput
>= 0.8x naive, at <= 1/8 of its peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PLANE = (1024, 1024)
CHUNKS = (64, 128, 128)


def make_tiff(path: Path, gib: float) -> tuple[int, int, int]:
    """A uint16 ZYX stack: smooth blobs + noise, like a fluorescence volume."""
    import tifffile

    depth = max(1, int(np.ceil(gib * 2**30 / (PLANE[0] * PLANE[1] * 2))))
    shape = (depth, *PLANE)
    if path.exists() and path.stat().st_size >= depth * PLANE[0] * PLANE[1] * 2:
        return shape
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0 : PLANE[0], 0 : PLANE[1]].astype(np.float32)
    blobs = np.zeros(PLANE, np.float32)
    for _ in range(60):
        cy, cx = rng.uniform(0, PLANE[0]), rng.uniform(0, PLANE[1])
        r = rng.uniform(10, 60)
        blobs += rng.uniform(500, 3000) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    noise = [rng.poisson(100, PLANE).astype(np.float32) for _ in range(7)]

    def planes():
        for z in range(depth):
            shifted = np.roll(blobs, (z * 3, z * 2), axis=(0, 1))
            page = 0.8 + 0.2 * np.cos(z / 20.0)
            yield (shifted * page + noise[z % len(noise)]).astype(np.uint16)

    tmp = path.with_suffix(".part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(planes(), shape=shape, dtype=np.uint16, metadata={"axes": "ZYX"})
    tmp.rename(path)
    return shape


def run_path(which: str, src: str, dst: str) -> dict[str, float]:
    """In the subprocess: do one path, report seconds and peak RSS."""
    if which == "naive":
        import tifffile
        import zarr
        from zarr.codecs import ZstdCodec

        t0 = time.perf_counter()
        data = tifffile.imread(src)
        arr = zarr.create_array(
            dst,
            shape=data.shape,
            chunks=CHUNKS,
            dtype=data.dtype,
            compressors=ZstdCodec(level=3),
            fill_value=0,
            dimension_names=list("zyx"),
        )
        arr[...] = data
        seconds = time.perf_counter() - t0
        nbytes = data.nbytes
    else:
        from tasks.ingest import ingest_volume
        from unet_core.runtime import configure

        configure()  # as the segflow command does
        t0 = time.perf_counter()
        info = ingest_volume(src, dst)
        seconds = time.perf_counter() - t0
        nbytes = int(np.prod(info.shape)) * np.dtype(info.dtype).itemsize
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"seconds": seconds, "bytes": nbytes, "peak_rss_mib": peak}


def measure(which: str, src: Path) -> dict[str, float]:
    dst = OUT / f"{which}.zarr"
    shutil.rmtree(dst, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", which, str(src), str(dst)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    shutil.rmtree(dst, ignore_errors=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="image size in GiB (>= 1)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the TIFF for the next run")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_path(*args.child)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    src = OUT / "volume.tif"
    t0 = time.perf_counter()
    shape = make_tiff(src, max(args.gib, 1.0))
    made = time.perf_counter() - t0
    runs: dict[str, list[dict[str, float]]] = {"ingest": [], "naive": []}
    for _ in range(args.repeat):
        for which in ("naive", "ingest"):
            runs[which].append(measure(which, src))
    result: dict[str, object] = {
        "volume": {
            "file": str(src.relative_to(ROOT)),
            "shape": list(shape),
            "dtype": "uint16",
            "mib": round(src.stat().st_size / 2**20, 1),
            "made_in_s": round(made, 1),
        },
        "cpus": os.cpu_count(),
        "chunks": list(CHUNKS),
        "compression": "zstd(level=3)",
    }
    summary = {}
    for which, rs in runs.items():
        best = min(r["seconds"] for r in rs)
        summary[which] = {
            "throughput_mib_s": round(rs[0]["bytes"] / 2**20 / best, 1),
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in rs), 1),
            "seconds": [round(r["seconds"], 2) for r in rs],
        }
    result.update(summary)
    tput = summary["ingest"]["throughput_mib_s"] / summary["naive"]["throughput_mib_s"]
    mem = summary["ingest"]["peak_rss_mib"] / summary["naive"]["peak_rss_mib"]
    result["ratio"] = {"throughput": round(tput, 3), "peak_rss": round(mem, 3)}
    result["targets_met"] = {"throughput>=0.8x": tput >= 0.8, "peak_rss<=1/8": mem <= 1 / 8}
    if not args.keep:
        src.unlink()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
