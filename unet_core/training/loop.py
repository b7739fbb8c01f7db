"""The training loop: :func:`train` runs the steps, validates each epoch and keeps the best.

Every step cuts a batch (:mod:`~unet_core.training.sampler`), runs the U-Net (dropout at the
bottom), a weighted softmax cross-entropy (or Dice) and Adam; every epoch validates
(:mod:`~unet_core.training.validation`), writes the checkpoint when the model improved and
saves the :class:`~unet_core.training.state.RunState` beside it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from unet_core.checkpoint import CheckpointMeta, save_checkpoint
from unet_core.config import UNetConfig
from unet_core.devices import resolve_device
from unet_core.errors import ConfigError
from unet_core.geometry import Box
from unet_core.losses import segmentation_loss
from unet_core.model import UNet
from unet_core.targets import object_stats
from unet_core.training.config import TrainConfig
from unet_core.training.data import PreparedData, prepare
from unet_core.training.sampler import PatchSampler, batches, patch_shape
from unet_core.training.state import RunState
from unet_core.training.validation import ValidationPrediction, validate


@dataclass(frozen=True)
class TrainProgress:
    """What a progress callback is told after every step."""

    step: int  # steps done
    steps: int
    loss: float  # smoothed training loss
    metric: float | None  # last validation mean Dice (non-background classes)
    best: float | None
    steps_per_s: float
    lr: float
    event: Literal["step", "epoch"] = "step"


@dataclass
class TrainResult:
    model: UNet  # the best model (eval mode, CPU)
    meta: CheckpointMeta
    unet_config: UNetConfig
    history: list[dict[str, Any]]  # one record per epoch
    losses: list[float]  # per step
    best_step: int
    best_metric: float | None
    validation: list[ValidationPrediction]
    seconds: float
    checkpoint: Path | None = None
    digest: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)  # validation report of the best


def network(config: TrainConfig, data: PreparedData) -> UNetConfig:
    """The U-Net a run trains: the configured one, sized for the data's channels and classes."""
    return UNetConfig(
        ndim=config.ndim,
        in_channels=data.in_channels,
        n_classes=data.n_classes,
        depth=config.depth,
        base_channels=config.base_channels,
        padding=config.padding,
        norm=config.norm,
        dropout=config.dropout,
    )


def train(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    config: TrainConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: str | os.PathLike[str] | None = None,
    sources: Sequence[str] | None = None,
) -> TrainResult:
    """Train a U-Net on ``images`` (spatial or channel-first arrays) and ``labels``.

    With ``out``, the best checkpoint (by validation mean Dice; the last one without
    validation) is written there whenever it improves, and the resume state beside it.
    ``resume`` continues a run from a checkpoint's resume state, or, when the checkpoint
    has none, starts from its weights (fine-tuning). ``sources`` name the images in the
    checkpoint's metadata.
    """
    config = config or TrainConfig()
    started = time.perf_counter()
    data = prepare(images, labels, config)
    unet = network(config, data)
    in_shape = patch_shape(config, unet, data)
    sampler = PatchSampler(data, unet, in_shape, config)
    device = resolve_device(config.device)
    amp_dtype = _amp_dtype(device, config)
    fp16 = amp_dtype == torch.float16
    if resume is None:
        state = RunState.start(unet, config, device, fp16)
    else:
        state = RunState.resume(resume, unet, config, device, fp16)
    meta = _MetaWriter(config, data, unet, in_shape, sources, device, started)

    has_val = any(p.val_box is not None for p in data.pairs)
    epoch = config.epoch_steps
    validation: list[ValidationPrediction] = []
    smoothed: float | None = None
    rate = _StepRate(state.step)
    last_metric = state.history[-1].get("mean_dice") if state.history else None
    epoch_losses: list[float] = []
    digest = ""
    state.model.train()
    for x, y, w in batches(sampler, state.step, config.steps, prefetch=device.type == "cuda"):
        lr = state.lr
        value = _step(state, (x, y, w), lr, device, amp_dtype)
        epoch_losses.append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        done = state.step
        now, steps_per_s = rate.tick(done)
        end_of_epoch = done % epoch == 0 or done == config.steps
        if end_of_epoch:
            record: dict[str, Any] = {
                "step": done,
                "train_loss": float(np.mean(epoch_losses)) if epoch_losses else None,
                "lr": lr,
                "seconds": round(now - started, 2),
            }
            epoch_losses = []
            improved = not has_val
            if has_val:
                report, preds = validate(state.model, data, device, amp_dtype is not None)
                state.model.train()
                record["validation"] = report
                record["mean_dice"] = report["mean_dice"]
                last_metric = report["mean_dice"]
                if state.best_metric is None or report["mean_dice"] > state.best_metric:
                    improved = True
                    state.best_metric = report["mean_dice"]
                    validation = preds
            state.history.append(record)
            if improved:
                state.mark_best()
                if out is not None:
                    digest = save_checkpoint(out, state.model, meta(done, state.best_report))
            if out is not None:
                state.save(out)
        if progress is not None:
            progress(
                TrainProgress(
                    step=done,
                    steps=config.steps,
                    loss=float(smoothed),
                    metric=last_metric,
                    best=state.best_metric,
                    steps_per_s=steps_per_s,
                    lr=lr,
                    event="epoch" if end_of_epoch else "step",
                )
            )

    final = state.best_model()
    report = state.best_report
    if has_val and not validation:
        # A resumed run that found no better model: predict with the best one again.
        report, validation = validate(final, data, torch.device("cpu"), False)
    final_meta = meta(state.best_step, report)
    if out is not None and not digest:
        digest = save_checkpoint(out, final, final_meta)
    return TrainResult(
        model=final,
        meta=final_meta,
        unet_config=unet,
        history=state.history,
        losses=state.losses,
        best_step=state.best_step,
        best_metric=state.best_metric,
        validation=validation,
        seconds=time.perf_counter() - started,
        checkpoint=Path(out) if out is not None else None,
        digest=digest,
        metrics=report,
    )


