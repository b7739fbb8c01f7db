"""Slice linking: one-to-one links by overlap, cuts at waists, and a scored synthetic stack."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from unet_core.errors import ConfigError
from unet_core.metrics import instances_from_mask, match_instances
from unet_core.slicelink import (
    LinkParams,
    Overlaps,
    SliceObjects,
    label_slices,
    link,
    link_instances,
    link_labels,
    planar_structure,
    slice_objects,
    slice_overlaps,
)
from unet_core.synthetic import blobs, touching_along
from unet_core.targets import separate_touching


def disk(shape: tuple[int, int], centre: tuple[float, float], r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= r**2


def ball_stack(radii: list[float], centre=(20.0, 20.0), shape=(40, 40)) -> np.ndarray:
    """A stack whose slice z holds one disk of radius ``radii[z]`` (0: empty)."""
    return np.stack([disk(shape, centre, r) if r > 0 else np.zeros(shape, bool) for r in radii])


def n_objects(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels > 0]))


def test_planar_structure_connects_within_slices_only():
    s = planar_structure(3, 1)
    assert s.shape == (3, 3, 3)
    assert not s[0].any()
    assert not s[2].any()
    assert s[1].sum() == 5
    assert planar_structure(3, 3)[1].all()  # clamped to the plane: edges and corners
    mask = np.zeros((2, 4, 4), bool)
    mask[0, 1, 1] = mask[1, 1, 1] = mask[0, 2, 2] = True
    labels, n = label_slices(mask, connectivity=1)
    assert n == 3
    assert labels[0, 1, 1] != labels[1, 1, 1]
    assert label_slices(mask, connectivity=2)[1] == 2  # the diagonal pair joins in-plane


def test_two_nuclei_stacked_straight_are_cut_at_the_waist():
    # Two objects one above the other: areas rise and fall twice; 3D components merge them.
    mask = ball_stack([4, 8, 10, 8, 3, 8, 11, 9, 5])
    assert ndimage.label(mask)[1] == 1
    params = LinkParams(iou=0.1, area_depth=0.3)
    out = link_instances(mask, params=params)
    assert n_objects(out) == 2
    # The waist slice (radius 3) goes with the neighbour it overlaps more: radius 8 on
    # both sides, so the upper one (tie).
    assert out[4].max() == out[0].max() != out[5].max()
    # A single object with a shallow dip is not cut.
    assert n_objects(link_instances(ball_stack([4, 8, 10, 9, 10, 8, 4]), params=params)) == 1
    # The waist is a parameter: a stricter depth keeps the pair joined.
    assert n_objects(link_instances(mask, params=LinkParams(iou=0.1, area_depth=0.95))) == 1


def test_links_are_one_to_one_and_need_the_threshold():
    shape = (40, 60)
    big = disk(shape, (20, 30), 15)
    small = disk(shape, (20, 20), 6) | disk(shape, (20, 41), 6)
    mask = np.stack([big, big, small, small])
    out = link_instances(mask, params=LinkParams(iou=0.05, area_depth=0.0))
    # The big object continues into at most one of the two small ones below it.
    assert n_objects(out) == 2
    sizes = sorted(np.bincount(out.reshape(-1))[1:])
    assert sizes[0] == 2 * small.sum() // 2
    # Shifted far enough, a disk's IoU with the one above drops under the threshold.
    shifted = np.stack([disk(shape, (20, 30), 8), disk(shape, (20, 39), 8)])
    assert n_objects(link_instances(shifted, params=LinkParams(iou=0.5))) == 2
    assert n_objects(link_instances(shifted, params=LinkParams(iou=0.1))) == 1


def test_tables_and_decisions_do_not_depend_on_how_objects_are_numbered():
    rng = np.random.default_rng(0)
    image, truth = blobs((12, 96, 96), rng=3, spacing=(3, 1, 1), stacked=0.5)
    mask = np.stack([separate_touching(s) for s in truth]) & (rng.random(truth.shape) > 0.02)
    labels, n = label_slices(mask)
    objects = slice_objects(labels, n, image)
    a, b, count = slice_overlaps(labels)
    params = LinkParams(intensity_depth=0.1)
    ref = link_labels(objects, link(objects, Overlaps(a - 1, b - 1, count), params))
    # The same tables under a random numbering of the slice objects.
    perm = rng.permutation(n)
    inv = np.argsort(perm)
    shuffled = SliceObjects(*(getattr(objects, f)[perm] for f in ("z", "area", "intensity", "key")))
    order = rng.permutation(a.size)
    overlaps = Overlaps(inv[a[order] - 1], inv[b[order] - 1], count[order])
    got = link_labels(shuffled, link(shuffled, overlaps, params))
    assert np.array_equal(got, ref[perm])
    # The table: areas, slices and first voxels agree with scipy.
    ids = np.arange(1, n + 1)
    assert np.array_equal(objects.area, ndimage.sum_labels(np.ones_like(labels), labels, ids))
    firsts = ndimage.minimum_position(np.arange(labels.size).reshape(labels.shape), labels, ids)
    assert np.array_equal(objects.z, [f[0] for f in firsts])
    sums = ndimage.sum_labels(image.astype(np.int64), labels, ids)
    assert np.array_equal(objects.intensity, sums.astype(np.int64))


def test_a_stack_with_nuclei_touching_along_z_is_scored():
    image, truth = blobs((18, 160, 160), rng=11, spacing=(3, 1, 1), stacked=0.5)
    assert touching_along(truth, axis=0) >= 1 / 3
    # A 2D segmentation that separates touching objects in each slice (what the network
    # learns from instance labels); its 3D components merge the objects stacked in z.
    mask = np.stack([separate_touching(s) for s in truth])
    components = match_instances(instances_from_mask(mask, 20), truth)
    slices = match_instances(link_instances(mask, image, min_size=20), truth)
    assert components.f1 < 0.6
    assert slices.f1 >= 0.85
    assert slices.f1 > components.f1 + 0.3


def test_bad_parameters_are_refused():
    with pytest.raises(ConfigError, match=r"link IoU 1\.5"):
        LinkParams(iou=1.5)
    with pytest.raises(ConfigError, match="area_depth"):
        LinkParams(area_depth=1.0)
