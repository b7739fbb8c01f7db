"""Training quality and time with the defaults: synthetic nuclei, scored on held-out images.

Trains ``segflow train``'s default network (depth 3, 16 channels, 600 steps) on one
512×512 synthetic image of blurred, noisy, partly touching blobs (``unet_core.synthetic``),
then segments three other synthetic images with the best checkpoint and scores them:
foreground Dice and IoU, instance precision/recall/F1 at IoU >= 0.5 (objects are the
connected components of the foreground, minimum size from the checkpoint's object
statistics) and the ISBI 2012 Rand error. Prints JSON.

    python -m bench.train [--steps 600] [--size 512] [--threads 2] [--label-mode instances]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

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
    args = parser.parse_args(argv)
    configure()  # segflow's CPU settings, as its entry points apply them
    torch.set_num_threads(args.threads)

    from unet_core import load_checkpoint
    from unet_core.metrics import class_report, instance_report, instances_from_mask
    from unet_core.normalize import compute_stats
    from unet_core.predict import predict
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
            "machine": machine(),
            "load_average": load_average(),
        }
    )


if __name__ == "__main__":
    main()
