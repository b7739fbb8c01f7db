"""Mirrored reads: a box of a volume, reflected (mirror extrapolation, no repeated border)
where it reaches outside, assembled by block copies of the stored ranges. Mirroring
happens only at the volume border, never at chunk borders (the exactness property)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import DTypeLike

from unet_core.errors import InvalidVolumeError
from unet_core.geometry import Box


def mirror_indices(begin: int, end: int, n: int) -> np.ndarray:
    """Source indices for positions begin..end-1 of an axis of length n, mirrored at the
    borders (half-sample symmetric: ``c b a | a b c | c b a``, as SciPy's 'reflect')."""
    if n < 1:
        raise InvalidVolumeError("cannot mirror an empty axis")
    q = np.mod(np.arange(begin, end), 2 * n)
    return np.where(q < n, q, 2 * n - 1 - q)


def _mirror_runs(idx: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``idx`` (from :func:`mirror_indices`, relative to the read range) as runs of
    consecutive indices: (first output position, first source index, length, step ±1)."""
    runs = []
    start, n = 0, len(idx)
    while start < n:
        step = -1 if start + 1 < n and idx[start + 1] - idx[start] == -1 else 1
        end = start + 1
        while end < n and idx[end] - idx[end - 1] == step:
            end += 1
        runs.append((start, int(idx[start]), end - start, step))
        start = end
    return runs


#: A mirrored read is assembled from at most this many block copies (runs per axis
#: multiplied); beyond (axes of a few voxels mirrored many times) it gathers by index.
_MAX_MIRROR_COPIES = 512


def read_mirrored(
    source: object,
    box: Box,
    volume_shape: Sequence[int],
    leading: int = 0,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """Read ``box`` from ``source`` (NumPy, zarr, anything sliceable) with mirror extension.

    Only the bounding range of needed voxels is read (one request for zarr); ``leading``
    axes (e.g. channels) are read whole. Mirroring happens only where the box leaves the
    volume, never at chunk or block borders. The result has ``dtype`` (default: the
    source's), converted while it is assembled: one pass over the box, however many of
    its axes are mirrored.
    """
    idx = [
        mirror_indices(b, e, n) for b, e, n in zip(box.begin, box.end, volume_shape, strict=True)
    ]
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    sel = (slice(None),) * leading + tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    data = np.asarray(source[sel])  # type: ignore[index]
    target = data.dtype if dtype is None else np.dtype(dtype)
    runs = [_mirror_runs(i - a) for i, a in zip(idx, lo, strict=True)]
    if all(len(r) == 1 and r[0][3] == 1 for r in runs):  # inside the volume: no mirroring
        return data if data.dtype == target else data.astype(target)
    if math.prod(len(r) for r in runs) > _MAX_MIRROR_COPIES:
        for axis, (i, a) in enumerate(zip(idx, lo, strict=True)):
            data = np.take(data, i - a, axis=leading + axis)
        return data.astype(target, copy=False)
    out = np.empty((*data.shape[:leading], *box.shape), dtype=target)
    lead = (slice(None),) * leading
    for combo in itertools.product(*runs):
        dst = tuple(slice(o, o + n) for o, _, n, _ in combo)
        src = tuple(
            slice(s, s + n) if step == 1 else slice(s, s - n if s >= n else None, -1)
            for _, s, n, step in combo
        )
        out[(*lead, *dst)] = data[(*lead, *src)]
    return out
