"""The files a training run leaves beside its checkpoint, and its summary."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unet_core.training.loop import TrainResult
from unet_core.training.state import state_path


@dataclass(frozen=True)
class TrainingFiles:
    checkpoint: Path
    state: Path
    history: Path
    loss_curve: Path
    validation: Path | None


def report_paths(checkpoint: str | os.PathLike[str]) -> TrainingFiles:
    p = Path(checkpoint)
    return TrainingFiles(
        checkpoint=p,
        state=state_path(p),
        history=p.with_name(p.name + ".history.json"),
        loss_curve=p.with_name(p.name + ".loss.png"),
        validation=p.with_name(p.name + ".val.npz"),
    )


def write_loss_curve(result: TrainResult, path: str | os.PathLike[str]) -> Path:
    """PNG of the training loss per step (and smoothed) and the validation mean Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(result.losses, dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.arange(1, losses.size + 1)
    ax.plot(steps, losses, color="0.75", lw=0.8, label="loss per step")
    if losses.size >= 5:
        k = max(losses.size // 50, 5)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="C0", lw=1.5, label=f"loss (mean of {k})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    epochs = [h for h in result.history if h.get("mean_dice") is not None]
    handles, labels = ax.get_legend_handles_labels()
    if epochs:
        ax2 = ax.twinx()
        ax2.plot(
            [h["step"] for h in epochs],
            [h["mean_dice"] for h in epochs],
            "o-",
            color="C1",
            label="validation Dice",
        )
        ax2.axvline(result.best_step, color="C1", ls=":", lw=1)
        ax2.set_ylabel("validation mean Dice")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="center right", fontsize=8)
    ax.set_title(f"training: best step {result.best_step}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def summary(result: TrainResult, files: TrainingFiles | None = None) -> dict[str, Any]:
    """What a run reached, as JSON-ready values (for the CLI and the flow's artifact)."""
    out: dict[str, Any] = {
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
        "digest": result.digest,
        "steps": result.history[-1]["step"] if result.history else 0,
        "best_step": result.best_step,
        "best_mean_dice": result.best_metric,
        "validation": result.metrics,
        "final_train_loss": result.history[-1].get("train_loss") if result.history else None,
        "seconds": round(result.seconds, 1),
        "label_mode": result.meta.training.get("label_mode"),
        "class_names": result.meta.class_names,
        "patch": result.meta.training.get("patch"),
        "network": {
            "ndim": result.unet_config.ndim,
            "depth": result.unet_config.depth,
            "base_channels": result.unet_config.base_channels,
            "n_classes": result.unet_config.n_classes,
            "context": result.unet_config.context,
        },
        "object_stats": result.meta.object_stats.model_dump() if result.meta.object_stats else None,
    }
    if files is not None:
        out["files"] = {
            k: str(v) for k, v in vars(files).items() if v is not None and Path(v).exists()
        }
    return out


def write_report(result: TrainResult, checkpoint: str | os.PathLike[str]) -> TrainingFiles:
    """History JSON, loss-curve PNG and validation predictions beside the checkpoint."""
    files = report_paths(checkpoint)
    files.history.write_text(
        json.dumps({"losses": result.losses, "epochs": result.history}, indent=1)
    )
    write_loss_curve(result, files.loss_curve)
    validation = files.validation
    if result.validation and validation is not None:
        arrays: dict[str, Any] = {}
        for k, v in enumerate(result.validation):
            arrays[f"pair{k}_index"] = np.asarray(v.pair)
            arrays[f"pair{k}_offset"] = np.asarray(v.box.offset)
            arrays[f"pair{k}_shape"] = np.asarray(v.box.shape)
            arrays[f"pair{k}_target"] = v.target
            arrays[f"pair{k}_prediction"] = np.argmax(v.probabilities, axis=0).astype(np.uint8)
            arrays[f"pair{k}_probabilities"] = v.probabilities
        tmp = validation.with_name(validation.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, validation)
    else:
        validation = None
    return TrainingFiles(files.checkpoint, files.state, files.history, files.loss_curve, validation)


__all__ = ["TrainingFiles", "report_paths", "summary", "write_loss_curve", "write_report"]
