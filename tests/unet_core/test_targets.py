"""From annotations to training targets: label modes, gaps between objects, object sizes."""

from __future__ import annotations

import numpy as np
import pytest

from unet_core.errors import ConfigError, InvalidVolumeError
from unet_core.metrics import instances_from_mask
from unet_core.targets import (
    inner_boundaries,
    object_sizes,
    object_stats,
    resolve_mode,
    separate_touching,
    to_targets,
)


def touching_pair():
    inst = np.zeros((6, 10), dtype=np.int32)
    inst[1:5, 1:5] = 3
    inst[1:5, 5:9] = 8  # touches object 3 along a whole side
    return inst


def test_auto_mode():
    assert resolve_mode([np.array([[0, 255]])], "auto") == "binary"
    assert resolve_mode([np.array([[0, 1]]), np.array([[0, 2]])], "auto") == "instances"
    assert resolve_mode([np.array([[0, 1, 2]])], "classes") == "classes"


def test_instances_get_a_one_pixel_gap_where_they_touch():
    inst = touching_pair()
    t = to_targets(inst, "instances")
    assert t.classes.dtype == np.uint8
    # The column of the lower id along the contact became background ...
    assert np.all(t.classes[1:5, 4] == 0)
    assert np.all(t.classes[1:5, 5] == 1)
    # ... so the connected components are the two objects again.
    assert instances_from_mask(t.classes == 1).max() == 2
    assert t.instances is not None
    assert sorted(np.unique(t.instances).tolist()) == [0, 1, 2]
    # Diagonal contacts are cut too.
    diag = np.zeros((4, 4), dtype=np.int32)
    diag[0:2, 0:2] = 1
    diag[2:4, 2:4] = 2
    assert separate_touching(diag)[1, 1] == 0
    assert np.array_equal(separate_touching(inst > 0), inst > 0)  # one object: no gap


def test_boundary_mode():
    t = to_targets(touching_pair(), "boundary")
    assert set(np.unique(t.classes).tolist()) == {0, 1, 2}
    # Interior 2 × 2 per object; everything else of the objects is boundary.
    assert (t.classes == 1).sum() == 8
    assert (t.classes == 2).sum() == 32 - 8
    assert inner_boundaries(np.pad(np.ones((3, 3), np.int32), 1)).sum() == 8


def test_binary_and_classes_modes():
    lab = np.array([[0, 255, 255], [0, 0, 255]], dtype=np.uint8)
    t = to_targets(lab, "binary")
    assert t.classes.tolist() == [[0, 1, 1], [0, 0, 1]]
    assert t.instances is not None
    assert t.instances.max() == 1
    # Two values without a zero: the smaller one is background.
    assert to_targets(np.array([[1, 2]]), "binary").classes.tolist() == [[0, 1]]
    c = to_targets(np.array([[0, 1, 2]]), "classes", 3)
    assert c.classes.tolist() == [[0, 1, 2]]
    with pytest.raises(InvalidVolumeError, match="not a class id"):
        to_targets(np.array([[0, 5]]), "classes", 3)
    with pytest.raises(InvalidVolumeError, match="integers"):
        to_targets(np.array([[0.5, 1.0]]), "binary")
    with pytest.raises(ConfigError):
        to_targets(lab, "auto")


def test_object_statistics():
    inst = touching_pair()
    inst[5, 9] = 11
    sizes = object_sizes(inst)
    assert sorted(sizes.tolist()) == [1, 16, 16]
    stats = object_stats(sizes)
    assert (stats.count, stats.min, stats.median, stats.max) == (3, 1.0, 16.0, 16.0)
    assert stats.suggested_min_size >= 1
    assert object_stats([]).count == 0
