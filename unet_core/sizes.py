"""The smallest object worth keeping, in the units of the labels it is applied to.

Training records the sizes of the labelled objects in the units of its labels
(:class:`unet_core.checkpoint.ObjectStats`): pixel areas for a 2D model, voxel counts for
a 3D one, and suggests a quarter of the 5th percentile as the minimum object size. Instance
labels are filtered by their objects' voxel counts, so a 2D model's suggestion does not
fit a stack it segmented slice by slice: an area of 34 pixels taken as 34 voxels keeps
one-slice fragments of a few dozen voxels as objects.

For 3D labels made by a 2D model the suggestion is converted to voxels, by the same rule
in volume: the 5th-percentile area (four times the suggestion) is the largest
cross-section of a ball, whose volume in voxels follows from the voxel sizes (slices
``z`` apart hold fewer voxels of it than the in-plane pixel size alone gives), and a
quarter of that volume is the minimum. A nucleus of radius ``r`` pixels has a cross-section
of ``pi r**2`` pixels and ``4/3 pi r**3 * s_xy / s_z`` voxels.

Chosen on synthetic nuclei (``unet_core.synthetic.blobs``, three 24x256x256 stacks, slices
3x coarser than pixels) segmented by a 2D network and linked across slices (see
``docs/guide.md``, Instances): with a training 5th percentile of 136 pixels, 34 voxels
left 2-3 objects per stack smaller than the smallest true nucleus and a mean instance F1
of 0.973; the converted 99 voxels none, F1 0.976. Comparing each linked object's largest
cross-section with the area instead gave 0.972 with 1-3 such fragments, filtering slice
objects by area before linking the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple


class MinSize(NamedTuple):
    """A minimum object size, its unit (``pixels`` for 2D labels, else ``voxels``) and
    where it came from (``option``: given; ``model``: the model's suggestion)."""

    size: int
    unit: str
    source: str


def size_unit(ndim: int) -> str:
    """What an object's size counts in labels of ``ndim`` axes."""
    return "pixels" if ndim == 2 else "voxels"


def ball_voxels(area: float, spacing: Sequence[float]) -> float:
    """Voxels of a ball whose largest cross-section covers ``area`` in-plane pixels, in a
    volume of voxel sizes ``spacing`` (z, y, x; only the ratios count)."""
    sz, sy, sx = (float(s) for s in spacing[-3:])
    radius = math.sqrt(area / math.pi)  # in-plane pixels
    return 4.0 / 3.0 * math.pi * radius**3 * math.sqrt(sy * sx) / sz


def default_min_size(suggested: int, model_ndim: int | None, spacing: Sequence[float]) -> MinSize:
    """The model's suggested minimum size (in its training labels' units) for labels of
    voxel sizes ``spacing`` (one per axis): as it is for labels of the model's
    dimensionality (or of an unknown model), converted to voxels (a quarter of the ball of
    the 5th-percentile area, see the module docstring) for a stack segmented by a 2D model."""
    ndim = len(spacing)
    suggested = max(int(suggested), 0)
    if model_ndim == 2 and ndim == 3 and suggested > 1:
        return MinSize(round(ball_voxels(4 * suggested, spacing) / 4), "voxels", "model")
    return MinSize(suggested, size_unit(ndim), "model")


__all__ = ["MinSize", "ball_voxels", "default_min_size", "size_unit"]
