"""The paper's augmentations: elastic deformation, flips/rotations, consistent warps."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.augment import (
    AugmentConfig,
    box_at,
    centre_crop_coordinates,
    deform,
    elastic_displacement,
    grey_values,
    patch_coordinates,
    warp,
)
from unet_core.geometry import Box
from unet_core.mirror import read_mirrored


def smooth_image(shape, seed=0):
    """A smooth random landscape in [0, 1] (sums of low-frequency cosines)."""
    rng = np.random.default_rng(seed)
    grids = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape)
    for _ in range(6):
        k = rng.uniform(0.02, 0.12, size=len(shape))
        phase = rng.uniform(0, 2 * np.pi)
        out += np.cos(sum(ki * g for ki, g in zip(k, grids, strict=True)) + phase)
    return (out - out.min()) / (out.max() - out.min())


THRESHOLDS = np.array([0.3, 0.55, 0.8])


def label_of(image):
    return np.digitize(image, THRESHOLDS).astype(np.uint8)


@pytest.mark.parametrize("shape", [(96, 80), (24, 40, 36)])
def test_deformed_label_is_still_the_function_of_the_deformed_image(shape):
    image = smooth_image(shape, seed=len(shape))
    label = label_of(image)
    rng = np.random.default_rng(1)
    config = AugmentConfig(elastic_sigma=10.0)
    # Nearest sampling for both: the warp must use the very same coordinates for each.
    img0, lab0 = deform(image, label, np.random.default_rng(1), config, image_order=0)
    assert lab0.dtype == label.dtype
    assert np.array_equal(lab0, label_of(img0))
    # The deformation really moved things.
    assert np.mean(lab0 != label) > 0.05
    # Bicubic image, nearest labels: they agree except within a pixel of a threshold.
    img3, lab3 = deform(image, label, rng, config, image_order=3)
    assert set(np.unique(lab3)) <= set(np.unique(label))
    agree = lab3 == label_of(img3)
    assert agree.mean() > 0.97
    grad = max(float(np.abs(np.gradient(image, axis=a)).max()) for a in range(len(shape)))
    near = np.min(np.abs(img3[..., None] - THRESHOLDS), axis=-1) <= 1.5 * grad
    assert np.all(agree | near)


def test_elastic_displacement_statistics():
    rng = np.random.default_rng(0)
    fields = np.stack([elastic_displacement((101, 81), 10.0, 3, rng) for _ in range(300)])
    assert fields.shape == (300, 2, 101, 81)
    # The corners and the centre are grid nodes: their displacement has std sigma.
    assert np.std(fields[:, :, 0, 0]) == pytest.approx(10.0, rel=0.15)
    assert np.std(fields[:, :, 50, 40]) == pytest.approx(10.0, rel=0.15)
    # Smooth (bicubic from a 3×3 grid): neighbouring pixels move almost together.
    step = np.abs(np.diff(fields, axis=-1)).max()
    assert step < 2.0
    assert np.all(elastic_displacement((20, 20), 0.0, 3, rng) == 0)


def test_identity_warp_reproduces_the_array():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(30, 40)).astype(np.float32)
    coords = np.indices(a.shape).astype(np.float32)
    assert np.array_equal(warp(a, coords, 0), a)
    np.testing.assert_allclose(warp(a, coords, 1), a, atol=1e-6)
    np.testing.assert_allclose(warp(a, coords, 3), a, atol=1e-4)


def test_warp_mirrors_at_the_border_like_inference():
    a = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    box = Box((-3, -4), (11, 14))
    coords = np.indices(box.shape).astype(np.float32) + np.array(box.offset).reshape(2, 1, 1)
    assert np.array_equal(warp(a, coords, 0), read_mirrored(a, box, a.shape))
    two = np.stack([a, -a])
    assert np.array_equal(warp(two, coords, 0, leading=1)[1], -read_mirrored(a, box, a.shape))


def test_patch_coordinates_without_augmentation_is_a_box():
    assert (
        patch_coordinates((10, 10), (8, 8), np.random.default_rng(0), AugmentConfig.off()) is None
    )
    box = box_at((10, 20), (8, 6))
    assert box == Box((6, 17), (8, 6))


def test_flip_only_coordinates_are_integer_and_centred():
    cfg = AugmentConfig(rotate=False, zoom=0.0, elastic_sigma=0.0)
    coords = patch_coordinates((50, 60), (9, 7), np.random.default_rng(5), cfg)
    assert coords is not None
    assert np.array_equal(coords, np.round(coords))
    # The output crop of the same coordinates covers the patch centre.
    inner = centre_crop_coordinates(coords, (3, 1))
    assert inner.shape == (2, 3, 1)
    assert tuple(inner[:, 1, 0]) == (50, 60)


def test_grey_values():
    x = np.linspace(-0.2, 1.2, 100, dtype=np.float32).reshape(10, 10)
    assert grey_values(x, np.random.default_rng(0), AugmentConfig.off()) is x
    a = grey_values(x, np.random.default_rng(4), AugmentConfig())
    b = grey_values(x, np.random.default_rng(4), AugmentConfig())
    assert a.dtype == np.float32
    assert np.array_equal(a, b)
    assert not np.allclose(a, x)
    # Without noise the mapping is monotone: grey values change, their order does not.
    c = grey_values(x, np.random.default_rng(4), AugmentConfig(noise=0.0))
    assert np.all(np.diff(c.reshape(-1)) > 0)
