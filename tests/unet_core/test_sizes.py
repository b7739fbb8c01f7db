"""The minimum object size in the units of the labels it is applied to."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.metrics import instances_from_mask
from unet_core.sizes import MinSize, ball_voxels, default_min_size


def test_a_2d_models_area_becomes_voxels_of_a_stack() -> None:
    # A 5th-percentile area of 136 pixels (suggestion 34): a ball of radius 6.58 pixels,
    # 1193 pixels^3, in slices 3 pixels apart 398 voxels; a quarter of it.
    assert default_min_size(34, 2, (3.0, 1.0, 1.0)) == MinSize(99, "voxels", "model")
    assert default_min_size(34, 2, (1.0, 1.0, 1.0)).size == round(ball_voxels(136, (1, 1, 1)) / 4)
    assert ball_voxels(136, (1.5, 0.5, 0.5)) == pytest.approx(ball_voxels(136, (3, 1, 1)))
    # Labels of the model's own dimensionality, or of an unknown model: as suggested.
    assert default_min_size(34, 2, (1.0, 1.0)) == MinSize(34, "pixels", "model")
    assert default_min_size(34, 3, (3.0, 1.0, 1.0)) == MinSize(34, "voxels", "model")
    assert default_min_size(34, None, (3.0, 1.0, 1.0)) == MinSize(34, "voxels", "model")
    assert default_min_size(1, 2, (3.0, 1.0, 1.0)).size == 1  # no statistics: no filter


def test_instances_from_mask_numbers_the_kept_objects_consecutively() -> None:
    mask = np.zeros((12, 30), dtype=bool)
    mask[1:4, 1:4] = mask[1, 8] = mask[6:10, 6:10] = mask[1, 20] = mask[5:9, 20:28] = True
    lab = instances_from_mask(mask, min_size=2)
    assert np.array_equal(np.unique(lab), [0, 1, 2, 3])
