"""segflow's engine vs MONAI's sliding window and vs a naive ``dask.array.map_overlap``.

    python -m bench.peers [--shape 256,512,512] [--chunks 16,256,256] [--tile auto]
                          [--ndim 2] [--depth 2] [--base 4] [--batch-size 4] [--threads 2]
    python -m bench.peers --preset issue17     # 48×256×256, 3D, depth 2, 8 base channels

One uint16 volume (default 256×512×512, 128 MiB) in an OME-Zarr store, one checkpoint of a
``padding="same"`` U-Net (default 2D, depth 2, 4 base channels, run slice by slice along z;
``--ndim 3`` for a 3D one; MONAI's sliding window needs outputs the size of the window, so
no valid network here), one tile (default ``auto``: the tile of segflow's default mode,
from its tile lattice for this volume, e.g. 560×560 for 512×512 slices: 22 voxels of
margin each side and the origin on the network's pooling grid). Every path reads the
store, normalises with the same global statistics, computes class probabilities and writes
uint8 labels plus float32 probabilities to zarr with the same chunks and compressor. Each
runs in its own subprocess with ``torch.set_num_threads(--threads)``:

- ``reference``: ``unet_core.predict.predict(model, volume, mode="reference")``, bitwise
  the whole-volume single pass (mirror-extended at the border), run on default tiles to
  bound its memory; not timed against the others, it is what every output is compared with;
- ``segflow``: ``tasks.segment.segment_image`` (in-process LocalCluster) in its default
  mode (the tile lattice: the same bits for any chunking; oneDNN, like the peers);
- ``segflow_fast``: the same with ``--fast`` (tiles planned per block of the image's
  chunks, tiles bounded by the default tile);
- ``monai``: the whole volume in memory (2D: as a batch of slices), MONAI's
  ``sliding_window_inference`` (roi = segflow's tile, overlap 0.25, gaussian blending,
  ``sw_batch_size`` = segflow's batch size), torch defaults (oneDNN on), then softmax; run
  as its users run it, with glibc's default allocator settings
  (``SEGFLOW_MALLOC_TUNING=0``: every child calls ``unet_core.runtime.configure()`` as
  segflow's entry points do, which would otherwise apply segflow's allocator tuning, see
  ``unet_core._malloc``);
- ``monai_tuned``: the same under segflow's allocator tuning, to separate the engine from
  the allocator;
- ``naive_dask``: ``dask.array.map_overlap`` over the image chunks, depth = the network's
  context, ``boundary="reflect"``, the model run on each chunk with its halo; default
  allocator like ``monai``, and ``naive_dask_tuned`` with segflow's;
- ``plain``: ``model(slices)`` on each whole slice (3D: ``model(volume)``) with the
  network's own zero padding and torch defaults, the single pass a MONAI user would compare
  with (not timed against the others either).

Reported: wall time and peak RSS of each (the child's ``ru_maxrss``), their ratios, and the
maximum absolute difference of each path's probabilities to the reference (segflow's is
float32 rounding: its kernels are oneDNN's, the reference's PyTorch's own) and to the plain
pass, over the whole volume and away from the borders. The two
single passes differ from each other by design: segflow's mirror-extends by the tile margin
(22 voxels here), so its pooling grid starts at -22, the plain pass's at 0; for an
untrained network that alone changes probabilities by up to ~0.5. MONAI's windows sit on
the plain pass's grid (and naive Dask's chunks plus halo too), so "vs plain" isolates their
blending/halo error. Target: segflow wall <= 0.6x MONAI (as its users run it); the ratios
to the tuned peers are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import numpy as np

from bench.common import OUT, emit, load_average, machine, open_array, peak_rss_mib, run_child
from unet_core.runtime import configure

WORK = OUT / "peers"


def _zarr_out(url: str, shape: tuple[int, ...], chunks: tuple[int, ...], n_classes: int):
    """labels (uint8) and probabilities (float32, class first) arrays, zstd level 3."""
    import zarr
    from zarr.codecs import ZstdCodec

    root = zarr.open_group(url, mode="w")
    labels = root.create_array(
        "labels",
        shape=shape,
        chunks=chunks,
        dtype="uint8",
        fill_value=0,
        compressors=ZstdCodec(level=3),
    )
    probs = root.create_array(
        "probabilities",
        shape=(n_classes, *shape),
        chunks=(n_classes, *chunks),
        dtype="float32",
        fill_value=0,
        compressors=ZstdCodec(level=3),
    )
    return labels, probs


def _setup(opts: dict):
    import torch

    torch.set_num_threads(int(opts["threads"]))
    from tasks.segment import SegmentParams, plan_segmentation

    # --fast keeps the image's chunks: every path writes with those (a Dask task per chunk
    # must not share a zarr chunk with another).
    params = SegmentParams(device="cpu", mode="fast")
    return plan_segmentation(opts["src"], opts["ckpt"], None, params)


# ------------------------------------------------------------------------ children


def child_reference(opts: dict) -> dict:

    from unet_core import load_checkpoint
    from unet_core.geometry import TileSpec
    from unet_core.predict import predict

    plan = _setup(opts)
    model, _ = load_checkpoint(opts["ckpt"])
    t0 = time.perf_counter()
    volume = np.asarray(open_array(opts["src"], "0")[...])
    # The reference mode: bitwise the whole-volume pass for any tiling; default tiles bound
    # its memory (one 3D pass over the whole volume took 3 GiB here).
    probs = predict(
        model,
        volume,
        tile_shape=TileSpec(model.config, volume.ndim).default_tile_shape(),
        batch_size=int(opts["batch_size"]),
        normalization=(plan.offset, plan.scale),
        mode="reference",
    )
    labels_arr, probs_arr = _zarr_out(opts["out"], volume.shape, plan.chunks, probs.shape[0])
    probs_arr[...] = probs
    labels_arr[...] = np.argmax(probs, axis=0).astype(np.uint8)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def child_segflow(opts: dict) -> dict:
    from tasks.segment import SegmentParams, dask_client, segment_image

    _setup(opts)
    params = SegmentParams(
        device="cpu",
        tile=tuple(opts["segflow_tile"]) if opts["segflow_tile"] else None,
        batch_size=int(opts["batch_size"]),
        mode=opts["mode"],
        probabilities=True,
        probabilities_dtype="float32",
    )
    with dask_client() as client:
        t0 = time.perf_counter()
        res = segment_image(
            opts["src"], opts["ckpt"], opts["out"], params, client=client, force=True
        )
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "blocks": res.blocks_total,
        "probabilities": f"{res.probabilities_path}",
    }


def child_monai(opts: dict) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    from unet_core import load_checkpoint
    from unet_core.normalize import apply_affine

    plan = _setup(opts)
    model, _ = load_checkpoint(opts["ckpt"])
    model.eval()
    t0 = time.perf_counter()
    volume = np.asarray(open_array(opts["src"], "0")[...])
    x = torch.from_numpy(apply_affine(volume, plan.offset, plan.scale))
    x = x[:, None] if model.config.ndim == 2 else x[None, None]  # (Z,1,Y,X) or (1,1,Z,Y,X)
    del volume
    with torch.inference_mode():
        logits = sliding_window_inference(
            x,
            roi_size=tuple(opts["tile"]),
            sw_batch_size=int(opts["batch_size"]),
            predictor=model,
            overlap=0.25,
            mode="gaussian",
        )
        del x
        if not isinstance(logits, torch.Tensor):
            raise TypeError("the model returns one tensor")
        probs = torch.softmax(logits, dim=1)
        del logits
        labels = torch.argmax(probs, dim=1).to(torch.uint8).numpy()
    probs_np = probs.numpy()
    if model.config.ndim == 3:  # (1, K, Z, Y, X)
        probs_np, labels = probs_np[0], labels[0]
    else:  # (Z, K, Y, X)
        probs_np = probs_np.transpose(1, 0, 2, 3)
    labels_arr, probs_arr = _zarr_out(opts["out"], labels.shape, plan.chunks, probs_np.shape[0])
    for k in range(probs_np.shape[0]):
        probs_arr[k] = probs_np[k]
    labels_arr[...] = labels
    import monai

    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),
        "monai": monai.__version__,
    }


def child_naive(opts: dict) -> dict:
    import dask
    import dask.array as da
    import torch

    from unet_core import load_checkpoint
    from unet_core.normalize import apply_affine

    plan = _setup(opts)
    model, _ = load_checkpoint(opts["ckpt"])
    model.eval()
    depth = model.config.context
    batch = int(opts["batch_size"])
    n_classes = model.config.n_classes

    three = model.config.ndim == 3

    def run_chunk(block: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(apply_affine(block, plan.offset, plan.scale))
        inner = slice(depth, -depth)
        with torch.inference_mode():
            if three:
                probs = torch.softmax(model(x[None, None]), dim=1)[0][:, inner, inner, inner]
                return probs.contiguous().numpy()  # (K, z, y, x)
            x = x[:, None]
            out = torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
            probs = torch.softmax(out, dim=1)[:, :, inner, inner]
        return probs.permute(1, 0, 2, 3).contiguous().numpy()  # (K, z, y, x)

    t0 = time.perf_counter()
    image = da.from_zarr(open_array(opts["src"], "0"))
    probs = image.map_overlap(
        run_chunk,
        depth={0: depth if three else 0, 1: depth, 2: depth},
        boundary="reflect",
        trim=False,
        new_axis=0,
        chunks=((n_classes,), *image.chunks),
        dtype=np.float32,
    )
    labels = probs.argmax(axis=0).astype(np.uint8)
    labels_arr, probs_arr = _zarr_out(opts["out"], image.shape, plan.chunks, n_classes)
    with dask.config.set(scheduler="threads"):
        da.store([probs, labels], [probs_arr, labels_arr], lock=False)
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),
        "depth": depth,
        "dask_chunks": [int(c[0]) for c in image.chunks],
    }


def child_plain(opts: dict) -> dict:
    """``model(slices)`` on each whole slice (3D: the volume), zero padded (no mirror), torch
    defaults: the single pass a MONAI user would compare with (its grid starts at 0)."""
    import torch

    from unet_core import load_checkpoint
    from unet_core.normalize import apply_affine

    plan = _setup(opts)
    model, _ = load_checkpoint(opts["ckpt"])
    model.eval()
    t0 = time.perf_counter()
    volume = open_array(opts["src"], "0")
    batch = int(opts["batch_size"])
    n_classes = model.config.n_classes
    labels_arr, probs_arr = _zarr_out(opts["out"], volume.shape, plan.chunks, n_classes)
    step = int(plan.chunks[0])
    if model.config.ndim == 3:
        with torch.inference_mode():
            x = torch.from_numpy(apply_affine(volume[...], plan.offset, plan.scale))
            probs = torch.softmax(model(x[None, None]), dim=1)[0]
            probs_arr[...] = probs.numpy()
            labels_arr[...] = torch.argmax(probs, dim=0).to(torch.uint8).numpy()
        return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}
    with torch.inference_mode():
        for z0 in range(0, volume.shape[0], step):
            x = torch.from_numpy(apply_affine(volume[z0 : z0 + step], plan.offset, plan.scale))
            x = x[:, None]
            out = torch.cat([model(x[i : i + batch]) for i in range(0, x.shape[0], batch)])
            probs = torch.softmax(out, dim=1)
            probs_arr[:, z0 : z0 + x.shape[0]] = probs.permute(1, 0, 2, 3).numpy()
            labels_arr[z0 : z0 + x.shape[0]] = torch.argmax(probs, dim=1).to(torch.uint8).numpy()
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib()}


def child_compare(opts: dict) -> dict:
    """Max |p - p_ref| of each path against each reference, slab by slab, over the whole
    volume and away from the slice borders; and the fraction of labels that differ."""

    border = int(opts["border"])
    out: dict[str, dict] = {}
    for ref_name, ref_url in opts["references"].items():
        ref_p = open_array(ref_url, "probabilities")
        ref_l = open_array(ref_url, "labels")
        step = int(ref_p.chunks[1])
        for name, (url, ppath, lpath) in opts["paths"].items():
            p, lab = open_array(url, ppath), open_array(url, lpath)
            worst = worst_inner = 0.0
            differ = 0
            nz, zb = ref_p.shape[1], int(opts["border_z"])
            for z0 in range(0, nz, step):
                sl = slice(z0, min(z0 + step, nz))
                d = np.abs(np.asarray(p[:, sl]) - np.asarray(ref_p[:, sl]))
                worst = max(worst, float(d.max()))
                zs = slice(max(zb - z0, 0), max(min(nz - zb, sl.stop) - z0, 0))
                inner = d[:, zs, border:-border, border:-border]
                if inner.size:
                    worst_inner = max(worst_inner, float(inner.max()))
                differ += int((np.asarray(lab[sl]) != np.asarray(ref_l[sl])).sum())
            out.setdefault(name, {})[f"vs_{ref_name}"] = {
                "max_abs_diff": worst,
                "max_abs_diff_interior": worst_inner,
                "label_disagreement": round(differ / int(np.prod(ref_l.shape)), 6),
            }
    return out


CHILDREN = {
    "reference": child_reference,
    "segflow": child_segflow,
    "monai": child_monai,
    "naive": child_naive,
    "plain": child_plain,
    "compare": child_compare,
}


# ---------------------------------------------------------------------------- main


PRESETS = {
    "issue17": {"shape": "48,256,256", "chunks": "48,128,128", "ndim": 3, "base": 8},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="256,512,512")
    parser.add_argument("--chunks", default="16,256,256")
    parser.add_argument(
        "--tile", default="auto", help="tile input shape (model axes); auto: segflow's default"
    )
    parser.add_argument("--ndim", type=int, default=2, help="2: slice by slice, 3: a 3D network")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--base", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, every path")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named case")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run segflow, segflow --fast and MONAI alternately this many times (best counts)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stores in bench/out")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure()  # segflow's CPU settings, as its entry points apply them
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return
    for key, value in PRESETS.get(args.preset or "", {}).items():
        setattr(args, key, value)

    import torch

    from bench.common import write_image_store
    from tasks.segment import SegmentParams, plan_segmentation
    from unet_core import UNet, UNetConfig, save_checkpoint
    from unet_core.geometry import TileSpec

    shape = tuple(int(s) for s in args.shape.split(","))
    chunks = tuple(int(s) for s in args.chunks.split(","))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    src = str(WORK / "volume.ome.zarr")
    write_image_store(src, shape, chunks)
    torch.manual_seed(0)
    config = UNetConfig(ndim=args.ndim, depth=args.depth, base_channels=args.base, padding="same")
    ckpt = str(WORK / "model.ckpt")
    save_checkpoint(ckpt, UNet(config))
    spec = TileSpec(config, 3)
    s = spec.slice_axes
    if args.tile == "auto":
        segflow_tile = None
        tile = plan_segmentation(src, ckpt, None, SegmentParams(device="cpu")).tile
    else:
        tile = spec.valid_tile_shape((1,) * s + tuple(int(t) for t in args.tile.split(",")))
        segflow_tile = list(tile)
    margins = spec.margins_1d(s, tile[s])
    base = {
        "src": src,
        "ckpt": ckpt,
        "tile": list(tile[s:]),
        "segflow_tile": segflow_tile,
        "batch_size": args.batch_size,
        "threads": args.threads,
    }

    untuned = {"SEGFLOW_MALLOC_TUNING": "0"}

    def run(path: str, name: str, env: dict[str, str] | None = None, **extra) -> dict:
        opts = {**base, "out": str(WORK / f"{name}.zarr"), **extra}
        res = run_child("bench.peers", ["--child", path, json.dumps(opts)], env=env)
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}

    # The compared paths alternate (the machine's speed drifts); the best run of each counts.
    timed: dict[str, list[dict]] = {"segflow": [], "segflow_fast": [], "monai": []}
    for _ in range(max(1, args.repeat)):
        timed["segflow"].append(run("segflow", "segflow", mode="invariant"))
        timed["segflow_fast"].append(run("segflow", "segflow_fast", mode="fast"))
        timed["monai"].append(run("monai", "monai", env=untuned))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in timed.items()}
    for name, runs in timed.items():
        best[name]["runs_s"] = [r["seconds"] for r in runs]
    results = {
        "reference": run("reference", "reference"),
        **best,
        "monai_tuned": run("monai", "monai_tuned"),
        "naive_dask": run("naive", "naive_dask", env=untuned),
        "naive_dask_tuned": run("naive", "naive_dask_tuned"),
        "plain": run("plain", "plain"),
    }
    paths: dict[str, tuple[str, str, str]] = {
        "segflow": (str(WORK / "segflow.zarr"), "probabilities/0", "labels/semantic/0"),
        "segflow_fast": (str(WORK / "segflow_fast.zarr"), "probabilities/0", "labels/semantic/0"),
        "monai": (str(WORK / "monai.zarr"), "probabilities", "labels"),
        "naive_dask": (str(WORK / "naive_dask.zarr"), "probabilities", "labels"),
    }
    compare_opts = {
        "references": {
            "reference": str(WORK / "reference.zarr"),
            "plain": str(WORK / "plain.zarr"),
        },
        "border": margins[0],
        "border_z": margins[0] if args.ndim == 3 else 0,
        "paths": paths,
    }
    diffs = run_child("bench.peers", ["--child", "compare", json.dumps(compare_opts)])
    for name in paths:
        results[name].update(diffs[name])
        results[name]["max_abs_diff"] = diffs[name]["vs_reference"]["max_abs_diff"]
    names = ("segflow", "segflow_fast", "monai", "naive_dask", "monai_tuned", "naive_dask_tuned")
    seg, fast, mon, nai, mon_t, nai_t = (results[k] for k in names)
    ratios = {
        "segflow_wall_over_monai": round(seg["seconds"] / mon["seconds"], 3),
        "segflow_rss_over_monai": round(seg["peak_rss_mib"] / mon["peak_rss_mib"], 3),
        "segflow_fast_wall_over_monai": round(fast["seconds"] / mon["seconds"], 3),
        "segflow_fast_rss_over_monai": round(fast["peak_rss_mib"] / mon["peak_rss_mib"], 3),
        "segflow_wall_over_naive_dask": round(seg["seconds"] / nai["seconds"], 3),
        "segflow_rss_over_naive_dask": round(seg["peak_rss_mib"] / nai["peak_rss_mib"], 3),
        "segflow_fast_wall_over_naive_dask": round(fast["seconds"] / nai["seconds"], 3),
        "segflow_fast_rss_over_naive_dask": round(fast["peak_rss_mib"] / nai["peak_rss_mib"], 3),
        "segflow_wall_over_monai_tuned": round(seg["seconds"] / mon_t["seconds"], 3),
        "segflow_fast_wall_over_monai_tuned": round(fast["seconds"] / mon_t["seconds"], 3),
        "segflow_wall_over_naive_dask_tuned": round(seg["seconds"] / nai_t["seconds"], 3),
        "segflow_fast_wall_over_naive_dask_tuned": round(fast["seconds"] / nai_t["seconds"], 3),
    }
    emit(
        {
            "benchmark": "peers",
            "volume_shape": list(shape),
            "volume_mib": round(int(np.prod(shape)) * 2 / 2**20, 1),
            "chunks": list(chunks),
            "model": config.model_dump(
                include={"ndim", "depth", "base_channels", "padding", "n_classes"}
            )
            | {
                "context": config.context,
                "runs": "slice by slice along z" if args.ndim == 2 else "3D",
            },
            "tile": list(tile),
            "tile_margins": list(margins),
            "batch_size": args.batch_size,
            "torch_threads": args.threads,
            "monai_settings": {
                "roi_size": list(tile[s:]),
                "overlap": 0.25,
                "mode": "gaussian",
                "sw_batch_size": args.batch_size,
                "input": "the whole volume in memory"
                + (" as a batch of z slices" if args.ndim == 2 else ""),
            },
            "naive_dask_settings": {
                "depth": config.context,
                "boundary": "reflect",
                "chunks": list(chunks),
                "scheduler": "threads (dask default)",
            },
            "paths": results,
            "ratios": ratios,
            "segflow_mode": "invariant (default)",
            "target_wall_over_monai": 0.6,
            "target_met": ratios["segflow_wall_over_monai"] <= 0.6,
            "target_met_fast": ratios["segflow_fast_wall_over_monai"] <= 0.6,
            "notes": (
                "seconds = read the store, infer, write labels + float32 probabilities; "
                "peak RSS = the child's ru_maxrss with imports. max_abs_diff is over class "
                "probabilities against segflow's whole-volume pass (vs_reference) and "
                "against the plain zero-padded pass (vs_plain); *_interior leaves out "
                f"{margins[0]} px at the borders. The two passes put the pooling grid "
                "at different phases (see the module docstring)."
            ),
            "machine": machine(),
            "load_average_after": load_average(),
        }
    )
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
