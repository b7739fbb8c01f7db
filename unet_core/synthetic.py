"""Synthetic microscopy-like images with known objects, for tests, demos and benchmarks.

:func:`blobs` draws round or elongated objects ("nuclei"), some of them touching, each
brighter in its middle than at its rim, then blurs the image (the optics) and adds
Poisson-like and Gaussian noise (the camera). It returns the image (uint16) and the
instance labels (int32, 0 = background).
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
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic image (uint16) and its instance labels (int32) of ``shape`` (2D or 3D).

    ``coverage`` is the fraction of the image the objects cover (roughly), ``radius`` the
    range of object radii in pixels, ``touching`` the fraction of objects placed right
    against a previous one, ``noise`` the Gaussian noise relative to the brightest object.
    """
    rng = np.random.default_rng(rng)
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    mean_r = float(np.mean(radius))
    volume = np.pi * mean_r**2 if ndim == 2 else 4.0 / 3.0 * np.pi * mean_r**3
    n = max(round(coverage * float(np.prod(shape)) / volume), 1)
    labels = np.zeros(shape, dtype=np.int32)
    brightness = np.zeros(shape, dtype=np.float32)
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for k in range(1, n + 1):
        r = float(rng.uniform(*radius))
        if centres and rng.random() < touching:
            j = int(rng.integers(len(centres)))
            direction = rng.normal(size=ndim)
            direction /= np.linalg.norm(direction) + 1e-9
            centre = centres[j] + direction * (radii[j] + r) * 0.92
        else:
            centre = np.array([rng.uniform(0, s) for s in shape])
        axes = r * rng.uniform(0.75, 1.25, size=ndim)
        rot = np.linalg.qr(rng.normal(size=(ndim, ndim)))[0]
        reach = int(np.ceil(axes.max())) + 1
        box = tuple(
            slice(max(int(c) - reach, 0), min(int(c) + reach + 1, s))
            for c, s in zip(centre, shape, strict=True)
        )
        if any(b.stop <= b.start for b in box):
            continue
        grid = np.mgrid[box].astype(np.float32)
        rel = np.tensordot(rot.T, grid - centre.reshape((ndim,) + (1,) * ndim), axes=1)
        dist = np.sqrt(sum((rel[i] / axes[i]) ** 2 for i in range(ndim)))
        inside = (dist <= 1.0) & (labels[box] == 0)
        if inside.sum() < 4:
            continue
        labels[box][inside] = k
        level = float(rng.uniform(0.6, 1.0))
        brightness[box][inside] = level * (1.0 - 0.45 * dist[inside] ** 2)
        centres.append(centre)
        radii.append(r)
    image = ndimage.gaussian_filter(brightness, blur) + 0.1
    image += rng.normal(0.0, noise, size=shape).astype(np.float32)
    out = np.clip(image * 2000.0 + 200.0, 0, 65535).astype(np.uint16)
    labels, _ = _relabel(labels)
    return out, labels


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    ids, inverse = np.unique(labels, return_inverse=True)
    out = inverse.reshape(labels.shape).astype(np.int32)
    if ids.size and ids[0] != 0:
        out += 1
    return out, int(out.max())
