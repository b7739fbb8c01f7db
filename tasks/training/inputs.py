"""Training pairs from files: whole images read into memory and checked to belong together."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.paths import TIFF_SUFFIXES, check_regular_file
from tasks.store import is_remote, open_level, read_image_info
from tasks.tiff import check_one_image
from unet_core.errors import (
    ConfigError,
    InvalidVolumeError,
    SegflowError,
    VolumeNotFoundError,
)

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
    check_regular_file(url)  # a FIFO or a device: named, never opened
    suffix = p.suffix.lower()
    try:
        if suffix in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(p) as tif:
                check_one_image(url, tif)  # not the first of several images
                return np.squeeze(tif.asarray())
        if suffix == ".npy":
            return np.load(p, allow_pickle=False)
        if suffix in PICTURE_SUFFIXES:
            from PIL import Image

            with Image.open(p) as im:
                return np.asarray(im)
    except SegflowError:
        raise
    except (OSError, ValueError) as exc:
        raise InvalidVolumeError(
            f"{p}: cannot read the image ({type(exc).__name__}: {exc})"
        ) from exc
    raise InvalidVolumeError(
        f"{p}: unsupported image format '{suffix}' (use TIFF, OME-Zarr, .npy or PNG)"
    )


def check_pair_kinds(image: str, labels: str, img: np.ndarray, lab: np.ndarray) -> None:
    """Refuse labels that look like an intensity image, or an image that looks like labels
    (swapped --image and --labels), naming the check that tripped."""
    from unet_core.targets import image_problem, label_problem

    hint = "(swapped --image and --labels? --trust-labels skips this check)"
    problem = label_problem(lab)
    if problem is not None:
        raise InvalidVolumeError(f"{labels}: these labels look like an image: {problem} {hint}")
    problem = image_problem(img)
    if problem is not None:
        raise InvalidVolumeError(f"{image}: this image looks like labels: {problem} {hint}")


def load_pair(image: str, labels: str, trust: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one training pair and check that image and labels belong together, that the
    labels hold at least one object (:func:`unet_core.targets.empty_problem`), and, unless
    ``trust``, that each looks like what it is said to be."""
    from unet_core.targets import empty_problem

    img, lab = read_array(image), read_array(labels)
    problem = empty_problem(lab)  # even with trust: all background teaches nothing
    if problem is not None:
        raise InvalidVolumeError(f"{labels}: {problem}")
    if not trust:
        check_pair_kinds(image, labels, img, lab)
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
    images: Sequence[str], labels: Sequence[str], trust: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if not images:
        raise ConfigError("give at least one --image with its --labels")
    if len(images) != len(labels):
        raise ConfigError(
            f"{len(images)} image(s) but {len(labels)} label image(s): give one --labels per "
            "--image, in the same order"
        )
    pairs = [load_pair(str(i), str(lab), trust) for i, lab in zip(images, labels, strict=True)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


__all__ = ["load_pair", "load_pairs", "read_array"]


def read_labels(path: str, name: str | None = None, image_ok: bool = True) -> np.ndarray:
    """A whole label image: a file (TIFF, .npy, PNG), an OME-Zarr image, or labels in a
    store named as ``STORE/labels/NAME[/0]`` or ``STORE`` plus ``name`` (those must be
    complete). ``image_ok=False`` refuses an OME-Zarr image given without a label name
    (the raw image is not a prediction)."""
    from tasks.paths import split_labels_path

    store, name = split_labels_path(str(path), name)
    if name is None:
        if not image_ok and _is_zarr(store):
            _refuse_image(store)
        return read_array(store)
    from tasks.reads import StrictArray
    from tasks.runstate import require_complete
    from tasks.store import LABELS_GROUP, get_array, open_group

    require_complete(store, f"{LABELS_GROUP}/{name}", f"'{name}' labels")
    root = open_group(store, "r")
    arr = get_array(root, f"{LABELS_GROUP}/{name}/0", store)
    return np.asarray(StrictArray(arr, store, f"{LABELS_GROUP}/{name}/0")[...])


def _refuse_image(store: str) -> None:
    import zarr

    from tasks.ngff import label_names
    from tasks.store import LABELS_GROUP, open_group

    group = open_group(store, "r").get(LABELS_GROUP)
    names = label_names(group) if isinstance(group, zarr.Group) else []
    have = (
        f"e.g. {store}/labels/{names[-1]}/0 (it has {', '.join(names)})"
        if names
        else "it has no labels yet"
    )
    raise InvalidVolumeError(
        f"{store} is an image, not a prediction: give its labels as STORE/labels/NAME/0 or "
        f"with --labels NAME, {have}"
    )
