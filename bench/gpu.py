"""GPU: model FLOPs, forward throughput per precision/layout, and end-to-end ``segment``.

    python -m bench.gpu [--models unet2d,unet3d] [--seconds 3] [--no-compile] [--no-e2e]

Runs on a CUDA machine; elsewhere it prints ``{"skipped": "no CUDA device"}`` (plus the
FLOP counts, which need no GPU). For each model:

- **FLOPs per output voxel**, counted from the layer shapes (forward hooks on a model on
  PyTorch's ``meta`` device, so nothing is computed): a convolution costs
  ``2 * k^d * Cin * Cout`` per voxel of its output, a transposed convolution the same per
  voxel of its input; summed over layers and divided by the voxels the tile outputs (and by
  the voxels it keeps, for the engine's view);
- **forward throughput** (output voxels/s) of one batch of tiles repeated for ``--seconds``:
  fp32 (torch defaults: cuDNN may use TF32), bf16 autocast, bf16 + channels-last, and bf16 +
  channels-last + ``torch.compile``; the achieved TFLOP/s and its fraction of the device's
  peak (dense, vendor datasheet; TF32 peak for fp32 when cuDNN TF32 is allowed);
- **convolution-only** TFLOP/s for bf16 + channels-last (the engine's CUDA default): the
  convolution FLOPs over the device time that ``torch.profiler`` attributes to
  ``aten::convolution``; target >= 40 % of the bf16 peak;
- **end-to-end**: ``tasks.segment.segment_image`` (CUDA, bf16 autocast, channels-last,
  in-process Dask cluster) on a uint16 OME-Zarr volume, against the forward passes alone
  over exactly the same tiles and batches (random inputs already on the GPU). Target:
  end-to-end >= 0.9x forward-only.

Models: ``unet2d`` = the paper's network (depth 4, 64 base channels, valid convolutions; the
volume runs slice by slice), ``unet3d`` = a 3D U-Net (depth 3, 32 base channels). The tile
is chosen so that its kept centre is exactly one output chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import shutil
import sys
import time
from typing import Any

import numpy as np

from bench.common import OUT, emit, load_average, machine
from unet_core.runtime import configure

WORK = OUT / "gpu"

#: Dense peak TFLOP/s from the vendor datasheets (NVIDIA H100 / H200 / A100 product briefs;
#: the "with sparsity" figures halved).
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "H200 SXM": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}

#: name -> (config, chunks of the end-to-end volume, volume shape, batch size)
MODELS: dict[str, dict[str, Any]] = {
    "unet2d": {
        "config": {"ndim": 2, "depth": 4, "base_channels": 64},
        "chunks": (8, 512, 512),
        "volume": (128, 2048, 2048),
        "batch": 8,
    },
    "unet3d": {
        "config": {"ndim": 3, "depth": 3, "base_channels": 32},
        "chunks": (128, 128, 128),
        "volume": (256, 1024, 2048),
        "batch": 1,  # one tile per block: the engine batches tiles within a block
    },
}


def device_peak(name: str) -> tuple[str | None, dict[str, float] | None]:
    n = name.upper()
    for gen in ("H200", "H100"):
        if gen in n:
            form = "NVL" if "NVL" in n else "PCIe" if "PCIE" in n else "SXM"
            key = f"{gen} {form}"
            return key, PEAK_TFLOPS[key]
    if "A100" in n:
        return "A100", PEAK_TFLOPS["A100"]
    return None, None


def count_flops(config: Any, tile: tuple[int, ...], batch: int = 1) -> dict[str, float]:
    """Convolution FLOPs of one forward pass over ``batch`` tiles, from the layer shapes."""
    import torch
    from torch import nn

    from unet_core import UNet

    model = UNet(config).to("meta").eval()
    total = {"conv": 0.0}

    def conv_hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(mod, nn.Conv2d | nn.Conv3d)
        k = float(np.prod(mod.kernel_size))
        cin = mod.in_channels / mod.groups
        total["conv"] += 2.0 * k * cin * mod.out_channels * float(out.numel() / out.shape[1])

    def upconv_hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        assert isinstance(mod, nn.ConvTranspose2d | nn.ConvTranspose3d)
        x = inputs[0]
        k = float(np.prod(mod.kernel_size))
        cout = mod.out_channels / mod.groups
        total["conv"] += 2.0 * k * cout * mod.in_channels * float(x.numel() / x.shape[1])

    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.ConvTranspose2d | nn.ConvTranspose3d):
            m.register_forward_hook(upconv_hook)
    x = torch.empty((batch, config.in_channels, *tile), device="meta")
    with torch.no_grad():
        out = model(x)
    return {
        "conv_flops": total["conv"],
        "output_voxels": float(out.numel() / out.shape[1]),
    }


def model_flops(name: str) -> dict[str, Any]:
    from unet_core import UNetConfig
    from unet_core.geometry import TileSpec

    spec_m = MODELS[name]
    config = UNetConfig(**spec_m["config"])
    spec = TileSpec(config, 3)
    tile = tile_for(spec, spec_m["chunks"])
    model_tile = tile[spec.slice_axes :]
    counted = count_flops(config, model_tile)
    kept = float(np.prod(spec.usable(tile)))
    return {
        "config": config.model_dump(include={"ndim", "depth", "base_channels", "padding"}),
        "tile": list(tile),
        "batch_size": spec_m["batch"],
        "gflops_per_tile": round(counted["conv_flops"] / 1e9, 3),
        "flops_per_output_voxel": round(counted["conv_flops"] / counted["output_voxels"]),
        "flops_per_kept_voxel": round(counted["conv_flops"] / kept),
    }


def tile_for(spec: Any, chunks: tuple[int, ...]) -> tuple[int, ...]:
    """The smallest valid tile whose kept centre covers one chunk (per model axis)."""
    ctx = spec.config.context
    return tuple(
        1 if a < spec.slice_axes else spec.valid_size(a, c + 2 * ctx, usable=c)
        for a, c in enumerate(chunks)
    )


# --------------------------------------------------------------------- measurements


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: Any, dtype: Any) -> contextlib.AbstractContextManager[Any]:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def forward_variant(
    model: Any,
    x: Any,
    device: Any,
    dtype: Any,
    channels_last: bool,
    compile_model: bool,
    seconds: float,
) -> dict[str, Any]:
    """Voxels/s of repeated forward passes of one batch (after warm-up / compilation)."""
    import torch

    from unet_core.numerics import channels_last_format

    m = copy.deepcopy(model).to(device).eval()
    xin = x
    if channels_last:
        fmt = channels_last_format(x.ndim)
        m = m.to(memory_format=fmt)
        xin = x.contiguous(memory_format=fmt)
    t0 = time.perf_counter()
    if compile_model:
        m = torch.compile(m)
    with torch.inference_mode(), _autocast(device, dtype):
        for _ in range(3):
            out = m(xin)
        _sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = m(xin)
        _sync(device)
        n = max(3, int(seconds / max(time.perf_counter() - t0, 1e-6)))
        t0 = time.perf_counter()
        for _ in range(n):
            out = m(xin)
        _sync(device)
        elapsed = time.perf_counter() - t0
    voxels = float(out.numel() / out.shape[1])
    del m
    return {"per_forward_s": elapsed / n, "voxels_per_s": voxels * n / elapsed, "warmup_s": warm}


def conv_device_time(model: Any, x: Any, device: Any, dtype: Any, iters: int = 5) -> float:
    """Seconds of device time per forward spent in ``aten::convolution`` (profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from unet_core.numerics import channels_last_format

    m = copy.deepcopy(model).to(device).eval()
    fmt = channels_last_format(x.ndim)
    m = m.to(memory_format=fmt)
    xin = x.contiguous(memory_format=fmt)
    with torch.inference_mode(), _autocast(device, dtype):
        for _ in range(2):
            m(xin)
        _sync(device)
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities) as prof:
            for _ in range(iters):
                m(xin)
            _sync(device)
    total_us = 0.0
    for evt in prof.key_averages():
        if evt.key == "aten::convolution":
            if device.type == "cuda":
                value = getattr(evt, "device_time_total", None)
                if value is None:
                    value = evt.cuda_time_total
            else:
                value = evt.cpu_time_total
            total_us += float(value)
    return total_us / 1e6 / iters


