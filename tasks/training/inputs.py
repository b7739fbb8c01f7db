"""Training pairs from files: whole images read into memory and checked to belong together."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.paths import TIFF_SUFFIXES
from tasks.store import is_remote, open_level, read_image_info
from unet_core.errors import ConfigError, InvalidVolumeError, VolumeNotFoundError

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


__all__ = ["load_pair", "load_pairs", "read_array"]
