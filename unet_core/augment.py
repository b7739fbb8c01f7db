r"""The paper's data augmentation, applied to image, labels and weights in one warp.

Every training patch is cut out of the (mirror-extended) image through one spatial
transform ``source = centre + A · q + d(q)`` of the patch grid ``q``:

* ``A`` combines random flips along every axis, a random rotation in the last two axes
  (any angle) and a small random zoom; ``centre`` is the random shift;
* ``d`` is the elastic deformation of Ronneberger et al. (2015): random displacement
  vectors on a coarse grid (3 × 3 by default), drawn from a Gaussian with a standard
  deviation of ``elastic_sigma`` pixels (10 in the paper) and interpolated to every
  pixel bicubically.

The image is sampled with cubic splines, the class labels with nearest neighbour (they
stay integers from the original set) and the loss weights linearly. Because the labels
are sampled at exactly the coordinates of the central part of the image patch, they stay
aligned with the image however strong the deformation::

      input patch (image), T per axis            sampled at centre + A·q + d(q)
    ┌──────────────────────────────┐
    │ context                      │
    │    ┌────────────────────┐    │
    │    │ output patch       │    │   labels and weights: the same coordinates,
    │    │ (labels, weights)  │    │   cropped by the network's context per side
    │    └────────────────────┘    │
    └──────────────────────────────┘

Grey-value variations (contrast, brightness, gamma, noise) are applied to the normalised
image patch afterwards. Dropout at the end of the contracting path is part of the
model (:attr:`unet_core.UNetConfig.dropout`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from unet_core.geometry import Box
from unet_core.mirror import read_mirrored


class AugmentConfig(BaseModel):
    """Which augmentations run and how strong they are."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="Master switch for every augmentation.")
    flip: bool = Field(True, description="Random flips along every spatial axis.")
    rotate: bool = Field(True, description="Random rotation (any angle) in the last two axes.")
    zoom: float = Field(
        0.1, ge=0.0, le=0.5, description="Random zoom in [1 - zoom, 1 + zoom] (0: off)."
    )
    elastic_sigma: float = Field(
        10.0,
        ge=0.0,
        le=100.0,
        description="Std of the random displacements on the coarse grid, in pixels (paper: 10).",
    )
    elastic_grid: int = Field(
        3, ge=2, le=16, description="Nodes per axis of the coarse displacement grid (paper: 3)."
    )
    contrast: float = Field(
        0.15, ge=0.0, le=1.0, description="Random contrast factor in [1 - c, 1 + c]."
    )
    brightness: float = Field(
        0.1, ge=0.0, le=1.0, description="Random offset in [-b, b] of the normalised image."
    )
    gamma: float = Field(
        0.2, ge=0.0, le=1.0, description="Random gamma in [1 - g, 1 + g] on the [0, 1] range."
    )
    noise: float = Field(
        0.03, ge=0.0, le=1.0, description="Gaussian noise with a std drawn from [0, noise]."
    )

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(enabled=False)


# --------------------------------------------------------------------- transform