def end_to_end(name: str, device: Any, quick: bool) -> dict[str, Any]:
    """``segment_image`` on a volume vs forward passes over the same tiles and batches."""
    import torch

    from bench.common import write_image_store
    from tasks.segment import (
        SegmentParams,
        dask_client,
        get_predictor,
        plan_segmentation,
        segment_image,
    )
    from unet_core import UNet, UNetConfig, save_checkpoint
    from unet_core.geometry import TileSpec, plan_tiles

    spec_m = MODELS[name]
    config = UNetConfig(**spec_m["config"])
    spec = TileSpec(config, 3)
    chunks = tuple(spec_m["chunks"])
    shape = tuple(spec_m["volume"])
    if quick:
        shape = tuple(min(s, 2 * c) for s, c in zip(shape, chunks, strict=True))
    tile = tile_for(spec, chunks)
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    src, warm_src = str(work / "volume.ome.zarr"), str(work / "warm.ome.zarr")
    write_image_store(src, shape, chunks)
    write_image_store(warm_src, chunks, chunks)
    torch.manual_seed(0)
    ckpt = str(work / "model.ckpt")
    save_checkpoint(ckpt, UNet(config))
    cuda = device.type == "cuda"
    params = SegmentParams(
        device="cuda" if cuda else "cpu",
        tile=tile,
        batch_size=int(spec_m["batch"]),
        precision="bf16" if cuda else "fp32",
        mode="fast",  # tiles sized to one chunk (tile_for), planned per block
    )
    with dask_client() as client:
        segment_image(warm_src, ckpt, str(work / "warm-out.zarr"), params, client=client)
        _sync(device)
        t0 = time.perf_counter()
        res = segment_image(src, ckpt, str(work / "out.zarr"), params, client=client)
        _sync(device)
        e2e_s = time.perf_counter() - t0
    plan = plan_segmentation(src, ckpt, str(work / "out.zarr"), params)
    predictor = get_predictor(plan)
    s = spec.slice_axes
    forward_s = 0.0
    batches = 0
    dtype = torch.bfloat16 if cuda else None
    with torch.inference_mode(), _autocast(device, dtype):
        for index in plan.indices():
            block = plan.block(index)
            _, tiles = plan_tiles(spec, block.write, plan.tile)
            for start in range(0, len(tiles), params.batch_size):
                n = len(tiles[start : start + params.batch_size])
                x = torch.randn((n, config.in_channels, *tile[s:]), device=device)
                x = predictor.layout(x)
                _sync(device)
                t = time.perf_counter()
                predictor.model(x)
                _sync(device)
                forward_s += time.perf_counter() - t
                batches += 1
    voxels = int(np.prod(shape))
    shutil.rmtree(work, ignore_errors=True)
    return {
        "volume_shape": list(shape),
        "volume_mib": round(voxels * 2 / 2**20, 1),
        "chunks": list(chunks),
        "tile": list(tile),
        "batch_size": params.batch_size,
        "precision": params.precision,
        "channels_last": predictor.channels_last,
        "blocks": res.blocks_total,
        "batches": batches,
        "segment_s": round(e2e_s, 3),
        "forward_only_s": round(forward_s, 3),
        "segment_voxels_per_s": round(voxels / e2e_s),
        "forward_only_voxels_per_s": round(voxels / forward_s),
        "ratio_e2e_to_forward": round(forward_s / e2e_s, 3),
        "target_ratio": 0.9,
        "target_met": forward_s / e2e_s >= 0.9,
    }


