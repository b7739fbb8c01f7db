from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unet_core import UNetConfig
from unet_core.errors import ConfigError
from unet_core.geometry import (
    Box,
    ChunkGrid,
    Coord,
    TileSpec,
    ceildiv,
    plan_blocks,
    plan_tiles,
)


def test_box_operations():
    a = Box((2, 3), (4, 5))
    assert a.end == (6, 8)
    assert a.size == 20
    assert a.intersect(Box((4, 0), (10, 4))) == Box((4, 3), (2, 1))
    assert a.intersect(Box((10, 10), (1, 1))).empty
    assert a.to_slices() == (slice(2, 6), slice(3, 8))
    assert a.to_slices(Box((1, 1), (9, 9))) == (slice(1, 5), slice(2, 7))
    assert Box((0, 0), (10, 10)).contains(a)
    with pytest.raises(ConfigError):
        Box((0,), (-1,))
    with pytest.raises(AttributeError):
        a.offset = (0, 0)  # type: ignore[misc]


def test_block_halo_is_derived():
    spec = TileSpec(UNetConfig(ndim=2, depth=2), 2)
    [block, *_] = plan_blocks(spec, (100, 90), (32, 32), tile_shape=(64, 64))
    before, after = block.halo
    assert before == (20, 20)  # context of a depth-2 valid net
    assert all(a >= 20 for a in after)


def test_paper_tile_on_a_large_image():
    spec = TileSpec(UNetConfig(ndim=2, depth=4), 2)
    read, tiles = plan_tiles(spec, Box.of_shape((1000, 1000)), (572, 572))
    # 572 (388 usable, advancing by 384, a multiple of 16) needs three tiles per axis; the
    # tiles are then shrunk to the smallest valid size that still needs three: 1000 / 3
    # -> 336 on the grid -> 524 (340 usable).
    assert {t.read.shape for t in tiles} == {(524, 524)}
    assert len(tiles) == 9
    assert read.begin == (-92, -92)


def test_requested_tile_is_an_upper_bound_balanced_over_the_block():
    # A same net (context 20 -> margins 22, pooling grid 4) and a 256-wide block: a 300 tile
    # leaves 256 usable but starts 2 voxels early on the grid, so it needs two tiles per
    # axis; they shrink to 176 instead of computing two 300-wide tiles.
    spec = TileSpec(UNetConfig(ndim=2, depth=2, padding="same"), 3)
    write = Box((0, 256, 0), (4, 256, 256))
    _, tiles = plan_tiles(spec, write, (1, 300, 300))
    assert {t.read.shape for t in tiles} == {(1, 176, 176)}
    assert len(tiles) == 4 * 2 * 2
    _, tiles = plan_tiles(spec, write, None)  # no tile asked: one per slice
    assert {t.read.shape for t in tiles} == {(1, 304, 304)}
    assert len(tiles) == 4


def _check_partition(spec, shape, block_shape, tile):
    volume = Box.of_shape(shape)
    reference, _ = plan_tiles(spec, volume, None)
    count = np.zeros(shape, dtype=np.int32)
    for block in plan_blocks(spec, shape, block_shape, tile):
        assert volume.contains(block.write)
        assert block.read.contains(block.write)
        # Read boxes stay within the mirror-extended volume of the reference pass.
        assert reference.contains(block.read), (block, reference)
        read, tiles = plan_tiles(spec, block.write, tile)
        assert read == block.read
        assert len({t.read.shape for t in tiles}) == 1
        inner = np.zeros(block.write.shape, dtype=np.int32)
        for t in tiles:
            assert block.read.contains(t.read)
            # Tile origins sit on the grid anchored at the reference origin.
            g = spec.grid
            assert all(
                (o - r) % gg == 0 for o, r, gg in zip(t.read.begin, reference.begin, g, strict=True)
            )
            # A tile writes only inside its usable output.
            before = [spec.margins_1d(a, s)[0] for a, s in enumerate(t.read.shape)]
            usable = Box(
                tuple(b + m for b, m in zip(t.read.begin, before, strict=True)),
                spec.usable(t.read.shape),
            )
            assert usable.contains(t.write)
            inner[t.write.to_slices(block.write)] += 1
        assert (inner == 1).all()
        count[block.write.to_slices()] += 1
    assert (count == 1).all()


configs = st.builds(
    UNetConfig,
    ndim=st.sampled_from([2, 3]),
    depth=st.integers(1, 4),
    padding=st.sampled_from(["valid", "same"]),
)


