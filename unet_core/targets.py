"""From annotations to training targets: class ids, instances and object statistics.

Annotations come as class ids or as instance ids. :func:`to_targets` turns them into the
classes the network learns, as the user chooses (``label_mode``):

``classes``
    The values are class ids ``0 .. n_classes - 1`` and are used as they are.
``binary``
    Everything non-zero is foreground (class 1). Objects are the connected components of
    the foreground (e.g. the cells of the ISBI 2012 EM data, separated by membranes).
``instances``
    The values are instance ids (0 = background). Foreground is class 1, and where two
    objects touch the pixels of one of them along the contact become background: a
    one-pixel gap, so that the network learns to separate touching objects and the
    connected components of its prediction are the objects again.
``boundary``
    Instance ids become three classes: background, object interior (1) and object
    boundary (2, the objects' own outermost pixels).
``auto``
    ``binary`` when the labels hold at most two values, ``instances`` otherwise. Multi-class
    annotations must say ``classes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import ndimage

from unet_core.checkpoint import ObjectStats
from unet_core.errors import ConfigError, InvalidVolumeError

LabelMode = Literal["auto", "classes", "binary", "instances", "boundary"]


@dataclass(frozen=True)
class Targets:
    """Training targets of one annotated image."""

    classes: np.ndarray  # uint8 class ids, the shape of the image's spatial axes
    instances: np.ndarray | None  # int32 objects (0 = none) for weight map and statistics


def resolve_mode(labels: Sequence[np.ndarray], mode: LabelMode) -> LabelMode:
    """Decide ``auto`` from the labels: ``binary`` with at most two values, else instances."""
    if mode != "auto":
        return mode
    values: set[int] = set()
    for lab in labels:
        values.update(int(v) for v in np.unique(lab)[:3])
        if len(values) > 2:
            return "instances"
    return "binary"


def class_names_for(mode: LabelMode, n_classes: int) -> list[str]:
    if mode in ("binary", "instances"):
        return ["background", "foreground"]
    if mode == "boundary":
        return ["background", "interior", "boundary"]
    return ["background"] + [f"class_{i}" for i in range(1, n_classes)]


def n_classes_for(mode: LabelMode, labels: Sequence[np.ndarray]) -> int:
    if mode in ("binary", "instances"):
        return 2
    if mode == "boundary":
        return 3
    top = max((int(np.max(lab)) for lab in labels if lab.size), default=1)
    return max(top + 1, 2)


def _check_integer(label: np.ndarray) -> None:
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise InvalidVolumeError("labels must be integers (found fractional values)")
    elif label.dtype.kind not in "uib":
        raise InvalidVolumeError(f"labels must be integers, not {label.dtype}")
    if label.size and np.min(label) < 0:
        raise InvalidVolumeError("labels must not be negative")


def equal_neighbours(a: np.ndarray) -> float:
    """Fraction of pairs of neighbouring voxels (along every axis) with the same value:
    near 1 for annotations, which are constant over each object, low for intensities."""
    a = np.asarray(a)
    same = pairs = 0
    for axis in range(a.ndim):
        n = a.shape[axis]
        if n < 2:
            continue
        lo = np.take(a, np.arange(n - 1), axis=axis)
        hi = np.take(a, np.arange(1, n), axis=axis)
        same += int(np.count_nonzero(lo == hi))
        pairs += lo.size
    return same / pairs if pairs else 1.0


#: Above this many distinct values, labels with (almost) no background 0 look like an image.
MANY_IDS = 16


def label_problem(label: np.ndarray, background: bool = True) -> str | None:
    """Why ``label`` looks like an intensity image rather than an annotation, or None.

    Checks, in order: fractional values; neighbouring voxels that mostly differ
    (annotations are constant over each object); with ``background``, more than
    :data:`MANY_IDS` distinct values and fewer than 1% of voxels 0 (dense annotations
    without background exist: callers offer a way past this)."""
    a = np.asarray(label)
    if a.dtype.kind == "f" and a.size:
        finite = a[np.isfinite(a)]
        if finite.size < a.size or not np.array_equal(finite, np.round(finite)):
            return f"it holds fractional values ({a.dtype}), as an intensity image does"
    if a.dtype.kind not in "uif" or not a.size:
        return None
    n = int(np.unique(a).size)
    if n <= 2:
        return None
    same = equal_neighbours(a)
    if same < 0.5:
        return (
            f"neighbouring voxels differ in {1 - same:.0%} of places ({n} distinct values), "
            "as in an intensity image, while annotations are constant over each object"
        )
    zero = float(np.count_nonzero(a == 0)) / a.size
    if background and n > MANY_IDS and zero < 0.01:
        return f"it has {n} distinct values and {zero:.1%} background (0), as an image has"
    return None


def empty_problem(label: np.ndarray) -> str | None:
    """Why ``label`` gives the network nothing to learn, or None: it holds no object (every
    voxel is 0, the background), so the network would learn to answer background everywhere
    and validate perfectly on it."""
    a = np.asarray(label)
    if a.size and not np.any(a):
        return (
            "holds no object: every voxel is 0 (background), so there is nothing to learn; "
            "annotate at least one object, or leave this pair out"
        )
    return None


def image_problem(image: np.ndarray) -> str | None:
    """Why ``image`` looks like an annotation rather than an intensity image, or None:
    integers with at most two values (a mask), or constant over 98% of neighbouring voxels
    and 0 over at least half of them (labels)."""
    a = np.asarray(image)
    if a.dtype.kind not in "uib" or not a.size:
        return None
    n = int(np.unique(a).size)
    if n <= 2:
        return f"it holds only {n} value(s), as a mask does"
    zero = float(np.count_nonzero(a == 0)) / a.size
    same = equal_neighbours(a)
    if same >= 0.98 and zero >= 0.5:
        return (
            f"it is 0 over {zero:.0%} of voxels and constant over {same:.0%} of neighbouring "
            "voxels, as an annotation is"
        )
    return None


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..n (0 stays background), as int32."""
    ids, inverse = np.unique(instances, return_inverse=True)
    out = inverse.reshape(instances.shape).astype(np.int32)
    if ids.size and ids[0] != 0:
        out += 1
    return out


