"""Training quality and time with the defaults: synthetic nuclei, scored on held-out images.

Trains ``segflow train``'s default network (depth 3, 16 channels, 600 steps) on one
512×512 synthetic image of blurred, noisy, partly touching blobs (``unet_core.synthetic``),
then segments three other synthetic images with the best checkpoint and scores them:
foreground Dice and IoU, instance precision/recall/F1 at IoU >= 0.5 (objects are the
connected components of the foreground, minimum size from the checkpoint's object
statistics) and the ISBI 2012 Rand error.

Then the same network segments synthetic *stacks* slice by slice (slices 3x coarser than
pixels, nuclei spanning several slices and touching rather than cutting into each other,
half of the touching ones stacked along z) and the objects are scored side by side: 3D
connected components of the per-slice masks (the old default) against slice objects
linked by overlap (``unet_core.slicelink``, the default for 2D models on stacks), with a
small sweep of the link IoU and waist depths behind the defaults. Prints JSON.

    python -m bench.train [--steps 600] [--size 512] [--threads 2] [--label-mode instances]
        [--stack 20,224,224] [--stacks 3]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import emit, load_average, machine
from unet_core.runtime import configure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label-mode", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stack", default="20,224,224", help="synthetic stack shape (z,y,x)")
    parser.add_argument("--stacks", type=int, default=3, help="stacks scored (0: none)")
    args = parser.parse_args(argv)
    configure()  # segflow's CPU settings, as its entry points apply them
    torch.set_num_threads(args.threads)

    from unet_core import load_checkpoint
    from unet_core.metrics import class_report, instance_report, instances_from_mask
    from unet_core.normalize import compute_stats
    from unet_core.predict import predict
    from unet_core.sizes import default_min_size
    from unet_core.synthetic import blobs
    from unet_core.training.config import TrainConfig
    from unet_core.training.loop import train

    image, labels = blobs((args.size, args.size), rng=1)
    values = {"label_mode": args.label_mode, "seed": args.seed}
    if args.steps:
        values["steps"] = args.steps
    config = TrainConfig.model_validate(values)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.ckpt"
        t0, c0 = time.perf_counter(), time.process_time()
        result = train([image], [labels], config, out=ckpt)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        model, meta = load_checkpoint(ckpt)
    min_size = meta.object_stats.suggested_min_size if meta.object_stats else 1
    scores = []
    for k in (101, 102, 103):
        test_image, test_labels = blobs((args.size, args.size), rng=k)
        norm = meta.normalization.affine(compute_stats(test_image))
        prob = predict(model, test_image, normalization=norm, mode="fast")
        pred = np.argmax(prob, axis=0)
        fg = pred == meta.foreground_class
        rep = class_report(fg.astype(np.uint8), (test_labels > 0).astype(np.uint8), 2)
        inst = instance_report(instances_from_mask(fg, min_size), test_labels)
        scores.append(
            {
                "dice": rep["dice"]["class_1"],
                "iou": rep["iou"]["class_1"],
                "f1": inst["f1"],
                "precision": inst["precision"],
                "recall": inst["recall"],
                "rand_error": inst["rand_error"],
            }
        )
    mean = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
    shape = tuple(int(v) for v in args.stack.split(","))
    stack_min = default_min_size(min_size, 2, SPACING).size  # the 2D areas in voxels
    stacks = stack_scores(model, meta, shape, args.stacks, stack_min) if args.stacks else None
    emit(
        {
            "benchmark": "train",
            "image": [args.size, args.size],
            "steps": config.steps,
            "label_mode": result.meta.training["label_mode"],
            "train_seconds": round(seconds, 1),
            "train_cpu_seconds": round(cpu_seconds, 1),
            "steps_per_second": round(config.steps / seconds, 2),
            "best_step": result.best_step,
            "validation_dice": round(result.best_metric or 0.0, 4),
            "held_out": mean,
            "min_size": min_size,
            "stacks": stacks,
            "machine": machine(),
            "load_average": load_average(),
        }
    )


SPACING = (3.0, 1.0, 1.0)
SWEEP_IOU = (0.05, 0.1, 0.2, 0.3)
SWEEP_AREA_DEPTH = (0.0, 0.3)
SWEEP_INTENSITY_DEPTH = (0.0, 0.05, 0.1)


def stack_scores(
    model: Any, meta: Any, shape: tuple[int, ...], count: int, min_size: int
) -> dict[str, Any]:
    """Instance F1 on synthetic stacks: 3D components vs slice linking, same predictions."""
    from unet_core.metrics import instances_from_mask, match_instances
    from unet_core.normalize import compute_stats
    from unet_core.predict import predict
    from unet_core.slicelink import LinkParams, link_instances
    from unet_core.synthetic import blobs, touching_along

    rows: list[dict[str, float]] = []
    sweep: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    for k in range(count):
        image, truth = blobs(shape, rng=201 + k, spacing=SPACING, stacked=0.5, overlap=0.1)
        stats = compute_stats(image)
        prob = predict(model, image, normalization=meta.normalization.affine(stats), mode="fast")
        fg = np.argmax(prob, axis=0) == meta.foreground_class
        comp = match_instances(instances_from_mask(fg, min_size), truth)
        # As the pipeline does: the checkpoint's link IoU, intensities above the median.
        params = LinkParams(iou=meta.link_iou, background=stats.percentile(50))
        linked = match_instances(link_instances(fg, image, params=params, min_size=min_size), truth)
        rows.append(
            {
                "touching_z": touching_along(truth, axis=0),
                "objects": float(truth.max()),
                "f1_components": comp.f1,
                "f1_slices": linked.f1,
                "precision_slices": linked.precision,
                "recall_slices": linked.recall,
            }
        )
        for i, a, d in itertools.product(SWEEP_IOU, SWEEP_AREA_DEPTH, SWEEP_INTENSITY_DEPTH):
            p = replace(params, iou=i, area_depth=a, intensity_depth=d)
            f1 = match_instances(link_instances(fg, image, params=p, min_size=min_size), truth).f1
            sweep.setdefault(f"iou={i} area_depth={a} intensity_depth={d}", []).append(f1)
    mean = {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}
    ranked = sorted(sweep.items(), key=lambda kv: -float(np.mean(kv[1])))
    return {
        "shape": list(shape),
        "spacing": list(SPACING),
        "count": count,
        "min_size_voxels": min_size,
        "link_iou": meta.link_iou,
        **mean,
        "per_stack": [{k: round(v, 4) for k, v in r.items()} for r in rows],
        "sweep_top": {k: round(float(np.mean(v)), 4) for k, v in ranked[:8]},
        "seconds": round(time.perf_counter() - t0, 1),
    }


if __name__ == "__main__":
    main()
