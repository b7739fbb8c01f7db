"""``segflow train`` and ``segflow evaluate``: train a U-Net on annotated images, score masks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.app import app
from segflow.errors import clean_errors
from segflow.options import parse_shape
from segflow.output import emit, output_options

if TYPE_CHECKING:
    from unet_core.training.config import TrainConfig


def _config(
    preset: str,
    overrides: dict[str, Any],
) -> TrainConfig:
    from pydantic import ValidationError

    from unet_core.errors import ConfigError
    from unet_core.training.config import TrainConfig

    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        if preset == "paper":
            return TrainConfig.paper(**values)
        if preset != "small":
            raise ConfigError(f"unknown preset {preset!r} (use 'small' or 'paper')")
        return TrainConfig.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise ConfigError(f"invalid training option {where}: {first['msg']}") from None


@app.command()
@clean_errors
@output_options
def train(
    image: Annotated[
        list[str],
        typer.Option(help="Training image (TIFF, OME-Zarr, .npy, PNG); repeat for several."),
    ],
    labels: Annotated[
        list[str],
        typer.Option(help="Its annotation (class or instance ids), one per --image, in order."),
    ],
    out: Annotated[Path, typer.Option(help="Checkpoint file to write (best model).")],
    ndim: Annotated[int, typer.Option(help="2 (slice by slice on volumes) or 3.")] = 2,
    preset: Annotated[
        str, typer.Option(help="'small' (CPU-friendly: depth 3, 16 channels) or 'paper'.")
    ] = "small",
    depth: Annotated[int | None, typer.Option(help="Poolings (small: 3, paper: 4).")] = None,
    base_channels: Annotated[
        int | None, typer.Option(help="Channels of the first level (small: 16, paper: 64).")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default 600).")] = None,
    patch: Annotated[
        str | None, typer.Option(help="Input patch, e.g. 252,252 (rounded up to a valid size).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per step (default 4).")] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 1e-3).")] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Held-out fraction for validation (default 0.15).")
    ] = None,
    val_every: Annotated[int | None, typer.Option(help="Steps per epoch (validation).")] = None,
    labels_are: Annotated[
        str,
        typer.Option(
            help="auto, classes, binary, instances (touching objects get a gap) or boundary "
            "(background/interior/boundary)."
        ),
    ] = "auto",
    n_classes: Annotated[
        int | None, typer.Option(help="Classes when --labels-are classes.")
    ] = None,
    loss: Annotated[str, typer.Option(help="ce (weighted cross-entropy), dice or ce+dice.")] = "ce",
    sampling: Annotated[str, typer.Option(help="balanced or uniform patch centres.")] = "balanced",
    augment: Annotated[bool, typer.Option(help="The paper's augmentations.")] = True,
    border_weight: Annotated[
        bool | None,
        typer.Option(help="The paper's border weights between objects (default: auto)."),
    ] = None,
    norm: Annotated[str | None, typer.Option(help="batch, none, instance or group.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout at the bottom.")] = None,
    device: Annotated[
        str, typer.Option(help="auto, cpu, cuda or cuda:N; checked before any data is read.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Random seed (runs are deterministic).")] = 0,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the run of this checkpoint (or fine-tune from it)."),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for PyTorch.")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a segflow checkpoint already at --out (never any other file).",
        ),
    ] = False,
    trust_labels: Annotated[
        bool,
        typer.Option(
            "--trust-labels",
            help="Skip the check that --labels look like an annotation and --image like an "
            "image (for dense annotations without background).",
        ),
    ] = False,
) -> None:
    """Train a U-Net on image/label pairs and write the best checkpoint (by validation Dice).

    Shows a line per epoch (loss, validation Dice, time left), then a summary (--json);
    the loss curve, history and validation prediction are written beside the checkpoint.
    Interrupted runs continue with --resume OUT.
    """
    import torch

    from unet_core.augment import AugmentConfig
    from unet_core.errors import ConfigError

    if threads:
        torch.set_num_threads(threads)
    patch_shape = parse_shape(patch, "patch")
    config = _config(
        preset,
        {
            "ndim": ndim,
            "depth": depth,
            "base_channels": base_channels,
            "steps": steps,
            "patch": patch_shape,
            "batch_size": batch_size,
            "lr": lr,
            "val_fraction": val_fraction,
            "val_every": val_every,
            "label_mode": labels_are,
            "n_classes": n_classes,
            "loss": loss,
            "sampling": sampling,
            "augment": None if augment else AugmentConfig.off(),
            "border_weight": border_weight,
            "norm": norm,
            "dropout": dropout,
            "device": device,
            "seed": seed,
        },
    )
    if resume is not None and not resume.is_file():
        raise ConfigError(f"{resume}: no checkpoint to resume from")
    from segflow.progress import TrainProgress
    from tasks.training.report import summary
    from tasks.training.run import run_training

    with TrainProgress(config.steps, config.epoch_steps) as shown:
        result, files = run_training(
            image, labels, out, config, shown.update, resume, trust_labels, overwrite
        )
    report = summary(result, files)
    emit(report, train_text(report))


def train_text(report: dict[str, Any]) -> str:
    """The human summary of a training run."""
    dice = report["best_mean_dice"]
    best = "-" if dice is None else f"{dice:.3f}"
    lines = [
        f"checkpoint: {report['checkpoint']} (best validation dice {best} at step "
        f"{report['best_step']} of {report['steps']}, {report['seconds']:.0f} s)"
    ]
    lines += [f"{k}: {v}" for k, v in report.get("files", {}).items() if k != "checkpoint"]
    return "\n".join(lines)


@app.command()
@clean_errors
@output_options
def evaluate(
    pred: Annotated[
        str,
        typer.Argument(
            help="Predicted labels: STORE/labels/NAME/0 as segment prints it, a store with "
            "--labels NAME, or a TIFF, .npy or PNG."
        ),
    ],
    gt: Annotated[str, typer.Argument(help="Ground truth of the same shape (any of those).")],
    labels: Annotated[
        str | None, typer.Option(help="Label image of a PRED store (e.g. semantic, instances).")
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="auto (from the ids: instance vs class ids), classes (Dice/IoU per class), "
            "foreground (binary Dice/IoU of ids > 0) or instances (F1 at IoU >= threshold, "
            "Rand error)."
        ),
    ] = "auto",
    instances: Annotated[
        bool, typer.Option(help="Same as --mode instances (masks are split into objects).")
    ] = False,
    threshold: Annotated[float, typer.Option(help="IoU for a matched object.")] = 0.5,
    n_classes: Annotated[
        int | None, typer.Option(help="Classes (default: largest id + 1).")
    ] = None,
) -> None:
    """Score PRED against GT and print the scores, naming the mode used and why."""
    import numpy as np

    from tasks.training.inputs import read_labels
    from unet_core.errors import InvalidShapeError, InvalidVolumeError
    from unet_core.metrics import (
        choose_mode,
        class_report,
        foreground_report,
        instance_report,
        instances_from_mask,
    )
    from unet_core.targets import label_problem

    modes = ("auto", "classes", "foreground", "instances")
    if mode not in modes:
        raise typer.BadParameter(f"--mode {mode}: use one of {', '.join(modes)}")
    if instances:
        mode = "instances"
    elif mode == "auto" and n_classes is not None:
        mode = "classes"
    if not 0.0 < threshold <= 1.0:
        raise typer.BadParameter("threshold must be in (0, 1]")
    p, g = read_labels(pred, labels, image_ok=False), read_labels(gt)
    if p.shape != g.shape:
        raise InvalidShapeError(f"{pred}: shape {p.shape} differs from {gt}'s {g.shape}")
    for name, a, what in ((pred, p, "prediction"), (gt, g, "ground truth")):
        problem = label_problem(a, background=False)
        if problem is not None:
            raise InvalidVolumeError(
                f"{name}: this {what} looks like an image, not labels: {problem}"
            )
    why = "asked with --mode" if mode != "auto" else ""
    if mode == "auto":
        mode, why = choose_mode(p, g)
    head: dict[str, Any] = {"mode": mode, "why": why}
    if mode == "instances":
        p = instances_from_mask(p > 0) if np.unique(p).size <= 2 else p
        g = instances_from_mask(g > 0) if np.unique(g).size <= 2 else g
        result = {**head, **instance_report(p, g, threshold)}
    elif mode == "foreground":
        result = {**head, **foreground_report(p, g)}
    else:
        for name, a in ((pred, p), (gt, g)):
            if a.dtype.kind == "f" or (a.size and a.min() < 0):
                raise InvalidVolumeError(f"{name}: class ids must be non-negative integers")
        top = int(max(p.max(initial=0), g.max(initial=0)))
        if n_classes is not None and top >= n_classes:
            raise InvalidVolumeError(f"class id {top} is not below --n-classes {n_classes}")
        k = max(n_classes or top + 1, 2)
        result = {**head, "n_classes": k, **class_report(p, g, k)}
    emit(result)
