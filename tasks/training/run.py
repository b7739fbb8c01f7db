"""One training run from files: load the pairs, train, write the checkpoint and report."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tasks.training.inputs import load_pairs
from tasks.training.report import TrainingFiles, write_report
from unet_core.errors import ConfigError
from unet_core.training.config import TrainConfig
from unet_core.training.loop import TrainProgress, TrainResult, train


def run_training(
    images: Sequence[str],
    labels: Sequence[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: str | os.PathLike[str] | None = None,
    trust_labels: bool = False,
) -> tuple[TrainResult, TrainingFiles]:
    """Load the pairs, train, and write the checkpoint with its report files.

    Checked before any data is read: the device, the checkpoint to resume, and that
    ``out`` can be written; then, unless ``trust_labels``, that the labels look like an
    annotation and the images like images (:func:`tasks.training.inputs.check_pair_kinds`)."""
    from tasks.outputs import check_writable
    from unet_core.checkpoint import read_checkpoint_header
    from unet_core.predict import check_device

    out = Path(out)
    check_device((config or TrainConfig()).device)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; --out names the checkpoint file to write")
    check_writable(str(out.parent))
    if resume is not None:
        read_checkpoint_header(resume)
    imgs, labs = load_pairs(images, labels, trust_labels)
    result = train(
        imgs,
        labs,
        config or TrainConfig(),
        out=out,
        progress=progress,
        resume=resume,
        sources=[f"{i} + {lab}" for i, lab in zip(images, labels, strict=True)],
    )
    return result, write_report(result, out)


__all__ = ["run_training"]