def bench_model(
    name: str, device: Any, peaks: dict[str, float] | None, args: argparse.Namespace
) -> dict[str, Any]:
    import torch

    from unet_core import UNet, UNetConfig
    from unet_core.geometry import TileSpec

    out = model_flops(name)
    spec_m = MODELS[name]
    config = UNetConfig(**spec_m["config"])
    spec = TileSpec(config, 3)
    tile = tile_for(spec, spec_m["chunks"])[spec.slice_axes :]
    batch = int(spec_m["batch"])
    flops = count_flops(config, tile, batch)["conv_flops"]
    torch.manual_seed(0)
    model = UNet(config)
    x = torch.randn((batch, config.in_channels, *tile), device=device)
    tf32 = bool(torch.backends.cudnn.allow_tf32)
    bf16 = torch.bfloat16
    variants = [
        ("fp32", None, False, False),
        ("bf16_autocast", bf16, False, False),
        ("bf16_channels_last", bf16, True, False),
    ]
    if not args.no_compile:
        variants.append(("bf16_channels_last_compile", bf16, True, True))
    results: dict[str, Any] = {}
    for label, dtype, cl, comp in variants:
        try:
            r = forward_variant(model, x, device, dtype, cl, comp, args.seconds)
        except Exception as exc:  # one failing variant must not lose the others
            results[label] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
            continue
        tflops = flops / r["per_forward_s"] / 1e12
        peak_key = "bf16" if dtype is not None else ("tf32" if tf32 else "fp32")
        results[label] = {
            "voxels_per_s": round(r["voxels_per_s"]),
            "tflops": round(tflops, 2),
            "fraction_of_peak": round(tflops / peaks[peak_key], 3) if peaks else None,
            "peak_used": peak_key,
            "warmup_s": round(r["warmup_s"], 2),
        }
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["forward"] = results
    out["cudnn_allow_tf32"] = tf32
    try:
        conv_s = conv_device_time(model, x, device, bf16)
        conv_tflops = flops / conv_s / 1e12
        out["convolutions_bf16_channels_last"] = {
            "device_s_per_forward": round(conv_s, 5),
            "tflops": round(conv_tflops, 2),
            "fraction_of_bf16_peak": round(conv_tflops / peaks["bf16"], 3) if peaks else None,
            "target_fraction": 0.4,
            "target_met": (conv_tflops / peaks["bf16"] >= 0.4) if peaks else None,
        }
    except Exception as exc:
        out["convolutions_bf16_channels_last"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_e2e:
        try:
            out["end_to_end"] = end_to_end(name, device, args.quick)
        except Exception as exc:
            out["end_to_end"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="unet2d,unet3d")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per variant")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small end-to-end volumes")
    # Development only: --device cpu --base 4 runs every code path on a CPU, scaled down.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure()  # segflow's CPU settings, as its entry points apply them
    if args.base:
        for spec_m in MODELS.values():
            spec_m["config"] = {**spec_m["config"], "base_channels": args.base}
            spec_m["chunks"] = tuple(min(c, 64) for c in spec_m["chunks"])
            spec_m["volume"] = tuple(2 * c for c in spec_m["chunks"])
    import torch

    names = [n for n in args.models.split(",") if n]
    flops = {n: model_flops(n) for n in names}
    if args.device == "cuda" and not torch.cuda.is_available():
        emit(
            {
                "benchmark": "gpu",
                "skipped": "no CUDA device",
                "models": flops,
                "machine": machine(),
            }
        )
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_key, peaks = device_peak(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models = {n: bench_model(n, device, peaks, args) for n in names}
    conv_fracs = [
        m["convolutions_bf16_channels_last"].get("fraction_of_bf16_peak") for m in models.values()
    ]
    e2e = [m.get("end_to_end", {}).get("ratio_e2e_to_forward") for m in models.values()]
    emit(
        {
            "benchmark": "gpu",
            "device": name,
            "peak_tflops": {"model": peak_key, **(peaks or {}), "source": "vendor datasheet"},
            "cudnn_benchmark": device.type == "cuda",
            "models": models,
            "best_conv_fraction_of_bf16_peak": max((f for f in conv_fracs if f), default=None),
            "worst_e2e_to_forward": min((r for r in e2e if r), default=None),
            "machine": machine(),
            "load_average_after": load_average(),
        }
    )


if __name__ == "__main__":
    main(sys.argv[1:])
