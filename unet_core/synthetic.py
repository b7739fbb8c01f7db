"""Synthetic microscopy-like images with known objects, for tests, demos and benchmarks.

:func:`blobs` draws round or elongated objects ("nuclei"), some of them touching, each
brighter in its middle than at its rim, then blurs the image (the optics) and adds
Poisson-like and Gaussian noise (the camera). It returns the image (uint16) and the
instance labels (int32, 0 = background). With ``spacing`` it draws an anisotropic stack
(objects round in physical space span fewer slices than pixels), and ``stacked`` places
touching objects on top of each other along the first axis, as in a z-stack of nuclei.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def blobs(
    shape: Sequence[int],
    rng: np.random.Generator | int = 0,
    coverage: float = 0.25,
    radius: tuple[float, float] = (5.0, 11.0),
    touching: float = 0.35,
    blur: float = 1.5,
    noise: float = 0.08,
    spacing: Sequence[float] | None = None,
    stacked: float = 0.0,
    overlap: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic image (uint16) and its instance labels (int32) of ``shape`` (2D or 3D).

    ``coverage`` is the fraction of the image the objects cover (roughly), ``radius`` the
    range of object radii in pixels, ``touching`` the fraction of objects placed right
    against a previous one, ``noise`` the Gaussian noise relative to the brightest object.
    ``spacing`` is the voxel size per axis in pixels (e.g. ``(3, 1, 1)``: slices three
    pixels apart): objects, radii and blur are round in physical space. ``stacked`` is the
    fraction of the touching objects placed above or below their neighbour (along the
    first axis, with a small sideways offset) instead of in a random direction.
    ``overlap`` is the largest fraction of a new object that may fall on earlier ones
    (those voxels stay with the earlier object); a larger overlap skips the object, so
    that nuclei touch rather than cut into each other (1: never skip).
    """
    rng = np.random.default_rng(rng)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    step = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if step.shape != (ndim,) or np.any(step <= 0):
        raise ValueError(f"spacing {spacing} needs one positive size per axis of {shape}")
    mean_r = float(np.mean(radius))
    volume = np.pi * mean_r**2 if ndim == 2 else 4.0 / 3.0 * np.pi * mean_r**3
    n = max(round(coverage * float(np.prod(shape)) * float(np.prod(step)) / volume), 1)
    labels = np.zeros(shape, dtype=np.int32)
    brightness = np.zeros(shape, dtype=np.float32)
    centres: list[np.ndarray] = []  # in voxels
    radii: list[float] = []
    for k in range(1, n + 1):
        r = float(rng.uniform(*radius))
        if centres and rng.random() < touching:
            j = int(rng.integers(len(centres)))
            direction = rng.normal(size=ndim)
            if stacked and rng.random() < stacked:
                direction *= 0.25
                direction[0] = 1.0 if direction[0] >= 0 else -1.0
            direction /= np.linalg.norm(direction) + 1e-9
            centre = centres[j] + direction * (radii[j] + r) * 0.92 / step
        else:
            centre = np.array([rng.uniform(0, s) for s in shape])
        axes = r * rng.uniform(0.75, 1.25, size=ndim)
        rot = np.linalg.qr(rng.normal(size=(ndim, ndim)))[0]
        reach = np.ceil(axes.max() / step).astype(int) + 1
        box = tuple(
            slice(max(int(c) - h, 0), min(int(c) + h + 1, s))
            for c, h, s in zip(centre, reach, shape, strict=True)
        )
        if any(b.stop <= b.start for b in box):
            continue
        grid = np.mgrid[box].astype(np.float32)
        offset = (grid - centre.reshape((ndim,) + (1,) * ndim)) * step.reshape(
            (ndim,) + (1,) * ndim
        ).astype(np.float32)
        rel = np.tensordot(rot.T, offset, axes=1)
        dist = np.sqrt(sum((rel[i] / axes[i]) ** 2 for i in range(ndim)))
        body = dist <= 1.0
        inside = body & (labels[box] == 0)
        if inside.sum() < 4 or inside.sum() < (1.0 - overlap) * body.sum():
            continue
        labels[box][inside] = k
        level = float(rng.uniform(0.6, 1.0))
        brightness[box][inside] = level * (1.0 - 0.45 * dist[inside] ** 2)
        centres.append(centre)
        radii.append(r)
    sigma = blur if spacing is None else tuple(float(blur / s) for s in step)
    image = ndimage.gaussian_filter(brightness, sigma) + 0.1
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    out = np.clip(image * 2000.0 + 200.0, 0, 65535).astype(np.uint16)
    labels, _ = _relabel(labels)
    return out, labels


def touching_along(labels: np.ndarray, axis: int = 0) -> float:
    """Fraction of the objects that touch another object along ``axis`` (a voxel of one
    directly next to a voxel of the other in that direction)."""
    lab = np.asarray(labels)
    n = len(np.unique(lab[lab > 0]))
    if n == 0 or lab.shape[axis] < 2:
        return 0.0
    a = np.take(lab, np.arange(lab.shape[axis] - 1), axis=axis).reshape(-1)
    b = np.take(lab, np.arange(1, lab.shape[axis]), axis=axis).reshape(-1)
    contact = (a > 0) & (b > 0) & (a != b)
    return len(np.unique(np.concatenate([a[contact], b[contact]]))) / n


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape).astype(np.int32)
    if ids.size and ids[0] != 0:
        out += 1
    return out, int(out.max())
