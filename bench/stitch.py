"""Stitch: instance labels chunk by chunk vs ``scipy.ndimage.label`` on the whole volume.

    python -m bench.stitch [--sizes 512,2048] [--chunks 64,128,128] [--blobs-per-mvox 1000]

For each size (MiB of the uint32 instance output; 512 MiB = 134M voxels) a semantic mask is
written straight into an OME-Zarr store (``labels/semantic/0``, uint8, slab by slab, never
the whole volume in memory): many small balls (radius 1-3) and some rods, scattered so that
plenty cross chunk faces. Then each path runs in its own subprocess:

- ``segflow``: ``tasks.instances.stitch(store, client=...)`` on an in-process LocalCluster
  (``tasks.segment.dask_client()``), writing ``labels/instances/0`` (object table computed,
  files not written);
- ``inmemory``: read the whole mask, ``scipy.ndimage.label`` (same 6-connectivity), write
  the uint32 labels to a zarr array with the same chunks.

Chunks default to 64×128×128 (the ingest default). Reported per size: seconds, peak RSS
(the child's ``ru_maxrss``, imports included; ``rss_after_imports_mib`` is the floor before
any work: segflow's child also imports Dask's distributed for its in-process cluster), their
ratios and the
object counts (which must be equal). For the first size a third process checks that the two
partitions are identical (one-to-one ids, chunk by chunk). Default sizes are 512 MiB (the
issue's minimum) and 2 GiB, to show how each path grows. Target: segflow's peak RSS <= 1/4
of the in-memory path's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import numpy as np

from bench.common import OUT, emit, load_average, open_array, peak_rss_mib, run_child

WORK = OUT / "stitch"


def _ball(r: int) -> np.ndarray:
    g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1].reshape(3, -1).T
    return g[(g**2).sum(axis=1) <= r * r].astype(np.int64)


def _shapes(rng: np.random.Generator, shape: tuple[int, ...], n_blobs: int):
    """(centres, offsets) groups: balls of radius 1-3 and axis-aligned rods."""
    groups = []
    radii = rng.choice([1, 2, 3], size=n_blobs, p=[0.5, 0.4, 0.1])
    for r in (1, 2, 3):
        k = int((radii == r).sum())
        centres = (rng.random((k, 3)) * np.asarray(shape)).astype(np.int64)
        groups.append((centres, _ball(r)))
    n_rods = max(1, n_blobs // 200)
    for axis in range(3):
        for length in (24, 96, 320):
            k = max(1, n_rods // 9)
            centres = (rng.random((k, 3)) * np.asarray(shape)).astype(np.int64)
            off = np.zeros((length, 3), np.int64)
            off[:, axis] = np.arange(length) - length // 2
            groups.append((centres, off))
    return groups


def write_mask_store(url: str, shape: tuple[int, ...], chunks: tuple[int, ...], n_blobs: int):
    """The semantic mask (1 = foreground) as labels/semantic/0, written slab by slab."""
    import zarr

    from tasks.ngff import Multiscale, add_label, compressors, label_ome

    rng = np.random.default_rng(42)
    groups = _shapes(rng, shape, n_blobs)
    root = zarr.open_group(url, mode="w")
    labels = root.create_group("labels")
    add_label(labels, "semantic")
    group = labels.create_group("semantic")
    ms = Multiscale.build("zyx", [1.0, 1.0, 1.0], name="semantic")
    group.attrs["ome"] = label_ome(ms, {"image": "../../"})
    arr = group.create_array(
        "0",
        shape=shape,
        chunks=chunks,
        dtype="uint8",
        fill_value=0,
        compressors=compressors(),
        dimension_names=["z", "y", "x"],
    )
    lim = np.asarray(shape)
    fg = 0
    for z0 in range(0, shape[0], chunks[0]):
        z1 = min(z0 + chunks[0], shape[0])
        slab = np.zeros((z1 - z0, *shape[1:]), np.uint8)
        for centres, off in groups:
            reach = int(np.abs(off[:, 0]).max())
            sel = centres[(centres[:, 0] + reach >= z0) & (centres[:, 0] - reach < z1)]
            for start in range(0, len(sel), 20000):
                pts = (sel[start : start + 20000, None, :] + off[None]).reshape(-1, 3)
                ok = (pts >= 0).all(axis=1) & (pts < lim).all(axis=1)
                ok &= (pts[:, 0] >= z0) & (pts[:, 0] < z1)
                pts = pts[ok]
                slab[pts[:, 0] - z0, pts[:, 1], pts[:, 2]] = 1
        arr[z0:z1] = slab
        fg += int(slab.sum())
    return fg


# ------------------------------------------------------------------------ children


def child_segflow(url: str) -> dict:
    from tasks.cluster import dask_client
    from tasks.instances import stitch
    from unet_core.runtime import configure

    configure()  # as the segflow command does

    with dask_client() as client:
        baseline = peak_rss_mib()
        t0 = time.perf_counter()
        res = stitch(url, client=client, write_table=False)
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "objects": int(res.objects),
        "dtype": res.dtype,
        "rss_after_imports_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
    }


def child_inmemory(url: str) -> dict:
    import zarr
    from scipy import ndimage
    from zarr.codecs import ZstdCodec

    t0 = time.perf_counter()
    root = zarr.open_group(url, mode="r+")
    src = open_array(url, "labels/semantic/0")
    baseline = peak_rss_mib()
    mask = src[...]
    t1 = time.perf_counter()
    labels = np.empty(mask.shape, np.uint32)
    n = ndimage.label(mask, output=labels)
    t2 = time.perf_counter()
    out = root.require_group("segflow-bench").create_array(
        "inmemory",
        shape=labels.shape,
        chunks=src.chunks,
        dtype="uint32",
        fill_value=0,
        compressors=ZstdCodec(level=3),
        overwrite=True,
    )
    out[...] = labels
    t3 = time.perf_counter()
    return {
        "seconds": t3 - t0,
        "read_s": t1 - t0,
        "label_s": t2 - t1,
        "write_s": t3 - t2,
        "objects": int(n),
        "rss_after_imports_mib": baseline,
        "peak_rss_mib": peak_rss_mib(),
    }


def child_verify(url: str) -> dict:
    """Same partition? One-to-one correspondence of ids, gathered chunk by chunk."""

    from unet_core.geometry import ChunkGrid

    a = open_array(url, "segflow-bench/inmemory")
    b = open_array(url, "labels/instances/0")
    pairs: set[tuple[int, int]] = set()
    same_fg = True
    for box in ChunkGrid(a.shape, a.chunks).boxes():
        x = np.asarray(a[box.to_slices()]).reshape(-1)
        y = np.asarray(b[box.to_slices()]).reshape(-1).astype(np.uint64)
        same_fg &= bool(np.array_equal(x > 0, y > 0))
        m = x > 0
        p = np.unique(np.stack([x[m].astype(np.uint64), y[m]]), axis=1)
        pairs.update(zip(p[0].tolist(), p[1].tolist(), strict=True))
    ids_a = {p[0] for p in pairs}
    ids_b = {p[1] for p in pairs}
    return {"identical_partition": same_fg and len(ids_a) == len(pairs) == len(ids_b)}


CHILDREN = {"segflow": child_segflow, "inmemory": child_inmemory, "verify": child_verify}


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="512,2048", help="MiB of uint32 instance labels")
    parser.add_argument("--chunks", default="64,128,128")
    parser.add_argument("--blobs-per-mvox", type=float, default=1000.0)
    parser.add_argument("--keep", action="store_true", help="keep the stores in bench/out")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](args.child[1])))
        return
    chunks = tuple(int(c) for c in args.chunks.split(","))
    runs = []
    for k, mib in enumerate(int(s) for s in args.sizes.split(",")):
        voxels = mib * 2**20 // 4
        shape = _shape_for(voxels)
        url = str(WORK / f"mask-{mib}.ome.zarr")
        shutil.rmtree(url, ignore_errors=True)
        WORK.mkdir(parents=True, exist_ok=True)
        n_blobs = int(np.prod(shape) / 1e6 * args.blobs_per_mvox)
        t0 = time.perf_counter()
        fg = write_mask_store(url, shape, chunks, n_blobs)
        made = time.perf_counter() - t0
        seg = run_child("bench.stitch", ["--child", "segflow", url])
        mem = run_child("bench.stitch", ["--child", "inmemory", url])
        run = {
            "label_mib": round(int(np.prod(shape)) * 4 / 2**20, 1),
            "shape": list(shape),
            "chunks": list(chunks),
            "n_chunks": int(np.prod([-(-n // c) for n, c in zip(shape, chunks, strict=True)])),
            "blobs_drawn": n_blobs,
            "foreground_fraction": round(fg / int(np.prod(shape)), 4),
            "made_in_s": round(made, 1),
            "segflow": _rounded(seg),
            "inmemory": _rounded(mem),
            "objects_equal": seg["objects"] == mem["objects"],
            "ratio_rss_segflow_to_inmemory": round(seg["peak_rss_mib"] / mem["peak_rss_mib"], 3),
            "ratio_time_segflow_to_inmemory": round(seg["seconds"] / mem["seconds"], 3),
        }
        if k == 0:
            run["verify"] = run_child("bench.stitch", ["--child", "verify", url])
            run["verify"].pop("child_peak_rss_mib", None)
        runs.append(run)
        if not args.keep:
            shutil.rmtree(url, ignore_errors=True)
    largest = runs[-1]
    emit(
        {
            "benchmark": "stitch",
            "runs": runs,
            "objects": largest["segflow"]["objects"],
            "objects_equal": all(r["objects_equal"] for r in runs),
            "segflow_s": largest["segflow"]["seconds"],
            "inmemory_s": largest["inmemory"]["seconds"],
            "segflow_peak_rss_mib": largest["segflow"]["peak_rss_mib"],
            "inmemory_peak_rss_mib": largest["inmemory"]["peak_rss_mib"],
            "ratio_rss": largest["ratio_rss_segflow_to_inmemory"],
            "ratio_time": largest["ratio_time_segflow_to_inmemory"],
            "target_ratio_rss": 0.25,
            "target_met": largest["ratio_rss_segflow_to_inmemory"] <= 0.25,
            "notes": (
                "peak RSS = the child process's ru_maxrss, interpreter and imports included "
                "(segflow's child also imports distributed for its in-process cluster). "
                "Headline figures are for the largest size."
            ),
            "load_average_after": load_average(),
        }
    )


def _shape_for(voxels: int) -> tuple[int, int, int]:
    """A z, y, x shape of exactly ``voxels`` (a power of two) close to a cube, z smallest
    (512 MiB of uint32 -> 512^3, 2048 MiB -> 512x1024x1024)."""
    exp = int(np.log2(voxels))
    if 2**exp != voxels:
        raise SystemExit(f"--sizes must be powers of two in MiB, got {voxels * 4 / 2**20}")
    z = exp // 3
    y = (exp - z) // 2
    x = exp - z - y
    return (2**z, 2**y, 2**x)


def _rounded(d: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


if __name__ == "__main__":
    main(sys.argv[1:])
