r"""Training the U-Net on annotated images: patches, augmentation, weighted loss, checkpoints.

:func:`train` works on NumPy arrays (loading files is :mod:`tasks.training`'s job)::

    images + labels ──▶ targets (class ids, objects)  ──▶ weight map w(x) per image
          │                                                (0 on the validation region)
          ├──▶ global intensity statistics per image ──▶ normalised once, never per patch
          ▼
    every step: random valid-size patches (class-balanced centres), one random warp each
    (flip, rotation, zoom, elastic) for image, labels and weights; grey-value changes
    ──▶ U-Net (dropout at the bottom) ──▶ weighted softmax cross-entropy (or Dice) ──▶ Adam
          │
    every epoch: predict the held-out region with the inference machinery (the same tiles
    and numerics as ``segflow segment``) ──▶ Dice / IoU per class ──▶ best checkpoint

The validation region is a slab at the end of each image (or whole images when there are
at least five); its labels are never trained on: its loss weights are 0 and no patch is
centred in it. Its prediction is made from the full image (context reaches across the
split), exactly as segmenting the whole image would make it, so a checkpoint reproduces
its validation prediction bit for bit on CPU.

Runs are deterministic for a seed: the patches of step ``s`` come from a generator seeded
with ``(seed, s)``, and the side file ``<checkpoint>.state.pt`` (optimizer, step, random
state, history; read with ``weights_only=True``) lets an interrupted run continue where its
last epoch ended, with the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from unet_core.augment import (
    AugmentConfig,
    box_at,
    centre_crop_coordinates,
    grey_values,
    patch_coordinates,
    warp,
)
from unet_core.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from unet_core.config import Norm, Padding, UNetConfig
from unet_core.errors import CheckpointError, ConfigError, InvalidVolumeError
from unet_core.geometry import Box, plan_tiles
from unet_core.losses import (
    ClassWeighting,
    LossKind,
    class_frequencies,
    class_weights,
    segmentation_loss,
    weight_map,
)
from unet_core.metrics import confusion_matrix, report_from_confusion
from unet_core.model import UNet
from unet_core.normalize import IntensityStats, Normalization, StatsAccumulator, apply_affine
from unet_core.predict import Predictor, plan_box, read_mirrored, resolve_device, softmax
from unet_core.targets import (
    LabelMode,
    Targets,
    class_names_for,
    n_classes_for,
    object_sizes,
    object_stats,
    resolve_mode,
    to_targets,
)

log = logging.getLogger(__name__)

STATE_FORMAT = "segflow-train-state"
STATE_VERSION = 1
#: Hold out whole images (rather than a slab of each) from this many training images on.
HOLDOUT_IMAGES_FROM = 5
#: Default input patch per network dimensionality (rounded up to a valid size).
DEFAULT_PATCH = {2: (252, 252), 3: (116, 132, 132)}


class TrainConfig(BaseModel):
    """Everything that decides a training run. The defaults train a small 2D net that
    reaches a useful model on one 512×512 image in a few minutes on two CPU cores;
    :meth:`paper` gives the network of Ronneberger et al. (2015)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- the network
    ndim: Literal[2, 3] = Field(2, description="2 (slice by slice on volumes) or 3.")
    depth: int = Field(3, ge=1, le=6, description="Poolings (paper: 4).")
    base_channels: int = Field(16, ge=1, le=512, description="Channels of level 1 (paper: 64).")
    norm: Norm = Field(
        "batch", description="Normalisation after each convolution ('batch' is tile-exact)."
    )
    dropout: float = Field(
        0.2, ge=0.0, lt=1.0, description="Dropout at the end of the contracting path."
    )
    padding: Padding = Field("valid", description="'valid' (paper) or 'same' convolutions.")
    # -- what the labels mean
    label_mode: LabelMode = Field(
        "auto",
        description="How labels become classes: classes, binary, instances (touching objects "
        "separated by a gap), boundary (background/interior/boundary) or auto.",
    )
    n_classes: int | None = Field(
        None, ge=2, le=256, description="Classes for label_mode 'classes' (default: max + 1)."
    )
    class_names: list[str] | None = Field(None, description="Names of the classes.")
    foreground_class: int | None = Field(
        None, ge=0, description="Class whose connected components are objects (default 1)."
    )
    # -- patches
    patch: tuple[int, ...] | None = Field(
        None,
        description="Input patch per network axis, rounded up to a valid size "
        "(default 252² in 2D, 116×132² in 3D; smaller images get smaller patches).",
    )
    batch_size: int = Field(4, ge=1, le=1024, description="Patches per step.")
    sampling: Literal["uniform", "balanced"] = Field(
        "balanced", description="Patch centres: uniform, or on each class equally often."
    )
    # -- optimisation
    steps: int = Field(600, ge=1, le=10_000_000, description="Optimizer steps.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate (cosine decay).")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="Adam weight decay.")
    warmup: int = Field(20, ge=0, description="Steps of linear learning-rate warm-up.")
    # -- loss
    loss: LossKind = Field("ce", description="Weighted cross-entropy, soft Dice, or both.")
    class_weighting: ClassWeighting = Field(
        "sqrt", description="w_c: balance class frequencies by 1/sqrt(f), 1/f, or not."
    )
    border_weight: bool | None = Field(
        None,
        description="Add the paper's border term w0·exp(-(d1+d2)²/2σ²) (default: on when "
        "the labels have objects, i.e. binary, instances and boundary modes).",
    )
    w0: float = Field(10.0, ge=0, le=1000, description="Border weight w0 (paper: 10).")
    border_sigma: float = Field(5.0, gt=0, le=100, description="Border σ in pixels (paper: 5).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    normalization: Normalization = Field(default_factory=Normalization)
    # -- validation
    val_fraction: float = Field(
        0.15, ge=0.0, lt=1.0, description="Held-out fraction for validation (0: none)."
    )
    val_every: int | None = Field(
        None, ge=1, description="Steps per epoch (validation + checkpoint); default steps/10."
    )
    val_max_voxels: int = Field(
        4_000_000, ge=1, description="Largest validation region per image (centre kept)."
    )
    # -- runtime
    seed: int = Field(0, ge=0, description="Seed of weights, patches and augmentation.")
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    amp: bool = Field(True, description="bf16/fp16 autocast on CUDA.")

    @field_validator("patch")
    @classmethod
    def _positive(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or any(n < 1 for n in v)):
            raise ValueError("patch sizes must be positive")
        return v

    @classmethod
    def paper(cls, **overrides: Any) -> TrainConfig:
        """The paper's network: depth 4, 64 channels, 572² tiles (388² output), batch 1,
        dropout 0.5. In 3D, the 3D U-Net of Çiçek et al. (2016): depth 3, 32 channels,
        116×132² tiles (28×44² output)."""
        if overrides.get("ndim", 2) == 2:
            values: dict[str, Any] = {"depth": 4, "base_channels": 64, "patch": (572, 572)}
        else:
            values = {"depth": 3, "base_channels": 32, "patch": (116, 132, 132)}
        values.update({"dropout": 0.5, "batch_size": 1, "lr": 3e-4})
        values.update(overrides)
        return cls.model_validate(values)

    @property
    def epoch_steps(self) -> int:
        return self.val_every or max(min(self.steps // 10, 500), 1)


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
class ValidationPrediction:
    """Held-out region of one training image and the best model's prediction of it."""

    pair: int
    box: Box
    target: np.ndarray  # class ids
    probabilities: np.ndarray  # (n_classes, *box.shape), float32


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


def state_path(checkpoint: str | os.PathLike[str]) -> Path:
    """The resume side file of a checkpoint."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".state.pt")


# ------------------------------------------------------------------------ the data


@dataclass
class _Pair:
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
    out = []
    for im in images:
        rng = (float(im.min()), float(im.max())) if im.size else None
        acc = StatsAccumulator(im.dtype, value_range=rng)
        acc.add(im)
        out.append(acc.result())
    return out


def _pooled_stats(images: Sequence[np.ndarray]) -> IntensityStats:
    dtype = np.result_type(*[im.dtype for im in images])
    lo = min(float(im.min()) for im in images)
    hi = max(float(im.max()) for im in images)
    acc = StatsAccumulator(dtype, value_range=(lo, hi))
    for im in images:
        acc.add(im.astype(dtype, copy=False))
    return acc.result()


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
    shape = tuple(max(int(n * f), 1) for n in box.shape)
    offset = tuple(b + (n - s) // 2 for b, n, s in zip(box.begin, box.shape, shape, strict=True))
    return Box(offset, shape)


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
    pairs: list[_Pair]
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
        if lab.ndim not in (2, 3) or lab.ndim < config.ndim:
            raise InvalidVolumeError(
                f"training pair {i}: labels of shape {lab.shape} cannot train a "
                f"{config.ndim}D network (2D or 3D images are supported)"
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
    pairs: list[_Pair] = []
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
            _Pair(
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


def _build_tables(pairs: Sequence[_Pair], n_classes: int, seed: int, cap: int = 50_000) -> None:
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


# ------------------------------------------------------------------------- patches


class PatchSampler:
    """Batches of (image, class ids, weights) patches; step ``s`` is a pure function of
    ``(seed, s)``, whatever happened before (resumable, order-independent)."""

    def __init__(
        self,
        data: PreparedData,
        unet: UNetConfig,
        in_shape: tuple[int, ...],
        config: TrainConfig,
    ) -> None:
        self.data = data
        self.config = config
        self.in_shape = in_shape
        self.out_shape = unet.output_shape(in_shape)
        self.trainable = [i for i, p in enumerate(data.pairs) if p.train_box is not None]
        boxes = [data.pairs[i].train_box for i in self.trainable]
        sizes = np.array([b.size for b in boxes if b is not None], dtype=np.float64)
        self.pair_p = sizes / sizes.sum()
        self.classes = sorted({k for i in self.trainable for k in data.pairs[i].tables})

    def _centre(self, rng: np.random.Generator) -> tuple[_Pair, tuple[int, ...]]:
        pairs = self.data.pairs
        if self.config.sampling == "balanced" and self.classes:
            k = self.classes[int(rng.integers(len(self.classes)))]
            holders = [i for i in self.trainable if k in pairs[i].tables]
            counts = np.array([pairs[i].tables[k].size for i in holders], dtype=float)
            pair = pairs[holders[int(rng.choice(len(holders), p=counts / counts.sum()))]]
            table = pair.tables[k]
            box = pair.train_box
            assert box is not None
            flat = int(table[int(rng.integers(table.size))])
            local = np.unravel_index(flat, box.shape)
            return pair, tuple(int(b + i) for b, i in zip(box.begin, local, strict=True))
        pair = pairs[self.trainable[int(rng.choice(len(self.trainable), p=self.pair_p))]]
        box = pair.train_box
        assert box is not None
        return pair, tuple(int(rng.integers(b, e)) for b, e in zip(box.begin, box.end, strict=True))

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pair, centre = self._centre(rng)
        lead = len(pair.spatial) - len(self.in_shape)
        image, classes, weight = pair.image, pair.classes, pair.weight
        if lead:  # a 2D network on a volume: the patch lies in one slice
            z = centre[0]
            image, classes, weight = image[:, z], classes[z], weight[z]
            centre = centre[1:]
        aug = self.config.augment
        coords = patch_coordinates(centre, self.in_shape, rng, aug)
        if coords is None:
            box = box_at(centre, self.in_shape)
            out_box = Box(
                tuple(
                    b + (t - o) // 2
                    for b, t, o in zip(box.begin, self.in_shape, self.out_shape, strict=True)
                ),
                self.out_shape,
            )
            x = read_mirrored(image, box, classes.shape, leading=1)
            y = read_mirrored(classes, out_box, classes.shape)
            w = read_mirrored(weight, out_box, classes.shape)
        else:
            inner = centre_crop_coordinates(coords, self.out_shape)
            x = warp(image, coords, 3, leading=1)
            y = warp(classes, inner, 0)
            w = np.clip(warp(weight, inner, 1), 0.0, None)
            x = grey_values(x, rng, aug)
        return (
            np.ascontiguousarray(x, dtype=np.float32),
            np.ascontiguousarray(y, dtype=np.int64),
            np.ascontiguousarray(w, dtype=np.float32),
        )

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.config.seed, step])
        parts = [self.sample(rng) for _ in range(self.config.batch_size)]
        return (
            torch.from_numpy(np.stack([p[0] for p in parts])),
            torch.from_numpy(np.stack([p[1] for p in parts])),
            torch.from_numpy(np.stack([p[2] for p in parts])),
        )


def patch_shape(config: TrainConfig, unet: UNetConfig, data: PreparedData) -> tuple[int, ...]:
    """The valid input patch: the requested (or default) one, shrunk where every training
    region is smaller than its output (a larger patch would only see mirrored data)."""
    want = config.patch or DEFAULT_PATCH[config.ndim]
    if len(want) == 1:
        want = want * config.ndim
    if len(want) != config.ndim:
        raise ConfigError(f"patch {want} has {len(want)} axes for a {config.ndim}D network")
    extents = [0] * config.ndim
    for p in data.pairs:
        if p.train_box is not None:
            net = p.train_box.shape[-config.ndim :]
            extents = [max(e, n) for e, n in zip(extents, net, strict=True)]
    shape = []
    for a, n in enumerate(want):
        size = unet.valid_input_size_1d(n)
        if unet.output_shape((size,) * config.ndim)[0] > extents[a]:
            lost = size - unet.output_shape((size,) * config.ndim)[0]
            size = min(size, unet.valid_input_size_1d(extents[a] + lost))
        shape.append(size)
    return tuple(shape)


# -------------------------------------------------------------------- validation


def _validate(
    model: UNet, data: PreparedData, device: torch.device, amp: bool
) -> tuple[dict[str, Any], list[ValidationPrediction]]:
    """Predict every validation region (as segmenting the whole image would) and score it."""
    precision: Literal["auto", "fp32"] = "auto" if amp else "fp32"
    predictor = Predictor(model, device=device, precision=precision)
    cm = np.zeros((data.n_classes, data.n_classes), dtype=np.int64)
    preds = []
    for i, pair in enumerate(data.pairs):
        if pair.val_box is None:
            continue
        probs = predict_region(predictor, pair.image, pair.val_box)
        target = pair.classes[pair.val_box.to_slices()]
        cm += confusion_matrix(np.argmax(probs, axis=0), target, data.n_classes)
        preds.append(ValidationPrediction(i, pair.val_box, target, probs))
    return report_from_confusion(cm, data.class_names), preds


def predict_region(predictor: Predictor, image: np.ndarray, box: Box) -> np.ndarray:
    """Class probabilities over ``box`` of a normalised (C, *spatial) image, read with the
    network's context around it (mirrored only at the image border)."""
    spatial = image.shape[1:]
    spec = predictor.spec(len(spatial))
    if predictor.mode == "invariant":  # the tiles `segflow segment` computes these voxels with
        read, tiles = plan_box(spec, spatial, box, "invariant")
    else:
        tile = spec.default_tile_shape() if box.size > 2_000_000 else None
        read, tiles = plan_tiles(spec, box, tile)
    data = read_mirrored(image, read, spatial, leading=1)
    return softmax(predictor.logits(np.ascontiguousarray(data), read, tiles, box))


# -------------------------------------------------------------------------- train


def _lr_at(step: int, config: TrainConfig) -> float:
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(config.steps - config.warmup, 1)
    t = min(max(step - config.warmup, 0) / span, 1.0)
    return config.lr * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _amp_dtype(device: torch.device, config: TrainConfig) -> torch.dtype | None:
    if device.type != "cuda" or not config.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _model_from(unet: UNetConfig, state: dict[str, torch.Tensor]) -> UNet:
    """A model with these weights, built without touching the global random state (so
    that saving or loading a checkpoint mid-run does not change the dropout masks)."""
    with torch.random.fork_rng(devices=[]):
        model = UNet(unet)
    model.load_state_dict(state)
    return model


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


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
    unet = UNetConfig(
        ndim=config.ndim,
        in_channels=data.in_channels,
        n_classes=data.n_classes,
        depth=config.depth,
        base_channels=config.base_channels,
        padding=config.padding,
        norm=config.norm,
        dropout=config.dropout,
    )
    in_shape = patch_shape(config, unet, data)
    sampler = PatchSampler(data, unet, in_shape, config)
    device = resolve_device(config.device)
    amp_dtype = _amp_dtype(device, config)

    _seed_all(config.seed)
    model = UNet(unet).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    start = 0
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best_metric: float | None = None
    best_step = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_report: dict[str, Any] = {}
    validation: list[ValidationPrediction] = []
    if resume is not None:
        start, history, losses, best_metric, best_step = _resume(
            Path(resume), model, optimizer, scaler, unet, config
        )
        if start and best_metric is not None:
            # The checkpoint resumed from holds that run's best model so far.
            with torch.random.fork_rng(devices=[]):
                best_model, _ = load_checkpoint(resume)
            best_state = _cpu_state(best_model)
        if history:
            best_report = next(
                (h["validation"] for h in history if h["step"] == best_step and "validation" in h),
                {},
            )

    meta_base = {
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
    obj_stats = object_stats(data.object_sizes)

    def make_meta(step: int, report: dict[str, Any]) -> CheckpointMeta:
        return CheckpointMeta(
            class_names=data.class_names,
            normalization=config.normalization,
            training_stats=data.training_stats,
            object_stats=obj_stats,
            foreground_class=data.foreground_class,
            training={
                **meta_base,
                "step": step,
                "steps": config.steps,
                "seed": config.seed,
                "device": str(device),
                "validation": report,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )

    has_val = any(p.val_box is not None for p in data.pairs)
    epoch = config.epoch_steps
    smoothed: float | None = None
    window: list[tuple[float, int]] = [(time.perf_counter(), start)]
    last_metric = history[-1].get("mean_dice") if history else None
    epoch_losses: list[float] = []
    digest = ""
    model.train()
    batches = _batches(sampler, start, config.steps, prefetch=device.type == "cuda")
    for step, (x, y, w) in zip(range(start, config.steps), batches, strict=True):
        lr = _lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if device.type == "cuda":
            x, y, w = (t.pin_memory().to(device, non_blocking=True) for t in (x, y, w))
        with _autocast(device, amp_dtype):
            logits = model(x)
        loss = segmentation_loss(config.loss, logits.float(), y, w)
        if not torch.isfinite(loss):
            raise ConfigError(
                f"the training loss became {loss.item()} at step {step + 1}; "
                "try a lower learning rate"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = float(loss.detach())
        losses.append(value)
        epoch_losses.append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        done = step + 1
        now = time.perf_counter()
        window.append((now, done))
        window = window[-50:]
        rate = (window[-1][1] - window[0][1]) / max(window[-1][0] - window[0][0], 1e-9)
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
                report, preds = _validate(model, data, device, amp_dtype is not None)
                model.train()
                record["validation"] = report
                record["mean_dice"] = report["mean_dice"]
                last_metric = report["mean_dice"]
                if best_metric is None or report["mean_dice"] > best_metric:
                    improved = True
                    best_metric = report["mean_dice"]
                    validation = preds
                    best_report = report
            history.append(record)
            if improved:
                best_step = done
                best_state = _cpu_state(model)
                if out is not None:
                    digest = _save_best(out, unet, best_state, make_meta(done, best_report))
            if out is not None:
                _save_state(
                    out, model, optimizer, scaler, unet, config, done, history, losses,
                    best_metric, best_step,
                )  # fmt: skip
        if progress is not None:
            progress(
                TrainProgress(
                    step=done,
                    steps=config.steps,
                    loss=float(smoothed),
                    metric=last_metric,
                    best=best_metric,
                    steps_per_s=rate,
                    lr=lr,
                    event="epoch" if end_of_epoch else "step",
                )
            )

    if best_state is None:  # resumed a finished run
        best_state = _cpu_state(model)
    final = _model_from(unet, best_state).eval()
    if has_val and not validation:
        # A resumed run that found no better model: predict with the best one again.
        best_report, validation = _validate(final, data, torch.device("cpu"), False)
    meta = make_meta(best_step, best_report)
    if out is not None and not digest:
        digest = _save_best(out, unet, best_state, meta)
    return TrainResult(
        model=final,
        meta=meta,
        unet_config=unet,
        history=history,
        losses=losses,
        best_step=best_step,
        best_metric=best_metric,
        validation=validation,
        seconds=time.perf_counter() - started,
        checkpoint=Path(out) if out is not None else None,
        digest=digest,
        metrics=best_report,
    )


def _batches(
    sampler: PatchSampler, start: int, stop: int, prefetch: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of steps ``start .. stop - 1``. With ``prefetch`` (on a GPU) the next
    batch is cut and augmented in a thread while the device computes; on a CPU that thread
    would only compete with PyTorch's for the same cores."""
    if not prefetch:
        for step in range(start, stop):
            yield sampler.batch(step)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="segflow-patches") as pool:
        pending = pool.submit(sampler.batch, start) if start < stop else None
        for step in range(start, stop):
            assert pending is not None
            ahead = pool.submit(sampler.batch, step + 1) if step + 1 < stop else None
            yield pending.result()
            pending = ahead


def _box_json(box: Box | None) -> dict[str, list[int]] | None:
    return None if box is None else {"offset": list(box.offset), "shape": list(box.shape)}


def _autocast(
    device: torch.device, dtype: torch.dtype | None
) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _save_best(
    out: str | os.PathLike[str],
    unet: UNetConfig,
    state: dict[str, torch.Tensor],
    meta: CheckpointMeta,
) -> str:
    return save_checkpoint(out, _model_from(unet, state), meta)


def _save_state(
    out: str | os.PathLike[str],
    model: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    unet: UNetConfig,
    config: TrainConfig,
    step: int,
    history: list[dict[str, Any]],
    losses: list[float],
    best_metric: float | None,
    best_step: int,
) -> None:
    payload = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "unet": unet.model_dump_json(),
        "config": config.model_dump_json(),
        "step": step,
        "model": _cpu_state(model),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "history": json.dumps(history),
        "losses": torch.tensor(losses, dtype=torch.float64),
        "best_metric": -1.0 if best_metric is None else float(best_metric),
        "best_step": best_step,
    }
    path = state_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _resume(
    checkpoint: Path,
    model: UNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    unet: UNetConfig,
    config: TrainConfig,
) -> tuple[int, list[dict[str, Any]], list[float], float | None, int]:
    """Load a run's resume state (or just a checkpoint's weights); returns
    (step, history, losses, best metric, best step)."""
    side = state_path(checkpoint)
    if not side.is_file():
        with torch.random.fork_rng(devices=[]):
            loaded, _ = load_checkpoint(checkpoint)
        if loaded.config != unet:
            raise CheckpointError(
                f"{checkpoint}: its network ({_describe(loaded.config)}) differs from the one "
                f"configured for this run ({_describe(unet)})"
            )
        model.load_state_dict(loaded.state_dict())
        return 0, [], [], None, 0
    try:
        state = torch.load(side, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{side}: not a readable training state ({type(exc).__name__})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{side}: not a segflow training state")
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(
            f"{side}: training state version {state.get('version')} is not supported"
        )
    saved = UNetConfig.model_validate_json(state["unet"])
    if saved != unet:
        raise CheckpointError(
            f"{side}: the saved run's network ({_describe(saved)}) differs from the one "
            f"configured now ({_describe(unet)})"
        )
    saved_config = TrainConfig.model_validate_json(state["config"])
    if saved_config.seed != config.seed:
        log.warning(
            "resuming a run made with seed %d under seed %d", saved_config.seed, config.seed
        )
    step = int(state["step"])
    if step > config.steps:
        raise ConfigError(
            f"{side}: the saved run is at step {step}, beyond the {config.steps} steps asked for"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    best = float(state["best_metric"])
    return (
        step,
        list(json.loads(state["history"])),
        [float(v) for v in state["losses"].tolist()],
        None if best < 0 else best,
        int(state["best_step"]),
    )


def _describe(c: UNetConfig) -> str:
    return (
        f"{c.ndim}D, depth {c.depth}, {c.base_channels} channels, {c.n_classes} classes, "
        f"{c.in_channels} input channel(s), {c.padding}, norm {c.norm}"
    )