def random_linear(ndim: int, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """A random ``ndim × ndim`` matrix: flips, rotation in the last two axes, zoom."""
    a = np.eye(ndim)
    if not config.enabled:
        return a
    if config.flip:
        a = a @ np.diag(np.where(rng.random(ndim) < 0.5, -1.0, 1.0))
    if config.rotate and ndim >= 2:
        t = rng.uniform(0.0, 2.0 * np.pi)
        r = np.eye(ndim)
        r[-2:, -2:] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        a = r @ a
    if config.zoom > 0:
        a = a * rng.uniform(1.0 - config.zoom, 1.0 + config.zoom)
    return a


def _spline_weights(n: int, nodes: int) -> np.ndarray:
    """``(n, nodes)`` weights of cubic-spline interpolation from ``nodes`` grid points
    spanning an axis of ``n`` pixels (corner to corner). Spline interpolation is linear in
    the node values, so the weights are the interpolants of the unit vectors."""
    pos = np.linspace(0.0, nodes - 1.0, n)[None]
    order = min(3, nodes - 1)
    return np.stack(
        [
            ndimage.map_coordinates(np.eye(nodes)[k], pos, order=order, mode="nearest")
            for k in range(nodes)
        ],
        axis=1,
    )


def elastic_displacement(
    shape: Sequence[int], sigma: float, grid: int, rng: np.random.Generator
) -> np.ndarray:
    """Displacements ``(ndim, *shape)`` in pixels: Gaussian vectors (std ``sigma``) on a
    ``grid``-per-axis coarse grid, interpolated bicubically (tricubically in 3D)."""
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    coarse = rng.normal(0.0, sigma, size=(ndim,) + (grid,) * ndim)
    weights = [_spline_weights(n, grid) for n in shape]
    out = np.empty((ndim, *shape), dtype=np.float32)
    for c in range(ndim):
        field = coarse[c]
        # Separable: contract one coarse axis at a time with its interpolation weights.
        for w in weights:
            field = np.tensordot(field, w, axes=([0], [1]))
        out[c] = field
    return out


def patch_coordinates(
    centre: Sequence[float],
    shape: Sequence[int],
    rng: np.random.Generator,
    config: AugmentConfig,
) -> np.ndarray | None:
    """Source coordinates ``(ndim, *shape)`` of a patch centred at ``centre``; ``None`` when
    augmentation is off (the patch is then a plain, integer-aligned box)."""
    if not config.enabled:
        return None
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    a = random_linear(ndim, rng, config)
    axes = [np.arange(n, dtype=np.float64) - n // 2 for n in shape]
    q = np.stack(np.meshgrid(*axes, indexing="ij"))  # (ndim, *shape)
    coords = np.tensordot(a, q, axes=([1], [0]))
    for i, c in enumerate(centre):
        coords[i] += float(c)
    if config.elastic_sigma > 0:
        coords += elastic_displacement(shape, config.elastic_sigma, config.elastic_grid, rng)
    return coords.astype(np.float32)


def centre_crop_coordinates(coords: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """The part of the input-patch coordinates that the network's output covers."""
    sl = [slice(None)]
    for n, o in zip(coords.shape[1:], out_shape, strict=True):
        start = (n - int(o)) // 2
        sl.append(slice(start, start + int(o)))
    return coords[tuple(sl)]


def box_at(centre: Sequence[int], shape: Sequence[int]) -> Box:
    """The integer box of ``shape`` whose grid position ``n // 2`` sits on ``centre``
    (what :func:`patch_coordinates` gives without augmentation)."""
    return Box(
        tuple(int(c) - int(n) // 2 for c, n in zip(centre, shape, strict=True)),
        tuple(int(n) for n in shape),
    )


def warp(
    source: np.ndarray, coords: np.ndarray, order: int, leading: int = 0, margin: int = 0
) -> np.ndarray:
    """Sample ``source`` (``leading`` axes kept whole) at ``coords``, mirror-extended.

    Only the bounding box of the coordinates (plus a margin for the spline) is read and
    interpolated, so this costs the size of the patch, not of the image.
    """
    ndim = coords.shape[0]
    spatial = source.shape[leading:]
    # Cubic splines are prefiltered over the crop: 8 voxels of margin make the crop's edge
    # effect negligible (the prefilter's influence decays by a factor of ~0.27 per voxel).
    pad = max(margin, 8 if order > 1 else 1)
    lo = np.floor(coords.reshape(ndim, -1).min(axis=1)).astype(int) - pad
    hi = np.ceil(coords.reshape(ndim, -1).max(axis=1)).astype(int) + pad + 1
    box = Box.from_bounds(tuple(lo), tuple(hi))
    data = read_mirrored(source, box, spatial, leading=leading)
    local = coords - lo.reshape((ndim,) + (1,) * ndim).astype(np.float32)
    if leading == 0:
        return ndimage.map_coordinates(data, local, order=order, mode="nearest")
    flat = data.reshape((-1, *data.shape[leading:]))
    out = np.stack([ndimage.map_coordinates(ch, local, order=order, mode="nearest") for ch in flat])
    return out.reshape((*data.shape[:leading], *coords.shape[1:]))


def grey_values(x: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Random contrast, brightness, gamma and noise on a normalised image patch (float32)."""
    if not config.enabled:
        return x
    out = np.asarray(x, dtype=np.float32)
    if config.gamma > 0:
        g = rng.uniform(1.0 - config.gamma, 1.0 + config.gamma)
        # A gamma on the [0, 1] range that continues linearly outside it (values below 0
        # or above 1 are legal after percentile normalisation).
        inside = np.clip(out, 0.0, 1.0)
        out = out - inside + np.power(inside, g, dtype=np.float32)
    if config.contrast > 0:
        out = out * np.float32(rng.uniform(1.0 - config.contrast, 1.0 + config.contrast))
    if config.brightness > 0:
        out = out + np.float32(rng.uniform(-config.brightness, config.brightness))
    if config.noise > 0:
        std = rng.uniform(0.0, config.noise)
        out = out + rng.normal(0.0, std, size=out.shape).astype(np.float32)
    return out.astype(np.float32, copy=False)


def deform(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig | None = None,
    image_order: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Deform a whole image and its label with one random transform about their centre
    (no grey-value changes): a convenience for inspecting and testing the augmentation."""
    config = config or AugmentConfig()
    centre = [n // 2 for n in label.shape]
    coords = patch_coordinates(centre, label.shape, rng, config)
    if coords is None:
        return image.copy(), label.copy()
    leading = image.ndim - label.ndim
    return (
        warp(image, coords, image_order, leading=leading).astype(image.dtype, copy=False),
        warp(label, coords, 0),
    )
