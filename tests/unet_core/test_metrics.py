"""Metrics against hand-checked small cases: perfect, empty, off-by-one, merged objects."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.errors import InvalidShapeError, InvalidVolumeError
from unet_core.metrics import (
    adapted_rand_error,
    class_report,
    confusion_matrix,
    dice,
    instance_report,
    instances_from_mask,
    iou,
    match_instances,
    same_partition,
)


def square(shape, top, left, size, value=1, out=None):
    a = np.zeros(shape, dtype=np.int32) if out is None else out
    a[top : top + size, left : left + size] = value
    return a


def test_perfect_prediction():
    gt = square((10, 10), 1, 1, 4)
    square((10, 10), 6, 5, 3, value=2, out=gt)
    assert dice(gt > 0, gt > 0) == [1.0, 1.0]
    assert iou(gt > 0, gt > 0) == [1.0, 1.0]
    s = match_instances(gt, gt)
    assert (s.tp, s.fp, s.fn, s.precision, s.recall, s.f1) == (2, 0, 0, 1.0, 1.0, 1.0)
    assert adapted_rand_error(gt, gt)[0] == pytest.approx(0.0)


def test_empty_cases():
    empty = np.zeros((6, 6), dtype=np.int32)
    # Nothing to find and nothing found: perfect by convention.
    assert dice(empty, empty) == [1.0, 1.0]
    s = match_instances(empty, empty)
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)
    # Objects missed entirely.
    gt = square((6, 6), 1, 1, 2)
    assert dice(empty, gt) == [pytest.approx(2 * 32 / (36 + 32)), 0.0]
    s = match_instances(empty, gt)
    assert (s.tp, s.fn, s.precision, s.recall, s.f1) == (0, 1, 0.0, 0.0, 0.0)
    # Objects invented.
    s = match_instances(gt, empty)
    assert (s.fp, s.precision, s.recall, s.f1) == (1, 0.0, 0.0, 0.0)


def test_off_by_one_object():
    gt = square((10, 10), 2, 2, 4)
    pred = square((10, 10), 2, 3, 4)  # shifted one pixel: overlap 12 of 16
    assert dice(pred, gt)[1] == pytest.approx(2 * 12 / 32)
    assert iou(pred, gt)[1] == pytest.approx(12 / 20)
    s = match_instances(pred, gt)
    assert (s.tp, s.f1) == (1, 1.0)
    assert s.mean_matched_iou == pytest.approx(0.6)
    far = square((10, 10), 2, 4, 4)  # shifted two: IoU 8 / 24 < 0.5
    s = match_instances(far, gt)
    assert (s.tp, s.fp, s.fn, s.f1) == (0, 1, 1, 0.0)
    # IoU exactly 0.5 counts as a match (>= threshold).
    half = np.zeros((4, 4), dtype=np.int32)
    half[0, :2] = 1
    g = np.zeros((4, 4), dtype=np.int32)
    g[0, :1] = 1
    assert match_instances(half, g).tp == 1


def test_matching_is_one_to_one():
    gt = square((8, 12), 0, 0, 4, value=1)
    square((8, 12), 0, 4, 4, value=2, out=gt)
    merged = square((8, 12), 0, 0, 8)[:, :12] * 0
    merged[0:4, 0:8] = 7  # one object over both true ones: IoU 0.5 with each
    s = match_instances(merged, gt)
    assert (s.tp, s.fp, s.fn) == (1, 0, 1)
    assert s.precision == 1.0
    assert s.recall == 0.5
    assert s.f1 == pytest.approx(2 / 3)
    # Ids need not be consecutive; the report adds Rand error and foreground Dice.
    r = instance_report(merged, gt)
    assert r["foreground_dice"] == 1.0
    assert r["rand_error"] > 0.3


def brute_force_rand(pred, gt):
    """Foreground-restricted Rand F-score by counting ordered voxel pairs (self-pairs too)."""
    p, g = pred.reshape(-1), gt.reshape(-1)
    keep = g > 0
    p, g = p[keep], g[keep]
    same_g = g[:, None] == g[None, :]
    same_p = (p[:, None] == p[None, :]) & (p[:, None] > 0)
    same_p |= np.eye(p.size, dtype=bool)  # predicted background: each voxel on its own
    both = float((same_g & same_p).sum())
    precision, recall = both / same_p.sum(), both / same_g.sum()
    return 1 - 2 * precision * recall / (precision + recall), precision, recall


def test_rand_error_by_hand_and_by_pair_counting():
    # Two true objects of 2 voxels each; the prediction merges them.
    gt = np.array([1, 1, 2, 2])
    pred = np.array([5, 5, 5, 5])
    err, precision, recall = adapted_rand_error(pred, gt)
    # sum n_ij² = 8, sum a_i² = 8, sum b_j² = 16: precision 0.5, recall 1.
    assert (precision, recall) == (0.5, 1.0)
    assert err == pytest.approx(1 - 2 * 0.5 / 1.5)
    # A split instead: precision 1, recall 0.5.
    assert adapted_rand_error(np.array([1, 2, 3, 4]), np.array([1, 1, 1, 1]))[1:] == (1.0, 0.25)
    # Ground-truth background is ignored; predicted background voxels are singletons.
    assert adapted_rand_error(np.array([1, 1, 0, 9]), np.array([1, 1, 0, 0]))[0] == 0.0
    assert adapted_rand_error(np.array([0, 0]), np.array([1, 1]))[1:] == (1.0, 0.5)
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.integers(0, 5, size=(12, 12))
        p = rng.integers(0, 4, size=(12, 12))
        np.testing.assert_allclose(adapted_rand_error(p, g), brute_force_rand(p, g), rtol=1e-12)


def test_class_report_and_confusion():
    gt = np.array([[0, 1, 2], [2, 2, 0]])
    pred = np.array([[0, 1, 1], [2, 2, 2]])
    cm = confusion_matrix(pred, gt, 3)
    assert cm.tolist() == [[1, 0, 1], [0, 1, 0], [0, 1, 2]]
    r = class_report(pred, gt, 3, ["bg", "a", "b"])
    assert r["dice"]["a"] == pytest.approx(2 / 3)
    assert r["dice"]["b"] == pytest.approx(2 * 2 / 6)
    assert r["mean_dice"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert r["iou"]["bg"] == pytest.approx(1 / 2)
    with pytest.raises(InvalidShapeError):
        dice(pred, gt[:1])
    with pytest.raises(InvalidVolumeError, match="class ids"):
        dice(pred, gt, 2)


def test_instances_from_mask_drops_small_objects():
    mask = square((10, 10), 0, 0, 3) > 0
    mask[8, 8] = True
    lab = instances_from_mask(mask)
    assert lab.max() == 2
    lab = instances_from_mask(mask, min_size=2)
    assert lab.max() == 1
    assert lab[8, 8] == 0
    assert lab[0, 0] == 1


def test_same_partition_ignores_ids_but_not_splits_or_merges():
    a = np.array([[1, 1, 0, 2], [3, 3, 0, 2]])
    assert same_partition(a, np.array([[7, 7, 0, 5], [9, 9, 0, 5]]))
    assert not same_partition(a, np.array([[1, 1, 0, 2], [1, 1, 0, 2]]))  # merged
    assert not same_partition(a, np.array([[1, 4, 0, 2], [3, 3, 0, 2]]))  # split
    assert not same_partition(a, np.array([[1, 1, 0, 2], [3, 3, 3, 2]]))  # other foreground


def test_the_mode_follows_the_ids() -> None:
    from scipy import ndimage

    from unet_core.metrics import choose_mode, foreground_report, label_kind

    rng = np.random.default_rng(0)
    blobs = ndimage.gaussian_filter(rng.random((64, 64)), 2) > 0.5
    inst, n = ndimage.label(blobs)
    assert n > 8
    assert label_kind(inst) == ("instances", n)
    assert label_kind(blobs.astype(np.uint8))[0] == "binary"
    ring = np.zeros((20, 20), np.uint8)  # interior 1 and boundary 2 of two objects: classes
    ring[2:8, 2:8], ring[3:7, 3:7] = 2, 1
    ring[12:18, 12:18], ring[13:17, 13:17] = 2, 1
    assert label_kind(ring)[0] == "classes"
    assert choose_mode(blobs.astype(np.uint8), inst)[0] == "foreground"
    assert choose_mode(inst, inst)[0] == "instances"
    assert choose_mode(inst, blobs)[0] == "instances"
    assert choose_mode(ring, ring)[0] == "classes"
    fg = foreground_report(blobs, inst)
    assert fg["dice"] == fg["iou"] == fg["precision"] == fg["recall"] == 1.0
    half = blobs.copy()
    half[:32] = False
    assert foreground_report(half, inst)["precision"] == 1.0
    assert foreground_report(half, inst)["recall"] < 1.0


def test_labels_that_look_like_images_are_named() -> None:
    from unet_core.targets import image_problem, label_problem

    rng = np.random.default_rng(1)
    image = (rng.random((32, 32)) * 4000).astype(np.uint16)
    labels = np.zeros((64, 64), np.uint16)
    labels[4:12, 4:12], labels[40:48, 40:48] = 1, 2
    assert label_problem(labels) is None
    assert image_problem(image) is None
    assert "neighbouring voxels differ" in str(label_problem(image))
    assert "fractional" in str(label_problem(image / 7.0))
    assert "0 over" in str(image_problem(labels))
    dense = np.arange(1, 33, dtype=np.uint16).repeat(32).reshape(32, 32)  # 32 ids, no 0
    assert "background" in str(label_problem(dense))
    assert label_problem(dense, background=False) is None
