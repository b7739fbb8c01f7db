"""One training run from files: load the pairs, train, write the checkpoint and report."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from tasks.training.inputs import load_pairs
from tasks.training.report import TrainingFiles, write_report
from unet_core.errors import ConfigError, opt
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
    overwrite: bool = False,
) -> tuple[TrainResult, TrainingFiles]:
    """Load the pairs, train, and write the checkpoint with its report files.

    Checked before any data is read: the device, the checkpoint to resume, and that
    ``out`` and the files beside it may be written (:func:`check_training_outputs`); then,
    unless ``trust_labels``, that the labels look like an annotation and the images like
    images (:func:`tasks.training.inputs.check_pair_kinds`)."""
    from unet_core.checkpoint import read_checkpoint_header
    from unet_core.devices import check_device

    out = Path(out)
    check_device((config or TrainConfig()).device)
    if resume is not None:
        read_checkpoint_header(resume)
    check_training_outputs(out, [*images, *labels], resume, overwrite)
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


def check_training_outputs(
    out: Path,
    inputs: Sequence[str],
    resume: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> None:
    """The output policy for a training run: the checkpoint ``out`` is never an input
    (image, labels), a folder, a special file or a file inside a store; a file there is
    replaced only when it is a segflow checkpoint and the run was asked to (``overwrite``,
    or ``resume`` from that very checkpoint). The files beside it (resume state, history,
    loss curve, validation) belong to it: replaced with it, never on their own."""
    from tasks.outputs import (
        RunInputs,
        check_file_target,
        check_writable,
        made_by_segflow,
    )
    from tasks.paths import special_file
    from tasks.training.report import report_paths

    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; {opt('out')} names the checkpoint file to write")
    check_writable(str(out.parent))
    continuing = resume is not None and out.exists() and os.path.samefile(resume, out)
    sources = RunInputs.of(*inputs, *([str(resume)] if resume and not continuing else []))
    check_file_target(
        str(out), "checkpoint", sources, overwrite=overwrite or continuing, what="checkpoint"
    )
    ours = out.exists() and made_by_segflow(str(out), "checkpoint")
    paths = report_paths(out)
    for side in (paths.state, paths.history, paths.loss_curve, paths.validation):
        assert side is not None
        special = special_file(str(side))
        if special is not None or side.is_dir():
            what = special or "a folder"
            raise ConfigError(f"{side}: is {what}; the training run writes a file there")
        clash = sources.collision(str(side))
        if clash is not None:
            raise ConfigError(f"{side}: the training run would write it, but {clash}")
        if side.exists() and not ours:
            from unet_core.errors import StoreConflictError

            raise StoreConflictError(
                f"{side}: already exists beside {out}, which is not a segflow checkpoint; "
                "segflow never replaces it: move it away or choose another checkpoint name"
            )


__all__ = ["check_training_outputs", "run_training"]