@settings(max_examples=150, deadline=None)
@given(
    config=configs,
    volume_ndim=st.sampled_from([2, 3]),
    data=st.data(),
)
def test_blocks_partition_the_volume(config, volume_ndim, data):
    if volume_ndim < config.ndim:
        volume_ndim = config.ndim
    spec = TileSpec(config, volume_ndim)
    shape = tuple(data.draw(st.integers(1, 70)) for _ in range(volume_ndim))
    chunks = tuple(data.draw(st.integers(max(1, n // 5), 40)) for n in shape)
    block = tuple(c * data.draw(st.integers(1, 3)) for c in chunks)
    tile = data.draw(
        st.one_of(st.none(), st.tuples(*[st.integers(1, 200) for _ in range(volume_ndim)]))
    )
    _check_partition(spec, shape, block, tile)


def test_coord_arithmetic_is_element_wise():
    a = Coord((7, -3, 10))
    assert a == (7, -3, 10)
    assert hash(a) == hash((7, -3, 10))
    b = (1, 2, 3)  # a plain tuple on either side adds element-wise too
    assert a + b == (8, -1, 13)
    assert b + a == (8, -1, 13)
    assert a - 1 == (6, -4, 9)
    assert 10 - a == (3, 13, 0)
    assert a * 2 == 2 * a == (14, -6, 20)
    assert a // (2, 2, 3) == (3, -2, 3)
    assert a.ceildiv(4) == (2, 0, 3)
    assert ceildiv(-3, 4) == 0
    assert ceildiv(9, 4) == 3
    assert -a == (-7, 3, -10)
    assert a.minimum((5, 5, 5)) == (5, -3, 5)
    assert a.maximum(0) == (7, 0, 10)
    assert a.all_le((7, 0, 10))
    assert not a.all_lt((7, 0, 10))
    assert a.all_ge((7, -3, 10))
    assert a.all_gt((6, -4, 9))
    assert Coord((2, 3, 4)).product == 24
    assert Coord(()).product == 1
    assert isinstance(a + 1, Coord)
    assert isinstance(Box((0,), (3,)).end, Coord)
    assert Coord(np.array([3, 4])) == (3, 4)
    assert Coord.of(np.int64(2), 3) == (2, 2, 2)
    assert a < (8, 0, 0)  # ordering stays lexicographic (sorting keys keep working)
    assert pickle.loads(pickle.dumps(a)) == a
    assert type(pickle.loads(pickle.dumps(a))) is Coord
    # NumPy treats it as the plain tuple (it calls methods such as .prod or .max if present).
    for f in (np.prod, np.max, np.min, np.sum, np.size, np.ndim, np.argmax, np.any):
        assert f(a) == f((7, -3, 10)), f
    assert np.array_equal(np.asarray(a), [7, -3, 10])
    with pytest.raises(ConfigError, match="differ in length"):
        a + b[:2]
    with pytest.raises(ConfigError):
        Coord.of(3)


def test_chunk_grid():
    grid = ChunkGrid((10, 7), (4, 3))
    assert grid.grid == (3, 3)
    assert grid.n_blocks == 9
    assert grid.box((0, 0)) == Box((0, 0), (4, 3))
    assert grid.box((2, 2)) == Box((8, 6), (2, 1))  # clipped to the volume
    assert list(grid.indices())[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [grid.flat(i) for i in grid.indices()] == list(range(9))
    assert grid.unflat(5) == (1, 2)
    assert list(grid.intersecting(Box((3, 2), (2, 2)))) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert list(grid.intersecting(Box((-5, -5), (5, 20)))) == []
    assert list(grid.intersecting(Box((9, 6), (100, 100)))) == [(2, 2)]
    assert ChunkGrid((0, 5), (2, 2)).n_blocks == 0
    with pytest.raises(IndexError, match="outside the grid"):
        grid.box((3, 0))
    with pytest.raises(IndexError):
        grid.unflat(9)
    with pytest.raises(ConfigError, match="does not fit"):
        ChunkGrid((10, 7), (4, 0))
    with pytest.raises(ConfigError, match="does not fit"):
        ChunkGrid((10, 7), (4,))


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_chunk_grid_boxes_partition_the_volume(data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.integers(0, 12)) for _ in range(ndim))
    chunks = tuple(data.draw(st.integers(1, 7)) for _ in range(ndim))
    grid = ChunkGrid(shape, chunks)
    count = np.zeros(shape, dtype=np.int32)
    owner = np.full(shape, -1, dtype=np.int64)
    boxes = list(grid.boxes())
    assert len(boxes) == grid.n_blocks
    for n, (index, box) in enumerate(zip(grid.indices(), boxes, strict=True)):
        assert not box.empty
        assert grid.volume.contains(box)
        assert grid.flat(index) == n
        assert grid.unflat(n) == index
        count[box.to_slices()] += 1
        owner[box.to_slices()] = n
    assert (count == 1).all()  # every voxel in exactly one block
    # The blocks intersecting a query box are exactly the owners of its voxels.
    begin = tuple(data.draw(st.integers(-3, n + 2)) for n in shape)
    query = Box(begin, tuple(data.draw(st.integers(0, 8)) for _ in range(ndim)))
    inside = query.intersect(grid.volume)
    expected = sorted(set(owner[inside.to_slices()].ravel().tolist()))
    assert [grid.flat(i) for i in grid.intersecting(query)] == expected
