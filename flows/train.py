"""The ``train-model`` flow: train a U-Net on annotated images, report the result.

One task runs :func:`tasks.training.run.run_training` (read the pairs, train, write the
checkpoint, its resume state, history, loss-curve PNG and validation prediction beside
it); the flow then publishes a markdown artifact with the final metrics and a link to the
loss curve. Parameters are one pydantic model, so the Prefect UI renders them as a form
with the same defaults and bounds as ``segflow train``.
"""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import crash_earlier_attempts, flat_parameters, run_form
from tasks.training.report import summary
from tasks.training.run import run_training
from unet_core.runtime import configure
from unet_core.training.config import TrainConfig
from unet_core.training.loop import TrainProgress


class TrainParams(BaseModel):
    """What to train on, where to write the model, and how to train."""

    model_config = ConfigDict(extra="forbid")

    images: list[str] = Field(
        ...,
        min_length=1,
        description="Training images: TIFF, OME-Zarr (local or s3://), .npy or PNG paths.",
    )
    labels: list[str] = Field(
        ...,
        min_length=1,
        description="Their annotations (class or instance ids), one per image, same order.",
    )
    out: str = Field(..., min_length=1, description="Checkpoint file to write (the best model).")
    config: TrainConfig = Field(
        default_factory=TrainConfig, description="Network, patches, loss, augmentation, steps."
    )
    resume: bool = Field(
        False, description="Continue the run whose checkpoint and state are at 'out'."
    )
    overwrite: bool = Field(
        False,
        description="Replace a segflow checkpoint already at 'out' (never any other file).",
    )

    @model_validator(mode="after")
    def _pairs(self) -> TrainParams:
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{len(self.images)} image(s) but {len(self.labels)} label image(s): "
                "give one label image per image"
            )
        return self


@task(name="train-unet")
def train_task(params: TrainParams) -> dict[str, Any]:
    """Train and write the checkpoint with its report files; returns the summary."""
    logger = get_run_logger()
    bar = cast(UUID, create_progress_artifact(0.0, description=f"training {params.out}"))
    every = params.config.epoch_steps

    def progress(p: TrainProgress) -> None:
        if p.event == "epoch":
            metric = "-" if p.metric is None else f"{p.metric:.4f}"
            logger.info(
                "step %d/%d: loss %.4f, validation Dice %s, %.2f steps/s",
                p.step,
                p.steps,
                p.loss,
                metric,
                p.steps_per_s,
            )
        if p.event == "epoch" or p.step % every == 0:
            update_progress_artifact(bar, 100.0 * p.step / p.steps)

    resume = params.out if params.resume else None
    result, files = run_training(
        params.images,
        params.labels,
        params.out,
        params.config,
        progress,
        resume,
        overwrite=params.overwrite,
    )
    update_progress_artifact(bar, 100.0)
    return summary(result, files)


def report_markdown(result: dict[str, Any]) -> str:
    """The flow's report: final metrics per class, the run, and the files written."""
    files = result.get("files", {})
    val = result.get("validation") or {}
    lines = [
        "# U-Net training",
        "",
        f"Checkpoint: `{result['checkpoint']}` (digest `{result['digest'][:12]}`)",
        f"Best step {result['best_step']} of {result['steps']}, "
        f"{result['seconds']} s, labels as *{result['label_mode']}*, "
        f"patch {result['patch']}.",
        "",
    ]
    if val:
        lines += ["| class | Dice | IoU |", "| --- | --- | --- |"]
        for name, d in val.get("dice", {}).items():
            lines.append(f"| {name} | {d:.4f} | {val['iou'][name]:.4f} |")
        lines += ["", f"Validation mean Dice **{val['mean_dice']:.4f}** (non-background)."]
    else:
        lines.append("No validation region (val_fraction = 0): the last model was kept.")
    stats = result.get("object_stats")
    if stats and stats.get("count"):
        lines += [
            "",
            f"Training objects: {stats['count']}, median size {stats['median']:.0f} voxels "
            f"(5th-95th percentile {stats['p5']:.0f}-{stats['p95']:.0f}).",
        ]
    if "loss_curve" in files:
        lines += [
            "",
            f"Loss curve: `{files['loss_curve']}`",
            "",
            f"![loss curve]({files['loss_curve']})",
        ]
    if "history" in files:
        lines += ["", f"History: `{files['history']}`"]
    return "\n".join(lines) + "\n"


@run_form
@flow(name="train-model", log_prints=True)
@flat_parameters(TrainParams, first=("images", "labels", "out", "resume"))
def train_model(params: TrainParams) -> dict[str, Any]:
    """Train a U-Net on annotated images and publish a report artifact."""
    configure()
    crash_earlier_attempts()
    result = train_task(params)
    create_markdown_artifact(
        report_markdown(result),
        key="train-model-report",
        description=f"training report for {params.out}",
    )
    return result
