"""The paper's weight map and the losses, against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from unet_core.losses import (
    border_weights,
    class_frequencies,
    class_weights,
    soft_dice_loss,
    weight_map,
    weighted_cross_entropy,
)


def term(d1, d2, w0=10.0, sigma=5.0):
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def test_weight_map_on_two_single_pixel_objects_by_hand():
    # Two one-pixel objects: A at (0, 0), B at (0, 4), in a 3 × 5 image.
    inst = np.zeros((3, 5), dtype=np.int32)
    inst[0, 0], inst[0, 4] = 1, 2
    w = border_weights(inst, w0=10.0, sigma=5.0)
    r17, r8, r5, r13 = math.sqrt(17), math.sqrt(8), math.sqrt(5), math.sqrt(13)
    expected = np.array(
        [
            [0.0, term(1, 3), term(2, 2), term(3, 1), 0.0],
            [
                term(1, r17),
                term(math.sqrt(2), math.sqrt(10)),
                term(r5, r5),
                term(math.sqrt(10), math.sqrt(2)),
                term(1, r17),
            ],
            [
                term(2, math.sqrt(20)),
                term(r5, r13),
                term(r8, r8),
                term(r13, r5),
                term(2, math.sqrt(20)),
            ],
        ]
    )
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    # Between the objects the weight is high (d1 + d2 = 4: 10·e^(-16/50) ≈ 7.26).
    assert w[0, 2] == pytest.approx(7.2615, abs=1e-4)


def test_weight_map_adds_the_class_term_and_is_zero_inside_objects():
    inst = np.zeros((4, 9), dtype=np.int32)
    inst[:, 0:2] = 1
    inst[:, 6:9] = 2
    classes = (inst > 0).astype(np.uint8)
    w = weight_map(classes, inst, np.array([0.5, 2.0]), w0=10.0, sigma=5.0)
    # Inside objects: only w_c. In the gap (columns 2..5) d1 + d2 = 5 everywhere.
    assert np.all(w[:, [0, 1, 6, 7, 8]] == 2.0)
    np.testing.assert_allclose(w[:, 2:6], 0.5 + term(1, 4), rtol=1e-6)
    assert weight_map(classes, None, np.array([0.5, 2.0])).max() == 2.0


def test_border_weights_match_brute_force():
    rng = np.random.default_rng(0)
    seeds = np.zeros((48, 40), dtype=np.int32)
    for k in range(1, 9):
        seeds[rng.integers(48), rng.integers(40)] = k
    inst = ndimage.grey_dilation(seeds, size=(5, 5))
    inst[ndimage.binary_erosion(inst > 0, iterations=1) ^ (inst > 0)] = 0
    dists = np.stack(
        [ndimage.distance_transform_edt(inst != k) for k in range(1, int(inst.max()) + 1)]
    )
    dists.sort(axis=0)
    brute = 10 * np.exp(-((dists[0] + dists[1]) ** 2) / (2 * 5.0**2)) * (inst == 0)
    np.testing.assert_allclose(border_weights(inst), brute, atol=1.5e-3)


def test_class_weights():
    f = class_frequencies([np.array([[0, 0, 0, 1]], dtype=np.uint8)], 2)
    np.testing.assert_allclose(f, [0.75, 0.25])
    inv = class_weights(f, "inverse")
    # Balanced: each class carries the same total weight, the mean voxel weight is 1.
    assert inv[0] * f[0] == pytest.approx(inv[1] * f[1])
    assert float((inv * f).sum()) == pytest.approx(1.0)
    sq = class_weights(f, "sqrt")
    assert sq[1] / sq[0] == pytest.approx(math.sqrt(3))
    assert np.all(class_weights(f, "none") == 1)
    absent = class_weights(np.array([1.0, 0.0]), "inverse")
    assert absent[1] == absent[0]


def test_weighted_cross_entropy():
    logits = torch.zeros(1, 2, 2, 2)
    target = torch.tensor([[[0, 1], [1, 1]]])
    ones = torch.ones(1, 2, 2)
    assert weighted_cross_entropy(logits, target, ones).item() == pytest.approx(math.log(2))
    logits = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 3, (2, 5, 4), generator=torch.Generator().manual_seed(1))
    ones = torch.ones(2, 5, 4)
    assert weighted_cross_entropy(logits, target, ones).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6
    )
    # Weight 0 ignores a voxel; weights are relative.
    w = torch.zeros(2, 5, 4)
    w[0, 1, 2] = 3.0
    ce = F.cross_entropy(logits, target, reduction="none")
    assert weighted_cross_entropy(logits, target, w).item() == pytest.approx(
        ce[0, 1, 2].item(), rel=1e-6
    )


def test_soft_dice_loss():
    target = torch.tensor([[[0, 1], [1, 0]]])
    perfect = F.one_hot(target, 2).movedim(-1, 1).float() * 40 - 20
    assert soft_dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)
    wrong = -perfect
    assert soft_dice_loss(wrong, target).item() > 0.6
    # Masked voxels do not count.
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    mixed = perfect.clone()
    mixed[:, :, 1, :] = wrong[:, :, 1, :]
    assert soft_dice_loss(mixed, target, mask).item() == pytest.approx(0.0, abs=1e-6)