def _step(
    state: RunState,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    lr: float,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    """One optimizer step on ``batch`` at learning rate ``lr``; returns its loss."""
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    x, y, w = batch
    if device.type == "cuda":
        x, y, w = (t.pin_memory().to(device, non_blocking=True) for t in (x, y, w))
    with _autocast(device, amp_dtype):
        logits = state.model(x)
    loss = segmentation_loss(state.config.loss, logits.float(), y, w)
    if not torch.isfinite(loss):
        raise ConfigError(
            f"the training loss became {loss.item()} at step {state.step + 1}; "
            "try a lower learning rate"
        )
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    value = float(loss.detach())
    state.losses.append(value)
    state.step += 1
    return value


class _StepRate:
    """Steps per second over the last 50 steps."""

    def __init__(self, start: int) -> None:
        self.window: list[tuple[float, int]] = [(time.perf_counter(), start)]

    def tick(self, done: int) -> tuple[float, float]:
        """Record that ``done`` steps are done; returns (now, steps per second)."""
        now = time.perf_counter()
        self.window.append((now, done))
        self.window = self.window[-50:]
        (t0, s0), (t1, s1) = self.window[0], self.window[-1]
        return now, (s1 - s0) / max(t1 - t0, 1e-9)


class _MetaWriter:
    """The checkpoint metadata of a run at a given step."""

    def __init__(
        self,
        config: TrainConfig,
        data: PreparedData,
        unet: UNetConfig,
        in_shape: tuple[int, ...],
        sources: Sequence[str] | None,
        device: torch.device,
        started: float,
    ) -> None:
        self.config = config
        self.data = data
        self.device = device
        self.started = started
        self.object_stats = object_stats(data.object_sizes)
        self.base = {
            "label_mode": data.mode,
            "patch": list(in_shape),
            "output_patch": list(unet.output_shape(in_shape)),
            "class_weights": [float(w) for w in data.class_weight],
            "config": config.model_dump(mode="json"),
            "sources": list(sources) if sources else None,
            "images": [
                {
                    "shape": list(p.spatial),
                    "stats": p.stats.model_dump(),
                    "train_box": _box_json(p.train_box),
                    "validation_box": _box_json(p.val_box),
                }
                for p in data.pairs
            ],
        }

    def __call__(self, step: int, report: dict[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(
            class_names=self.data.class_names,
            normalization=self.config.normalization,
            training_stats=self.data.training_stats,
            object_stats=self.object_stats,
            foreground_class=self.data.foreground_class,
            training={
                **self.base,
                "step": step,
                "steps": self.config.steps,
                "seed": self.config.seed,
                "device": str(self.device),
                "validation": report,
                "seconds": round(time.perf_counter() - self.started, 2),
            },
        )


def _amp_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    if device.type != "cuda" or not config.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _box_json(box: Box | None) -> dict[str, list[int]] | None:
    return None if box is None else {"offset": list(box.offset), "shape": list(box.shape)}


__all__ = ["TrainProgress", "TrainResult", "network", "train"]
