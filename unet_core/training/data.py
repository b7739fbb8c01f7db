"""Training data: image/label pairs become targets, weight maps, normalised images and a
train/validation split (:func:`prepare`).

The validation region is a slab at the end of each image (or whole images when there are
at least :data:`HOLDOUT_IMAGES_FROM`); its labels are never trained on: its loss weights
are 0 and no patch is centred in it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from unet_core.errors import ConfigError, InvalidVolumeError, opt
from unet_core.geometry import Box, Coord
from unet_core.losses import class_frequencies, class_weights, weight_map
from unet_core.normalize import IntensityStats, apply_affine, compute_stats
from unet_core.targets import (
    LabelMode,
    Targets,
    class_names_for,
    n_classes_for,
    object_sizes,
    resolve_mode,
    to_targets,
)
from unet_core.training.config import TrainConfig

log = logging.getLogger(__name__)

#: Hold out whole images (rather than a slab of each) from this many training images on.
HOLDOUT_IMAGES_FROM = 5


@dataclass
class TrainingPair:
    """One image with its targets, ready for sampling and validation."""

    image: np.ndarray  # (C, *spatial) float32, normalised with the image's own statistics
    classes: np.ndarray  # (*spatial) uint8
    weight: np.ndarray  # (*spatial) float32, 0 = ignored (validation region)
    stats: IntensityStats
    affine: tuple[float, float]
    train_box: Box | None
    val_box: Box | None
    tables: dict[int, np.ndarray] = field(default_factory=dict)  # class -> flat indices

    @property
    def spatial(self) -> tuple[int, ...]:
        return tuple(self.classes.shape)


def _as_channels(image: np.ndarray, label: np.ndarray, index: int) -> np.ndarray:
    if image.shape == label.shape:
        return image[None]
    if image.ndim == label.ndim + 1 and image.shape[1:] == label.shape:
        return image
    raise InvalidVolumeError(
        f"training pair {index}: image {image.shape} and labels {label.shape} do not match "
        "(expected the same spatial shape, optionally with a leading channel axis)"
    )


def _stats(images: Sequence[np.ndarray]) -> list[IntensityStats]:
    return [compute_stats(im) for im in images]


def _pooled_stats(images: Sequence[np.ndarray]) -> IntensityStats:
    return compute_stats(*images)


def _split_axis(spatial: Sequence[int], net_ndim: int) -> int:
    lead = len(spatial) - net_ndim
    if lead and spatial[0] >= HOLDOUT_IMAGES_FROM:
        return 0  # a 2D network on a stack: hold out whole slices
    axes = range(lead, len(spatial))
    return max(axes, key=lambda a: (spatial[a], a))


def _limit_box(box: Box, max_voxels: int) -> Box:
    if box.size <= max_voxels:
        return box
    f = (max_voxels / box.size) ** (1.0 / box.ndim)
    shape = Coord(max(int(n * f), 1) for n in box.shape)
    return Box(box.begin + (box.shape - shape) // 2, shape)


def _plan_split(
    shapes: Sequence[tuple[int, ...]], config: TrainConfig
) -> list[tuple[Box | None, Box | None]]:
    """(train box, validation box) per image."""
    n = len(shapes)
    whole = [Box.of_shape(s) for s in shapes]
    if config.val_fraction <= 0:
        return [(b, None) for b in whole]
    if n >= HOLDOUT_IMAGES_FROM:
        k = max(1, round(n * config.val_fraction))
        held = set(np.random.default_rng(config.seed).permutation(n)[:k].tolist())
        return [
            (None, _limit_box(b, config.val_max_voxels)) if i in held else (b, None)
            for i, b in enumerate(whole)
        ]
    plan: list[tuple[Box | None, Box | None]] = []
    for shape, box in zip(shapes, whole, strict=True):
        axis = _split_axis(shape, config.ndim)
        extent = shape[axis]
        n_val = math.ceil(extent * config.val_fraction)
        if extent < 8 or n_val >= extent:
            plan.append((box, None))
            continue
        split = extent - n_val
        train_end = list(shape)
        train_end[axis] = split
        val_begin = [0] * len(shape)
        val_begin[axis] = split
        plan.append(
            (
                Box.from_bounds((0,) * len(shape), train_end),
                _limit_box(Box.from_bounds(val_begin, shape), config.val_max_voxels),
            )
        )
    return plan


@dataclass
class PreparedData:
    """The pairs of a run and what was derived from all of them together."""

    pairs: list[TrainingPair]
    mode: LabelMode
    n_classes: int
    class_names: list[str]
    foreground_class: int
    class_weight: np.ndarray
    training_stats: IntensityStats
    object_sizes: np.ndarray
    in_channels: int


def prepare(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray], config: TrainConfig
) -> PreparedData:
    """Targets, weight maps, normalisation and the train/validation split of the pairs."""
    if not images or len(images) != len(labels):
        raise ConfigError(
            f"training needs pairs of images and labels, got {len(images)} image(s) and "
            f"{len(labels)} label image(s)"
        )
    labels = [np.asarray(lab) for lab in labels]
    chans = [
        _as_channels(np.asarray(im), lab, i)
        for i, (im, lab) in enumerate(zip(images, labels, strict=True))
    ]
    in_channels = chans[0].shape[0]
    for i, (im, lab) in enumerate(zip(chans, labels, strict=True)):
        if im.shape[0] != in_channels:
            raise InvalidVolumeError(
                f"training pair {i} has {im.shape[0]} channels, pair 0 has {in_channels}"
            )
        if lab.ndim not in (2, 3):
            raise InvalidVolumeError(
                f"training pair {i}: labels of shape {lab.shape} are {lab.ndim}D; training "
                "takes 2D images (or 3D stacks)"
            )
        if lab.ndim < config.ndim:
            raise ConfigError(
                f"training pair {i}: a 2D image (labels of shape {lab.shape}) cannot train "
                f"a 3D network: give 3D stacks, or train a 2D network ({opt('ndim')} 2)"
            )
        if lab.size == 0:
            raise InvalidVolumeError(f"training pair {i} is empty")
    mode = resolve_mode(labels, config.label_mode)
    n_classes = config.n_classes if mode == "classes" and config.n_classes else 0
    n_classes = n_classes or n_classes_for(mode, labels)
    names = config.class_names or class_names_for(mode, n_classes)
    if len(names) != n_classes:
        raise ConfigError(f"{len(names)} class names were given for {n_classes} classes")
    fg = config.foreground_class if config.foreground_class is not None else 1
    if fg >= n_classes:
        raise ConfigError(f"foreground class {fg} is not one of the {n_classes} classes")
    targets = [_targets(lab, mode, n_classes, lab.ndim > config.ndim) for lab in labels]
    split = _plan_split([lab.shape for lab in labels], config)
    train_parts = [
        t.classes[tb.to_slices()] for t, (tb, _) in zip(targets, split, strict=True) if tb
    ]
    if not train_parts:
        raise ConfigError("no training data is left after holding out the validation images")
    freq = class_frequencies(train_parts, n_classes)
    cw = class_weights(freq, config.class_weighting)
    use_border = config.border_weight
    if use_border is None:
        use_border = mode != "classes" or n_classes == 2
    stats = _stats(chans)
    sizes = [object_sizes(t.instances) for t in targets if t.instances is not None]
    pairs: list[TrainingPair] = []
    for i, (im, t, st, (tb, vb)) in enumerate(zip(chans, targets, stats, split, strict=True)):
        objects = None
        if use_border and t.instances is not None:
            objects = np.where(t.classes == fg, t.instances, 0)
        w = _weight_map(t.classes, objects, cw, config)
        if vb is not None:
            # Never train on validation labels: outside the training box weights are 0.
            held = np.ones(t.classes.shape, dtype=bool)
            if tb is not None:
                held[tb.to_slices()] = False
            w[held] = 0.0
        affine = config.normalization.affine(st)
        pairs.append(
            TrainingPair(
                image=apply_affine(im, *affine),
                classes=t.classes,
                weight=w,
                stats=st,
                affine=affine,
                train_box=tb,
                val_box=vb,
            )
        )
        log.debug("pair %d: %s, train %s, validation %s", i, t.classes.shape, tb, vb)
    _build_tables(pairs, n_classes, config.seed)
    return PreparedData(
        pairs=pairs,
        mode=mode,
        n_classes=n_classes,
        class_names=list(names),
        foreground_class=fg,
        class_weight=cw,
        training_stats=_pooled_stats(chans),
        object_sizes=np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64),
        in_channels=in_channels,
    )


def _targets(label: np.ndarray, mode: LabelMode, n_classes: int, slicewise: bool) -> Targets:
    """Targets of one annotation; slice by slice (2D objects, 2D neighbourhoods) for a 2D
    network on a stack, with object ids kept unique across slices."""
    if not slicewise:
        return to_targets(label, mode, n_classes)
    parts = [to_targets(s, mode, n_classes) for s in label]
    classes = np.stack([p.classes for p in parts])
    if any(p.instances is None for p in parts):
        return Targets(classes, None)
    stacked, offset = [], 0
    for p in parts:
        assert p.instances is not None
        inst = p.instances.astype(np.int32, copy=True)
        inst[inst > 0] += offset
        offset = max(offset, int(inst.max(initial=0)))
        stacked.append(inst)
    return Targets(classes, np.stack(stacked))


def _weight_map(
    classes: np.ndarray, objects: np.ndarray | None, cw: np.ndarray, config: TrainConfig
) -> np.ndarray:
    if classes.ndim == config.ndim:
        return weight_map(classes, objects, cw, config.w0, config.border_sigma)
    # A 2D network on a stack: distances within each slice.
    return np.stack(
        [
            weight_map(
                classes[z], None if objects is None else objects[z], cw, config.w0,
                config.border_sigma,
            )
            for z in range(classes.shape[0])
        ]
    )  # fmt: skip


def _build_tables(
    pairs: Sequence[TrainingPair], n_classes: int, seed: int, cap: int = 50_000
) -> None:
    """Per pair and class, up to ``cap`` random voxel indices (within the training box)."""
    rng = np.random.default_rng([seed, 7])
    for pair in pairs:
        if pair.train_box is None:
            continue
        sub = pair.classes[pair.train_box.to_slices()]
        for k in range(n_classes):
            idx = np.flatnonzero(sub == k)
            if idx.size > cap:
                idx = np.sort(rng.choice(idx, cap, replace=False))
            if idx.size:
                pair.tables[k] = idx


__all__ = ["HOLDOUT_IMAGES_FROM", "PreparedData", "TrainingPair", "prepare"]
