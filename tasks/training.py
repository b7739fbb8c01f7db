"""Training from files: read image/label pairs, train, write the checkpoint and its report.

Pairs are TIFF (also OME-TIFF), OME-Zarr images (local or ``s3://``, level 0), NumPy
``.npy`` files or PNG/JPEG images. Everything a run writes sits beside the checkpoint::

    model.ckpt                 the best model (config, normalisation, classes, object sizes)
    model.ckpt.state.pt        resume state of the last epoch (optimizer, step, random state)
    model.ckpt.history.json    losses per step and metrics per epoch
    model.ckpt.loss.png        the loss curve and validation Dice
    model.ckpt.val.npz         validation region(s): target, prediction, probabilities

Plain functions only; the Prefect task that wraps :func:`run_training` is in
:mod:`flows.train`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.paths import TIFF_SUFFIXES
from tasks.store import is_remote, open_level, read_image_info
from unet_core.errors import ConfigError, InvalidVolumeError, VolumeNotFoundError
from unet_core.train import TrainConfig, TrainProgress, TrainResult, state_path, train

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _is_zarr(path: str) -> bool:
    p = path.rstrip("/")
    if p.endswith(".zarr") or is_remote(p):
        return True
    return os.path.isdir(p) and (
        os.path.isfile(os.path.join(p, "zarr.json")) or os.path.isfile(os.path.join(p, ".zattrs"))
    )


def read_array(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a whole image (TIFF, OME-Zarr level 0, .npy, PNG/JPEG) into memory.

    Singleton axes of TIFFs are dropped; an OME-Zarr image keeps a channel axis only when it
    has more than one channel.
    """
    url = str(path)
    if _is_zarr(url):
        info = read_image_info(url)
        data = np.asarray(open_level(info)[...])
        c = info.channel_axis
        if c is not None and data.shape[c] == 1:
            data = np.take(data, 0, axis=c)
        return data
    p = Path(url)
    if not p.exists():
        raise VolumeNotFoundError(f"{p}: no such file")
    suffix = p.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            return np.squeeze(tifffile.imread(p))
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if suffix in PICTURE_SUFFIXES:
            from PIL import Image

            with Image.open(p) as im:
                return np.asarray(im)
    except (OSError, ValueError) as exc:
        raise InvalidVolumeError(
            f"{p}: cannot read the image ({type(exc).__name__}: {exc})"
        ) from exc
    raise InvalidVolumeError(
        f"{p}: unsupported image format '{suffix}' (use TIFF, OME-Zarr, .npy or PNG)"
    )


def load_pair(image: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one training pair and check that image and labels belong together."""
    img, lab = read_array(image), read_array(labels)
    if lab.ndim == 3 and lab.shape[-1] in (3, 4) and img.shape[:2] == lab.shape[:2]:
        raise InvalidVolumeError(f"{labels}: labels must be a single-channel image, not RGB")
    if img.ndim == lab.ndim + 1 and img.shape[:-1] == lab.shape and img.shape[-1] <= 4:
        img = np.moveaxis(img, -1, 0)  # colour last (PNG, RGB TIFF) -> channels first
    if img.shape != lab.shape and not (img.ndim == lab.ndim + 1 and img.shape[1:] == lab.shape):
        raise InvalidVolumeError(
            f"{labels}: labels of shape {lab.shape} do not match the image {image} of shape "
            f"{img.shape}"
        )
    if lab.ndim not in (2, 3):
        raise InvalidVolumeError(f"{labels}: labels must be 2D or 3D, not of shape {lab.shape}")
    return img, lab


def load_pairs(
    images: Sequence[str], labels: Sequence[str]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not images:
        raise ConfigError("give at least one --image with its --labels")
    if len(images) != len(labels):
        raise ConfigError(
            f"{len(images)} image(s) but {len(labels)} label image(s): give one --labels per "
            "--image, in the same order"
        )
    pairs = [load_pair(str(i), str(lab)) for i, lab in zip(images, labels, strict=True)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------------- the report


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


def run_training(
    images: Sequence[str],
    labels: Sequence[str],
    out: str | os.PathLike[str],
    config: TrainConfig | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: str | os.PathLike[str] | None = None,
) -> tuple[TrainResult, TrainingFiles]:
    """Load the pairs, train, and write the checkpoint with its report files."""
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; --out names the checkpoint file to write")
    imgs, labs = load_pairs(images, labels)
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