def components(mask: np.ndarray) -> np.ndarray:
    """Connected components (face connectivity) of a boolean mask, int32."""
    lab, _ = ndimage.label(mask)
    return lab.astype(np.int32, copy=False)


def _neighbour_extremes(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max and min instance id in the full (3^ndim) neighbourhood, borders mirrored."""
    size = (3,) * inst.ndim
    return (
        ndimage.maximum_filter(inst, size=size, mode="reflect"),
        ndimage.minimum_filter(inst, size=size, mode="reflect"),
    )


def separate_touching(instances: np.ndarray) -> np.ndarray:
    """Foreground mask with a one-pixel gap wherever two objects touch (also diagonally):
    a pixel is dropped when a neighbour belongs to another object with a larger id."""
    hi, _ = _neighbour_extremes(instances)
    return (instances > 0) & (hi <= instances)


def inner_boundaries(instances: np.ndarray) -> np.ndarray:
    """Pixels of an object that touch anything else (background or another object)."""
    hi, lo = _neighbour_extremes(instances)
    return (instances > 0) & ((hi != instances) | (lo != instances))


def to_targets(label: np.ndarray, mode: LabelMode, n_classes: int | None = None) -> Targets:
    """Convert one annotation to class ids (and the objects, where there are any)."""
    if mode == "auto":
        raise ConfigError("resolve 'auto' with resolve_mode() before converting labels")
    label = np.asarray(label)
    _check_integer(label)
    if mode == "classes":
        k = n_classes or n_classes_for("classes", [label])
        if label.size and int(np.max(label)) >= k:
            raise InvalidVolumeError(
                f"label value {int(np.max(label))} is not a class id of a {k}-class model"
            )
        classes = label.astype(np.uint8)
        return Targets(classes, components(classes > 0) if k == 2 else None)
    if mode == "binary":
        values = np.unique(label)
        fg = label > values[0] if values.size == 2 and values[0] != 0 else label > 0
        return Targets(fg.astype(np.uint8), components(fg))
    instances = relabel_sequential(label.astype(np.int64, copy=False))
    if mode == "instances":
        return Targets(separate_touching(instances).astype(np.uint8), instances)
    if mode == "boundary":
        classes = (instances > 0).astype(np.uint8)
        classes[inner_boundaries(instances)] = 2
        return Targets(classes, instances)
    raise ConfigError(f"unknown label mode {mode!r}")


def object_sizes(instances: np.ndarray) -> np.ndarray:
    """Voxel counts of the objects (ids > 0) of an instance image."""
    counts = np.bincount(instances.reshape(-1))
    return counts[1:][counts[1:] > 0]


def object_stats(sizes: Sequence[int] | np.ndarray) -> ObjectStats:
    """Size distribution of the training objects, for instance post-processing defaults."""
    s = np.asarray(sizes, dtype=np.float64)
    if s.size == 0:
        return ObjectStats()
    p5, median, p95 = np.percentile(s, [5, 50, 95])
    return ObjectStats(
        count=int(s.size),
        min=float(s.min()),
        p5=float(p5),
        median=float(median),
        p95=float(p95),
        max=float(s.max()),
    )
