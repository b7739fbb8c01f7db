"""Memory flatness: peak RSS of ``segflow segment`` for volumes of 1x, 4x and 8x a base size.

    python -m bench.memory [--base 64,512,512] [--factors 1,4,8] [--limit-volume 512,1024,1024]
                           [--limit-mib 900]

Each volume (uint16, written slab by slab into an OME-Zarr store) is segmented by the
``segflow segment`` command in its own process with a tiny network (2D, depth 1, 2 base
channels: the engine's memory, not the network's, is what is measured), CLI defaults
otherwise (the default mode: tile lattice, oneDNN; batch 4; in-process Dask cluster). Peak
RSS is the command's ``ru_maxrss`` from ``wait4``. Target: RSS(8x) <= 1.2 x RSS(1x). The
smallest and largest are run again with ``SEGFLOW_MALLOC_TUNING=0`` (glibc's default
allocator settings): segflow's tuning keeps freed buffers in the heap for reuse (2x faster
CPU forward passes), so its peak RSS is higher and varies by a few hundred MiB from run to
run, with where the freed buffers happen to sit in the heap.

Then one run under a memory limit smaller than the volume (default: a 1 GiB volume under
900 MiB), to show that it completes. How the limit is enforced: ``RLIMIT_DATA``
(``prlimit --data``), which on Linux >= 4.7 caps all private writable mappings (heap,
anonymous mmaps, thread stacks), i.e. every byte of anonymous memory the process could make
resident. The benchmark first checks that the limit bites (a volume-sized allocation under
it must fail). ``RLIMIT_AS`` is also tried and recorded: it counts reserved address space,
which PyTorch and the Dask threads reserve far beyond what they use, so it kills the run at
any useful limit. A cgroup would be the exact tool, but there is no systemd here and the
cgroup v1 memory hierarchy belongs to the sandbox that runs this machine. The limited run
uses ``--batch-size 1`` and ``MALLOC_ARENA_MAX=2`` (fewer glibc arenas): settings a user
would pick on a small machine, stated in the output.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.common import OUT, emit, load_average, parse_json_output, run_measured

WORK = OUT / "memory"
CHUNKS = (8, 256, 256)


def _segflow() -> str:
    exe = Path(sys.executable).with_name("segflow")
    return str(exe)


def segment_cli(
    src: str,
    ckpt: str,
    out: str,
    extra: list[str] | None = None,
    prefix: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> dict:
    argv = [*(prefix or []), _segflow(), "segment", src, "--model", ckpt, "--out", out, "--json"]
    res = run_measured(argv + (extra or []), env=env, timeout=3600, sample_every=0.5)
    samples = [m for _, m in res["rss_samples"] if m > 0]
    summary = None
    if res["rc"] == 0:
        summary = parse_json_output(res["stdout"])
    return {
        "rc": res["rc"],
        "wall_s": round(res["wall_s"], 2),
        "peak_rss_mib": round(res["peak_rss_mib"], 1),
        "rss_p50_mib": round(float(np.percentile(samples, 50)), 1) if samples else None,
        "rss_p95_mib": round(float(np.percentile(samples, 95)), 1) if samples else None,
        "rss_timeline": res["rss_samples"][:: max(1, len(res["rss_samples"]) // 120)],
        "segment_s": summary["seconds"] if summary else None,
        "voxels_per_s": summary["voxels_per_second"] if summary else None,
        "blocks": summary["blocks_total"] if summary else None,
        "error": None if res["rc"] == 0 else _last_error(res["stderr"]),
    }


def _last_error(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("INFO")]
    return lines[-1][:300] if lines else ""


def limit_bites(limit_bytes: int, flag: str, nbytes: int) -> bool:
    """Does a ``prlimit --<flag>`` of ``limit_bytes`` stop an allocation of ``nbytes``?"""
    code = (
        "import numpy as np\n"
        f"try:\n    np.ones({nbytes}, np.uint8)\n"
        "except MemoryError:\n    raise SystemExit(3)\n"
    )
    res = run_measured(["prlimit", f"--{flag}={limit_bytes}", sys.executable, "-c", code])
    return res["rc"] == 3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="64,512,512", help="1x volume (z,y,x), uint16")
    parser.add_argument("--factors", default="1,4,8", help="multiples of the base (along z)")
    parser.add_argument("--limit-volume", default="512,1024,1024", help="volume for the limit run")
    parser.add_argument(
        "--limit-mib", type=int, default=900, help="memory limit (MiB); 0 skips that run"
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--untuned",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the smallest and largest with glibc's default allocator settings",
    )
    args = parser.parse_args(argv)

    import torch

    from bench.common import write_image_store
    from unet_core import UNet, UNetConfig, save_checkpoint

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    config = UNetConfig(ndim=2, depth=1, base_channels=2)
    torch.manual_seed(0)
    ckpt = str(WORK / "tiny.ckpt")
    save_checkpoint(ckpt, UNet(config))
    base = tuple(int(s) for s in args.base.split(","))

    def measure(f: int, tag: str, env: dict[str, str] | None = None) -> dict:
        """Write the f-times volume, segment it with the CLI, report the run."""
        shape = (base[0] * f, *base[1:])
        src = str(WORK / f"{tag}{f}.ome.zarr")
        write_image_store(src, shape, CHUNKS, seed=f)
        run = segment_cli(src, ckpt, str(WORK / f"{tag}{f}-out.zarr"), env=env)
        run.update({"factor": f, "shape": list(shape), "volume_mib": _mib(shape)})
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(WORK / f"{tag}{f}-out.zarr", ignore_errors=True)
        return run

    runs = [measure(int(s), "x") for s in args.factors.split(",")]
    rss = {r["factor"]: r["peak_rss_mib"] for r in runs}
    lo, hi = min(rss), max(rss)
    ratio = round(rss[hi] / rss[lo], 3)
    p95 = {r["factor"]: r["rss_p95_mib"] for r in runs}
    ratio_p95 = round(p95[hi] / p95[lo], 3) if p95[hi] and p95[lo] else None

    # The smallest and largest again with glibc's default allocator settings: segflow's
    # tuning (unet_core._malloc) keeps freed buffers for reuse, which moves peak RSS.
    untuned_runs = []
    if args.untuned:
        for f in (lo, hi):
            run = measure(f, "u", env={"SEGFLOW_MALLOC_TUNING": "0"})
            run.pop("rss_timeline", None)
            untuned_runs.append(run)
    untuned = (
        {
            "env": {"SEGFLOW_MALLOC_TUNING": "0"},
            "runs": untuned_runs,
            "rss_ratio_largest_to_smallest": round(
                untuned_runs[1]["peak_rss_mib"] / untuned_runs[0]["peak_rss_mib"], 3
            ),
        }
        if untuned_runs
        else {"skipped": "--no-untuned"}
    )

    if args.limit_mib <= 0:
        limited: dict = {"skipped": "--limit-mib 0"}
    elif shutil.which("prlimit") is None:
        limited = {"skipped": "no prlimit command on this machine (util-linux)"}
    else:
        limited = limit_run(args, ckpt)
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)
    emit(
        {
            "benchmark": "memory",
            "model": config.model_dump(include={"ndim", "depth", "base_channels", "padding"}),
            "chunks": list(CHUNKS),
            "runs": runs,
            "rss_ratio_largest_to_smallest": ratio,
            "rss_p95_ratio_largest_to_smallest": ratio_p95,
            "factors": [lo, hi],
            "target_ratio": 1.2,
            "target_met": ratio <= 1.2,
            "untuned_allocator": untuned,
            "memory_limit_run": limited,
            "notes": (
                "peak RSS of the `segflow segment` process (ru_maxrss via wait4), imports "
                "and the in-process Dask cluster included; rss_p50/p95 are percentiles of "
                "its RSS sampled every 0.5 s (steady state), rss_timeline the samples"
            ),
            "load_average_after": load_average(),
        }
    )


def limit_run(args: argparse.Namespace, ckpt: str) -> dict:
    """One run under a memory limit smaller than the volume."""
    from bench.common import write_image_store

    lshape = tuple(int(s) for s in args.limit_volume.split(","))
    limit = args.limit_mib * 2**20
    src = str(WORK / "limit.ome.zarr")
    write_image_store(src, lshape, CHUNKS, seed=99)
    nbytes = int(np.prod(lshape)) * 2
    limited: dict = {
        "volume_shape": list(lshape),
        "volume_mib": _mib(lshape),
        "limit_mib": args.limit_mib,
        "limit_smaller_than_volume": limit < nbytes,
        "options": ["--batch-size", "1"],
        "env": {"MALLOC_ARENA_MAX": "2"},
        "attempts": {},
    }
    as_run = segment_cli(
        src,
        ckpt,
        str(WORK / "limit-as.zarr"),
        ["--batch-size", "1"],
        prefix=["prlimit", f"--as={limit}"],
        env={"MALLOC_ARENA_MAX": "2"},
    )
    limited["attempts"]["RLIMIT_AS (prlimit --as)"] = {
        "completed": as_run["rc"] == 0,
        "error": as_run["error"],
    }
    enforced = limit_bites(limit, "data", nbytes)
    data_run = segment_cli(
        src,
        ckpt,
        str(WORK / "limit-out.zarr"),
        ["--batch-size", "1"],
        prefix=["prlimit", f"--data={limit}"],
        env={"MALLOC_ARENA_MAX": "2"},
    )
    limited["attempts"]["RLIMIT_DATA (prlimit --data)"] = {
        "enforced": enforced,
        "completed": data_run["rc"] == 0,
        **data_run,
    }
    limited["completed"] = data_run["rc"] == 0 and enforced
    limited["method"] = "RLIMIT_DATA (prlimit --data)"
    return limited


def _mib(shape: tuple[int, ...]) -> float:
    return round(int(np.prod(shape)) * 2 / 2**20, 1)


if __name__ == "__main__":
    main(sys.argv[1:])
