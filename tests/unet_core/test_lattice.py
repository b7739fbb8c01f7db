"""The tile lattice: one tiling per volume, whatever the blocks."""

from __future__ import annotations

import math

import pytest

from unet_core import UNetConfig
from unet_core.errors import ConfigError, InvalidShapeError
from unet_core.geometry import Box, ChunkGrid, TileSpec
from unet_core.lattice import TileLattice, plan_lattice

NETS = [
    (UNetConfig(ndim=2, depth=2), (70, 53), (60, 60)),
    (UNetConfig(ndim=2, depth=2, padding="same"), (61, 50), (64, 64)),
    (UNetConfig(ndim=3, depth=2), (23, 29, 31), (56, 52, 60)),
    (UNetConfig(ndim=3, depth=2, padding="same"), (19, 33, 26), (64, 64, 64)),
    (UNetConfig(ndim=2, depth=3), (3, 61, 50), (1, 100, 100)),  # slice by slice
]


def owner(lattice: TileLattice, voxel: tuple[int, ...]) -> Box:
    """Read box of the tile that owns a voxel, from the lattice's own arithmetic."""
    ks = [v // s for v, s in zip(voxel, lattice.step, strict=True)]
    return Box(tuple(lattice.origin(a, k) for a, k in enumerate(ks)), lattice.tile)


@pytest.mark.parametrize(("config", "shape", "bound"), NETS)
def test_every_voxel_has_one_tile_whatever_the_blocks(config, shape, bound):
    spec = TileSpec(config, len(shape))
    lattice = plan_lattice(spec, shape, bound)
    assert all(t <= b for t, b in zip(lattice.tile, spec.valid_tile_shape(bound), strict=True))
    volume = Box.of_shape(shape)
    _, whole = lattice.plan(volume)
    assert len(whole) == lattice.n_tiles == math.prod(lattice.counts)
    chunkings = [(7,) * len(shape), (5, 16, 11)[-len(shape) :], shape]
    for chunks in chunkings:
        seen = 0
        for write in ChunkGrid(shape, chunks).boxes():
            read, tiles = lattice.plan(write)
            for tile in tiles:
                assert read.contains(tile.read)
                assert tile.read.shape == lattice.tile
                # The tile computing these voxels is the lattice's, not the block's choice:
                assert owner(lattice, tile.write.begin) == tile.read
                last = tuple(e - 1 for e in tile.write.end)
                assert owner(lattice, last) == tile.read
                # Origins on the pooling grid of the whole-volume pass, outputs usable.
                for a in range(spec.slice_axes, len(shape)):
                    g, anchor = spec.grid[a], spec.anchor(a)
                    assert (tile.read.begin[a] - anchor) % g == 0
                    before, after = spec.margins_1d(a, tile.read.shape[a])
                    assert tile.read.begin[a] + before <= tile.write.begin[a]
                    assert tile.write.end[a] <= tile.read.end[a] - after
                seen += tile.write.size
        assert seen == volume.size


def test_tile_is_chosen_for_the_volume_within_the_budget():
    spec = TileSpec(UNetConfig(ndim=3, depth=2, base_channels=8), 3)
    lattice = plan_lattice(spec, (48, 256, 256))
    budget = math.prod(spec.default_tile_shape())
    assert math.prod(lattice.tile) <= budget
    # z is thin: one tile covers it (48 outputs + 2 x 20 context).
    assert lattice.tile[0] == 88
    assert lattice.counts[0] == 1
    # Fewer voxels than cubes of the same or a smaller bound compute.
    cube = plan_lattice(spec, (48, 256, 256), (132, 132, 132))
    assert lattice.n_tiles * math.prod(lattice.tile) <= cube.n_tiles * math.prod(cube.tile)
    # A small volume is one tile; a tight budget gives smaller tiles, never none.
    assert plan_lattice(spec, (10, 12, 9)).n_tiles == 1
    small = plan_lattice(spec, (48, 256, 256), max_voxels=1)
    assert small.step == (4, 4, 4)


def test_aligned_chunks_and_the_price_of_others():
    spec = TileSpec(UNetConfig(ndim=2, depth=2), 2)
    lattice = TileLattice(spec, (100, 90), (60, 60))
    assert lattice.step == (20, 20)
    assert lattice.counts == (5, 5)
    chunks = lattice.aligned_chunks((32, 64))
    assert chunks == (40, 60)
    ideal = lattice.n_tiles * 60 * 60
    assert lattice.misaligned_axes(chunks) == []
    assert lattice.computed_voxels(chunks) == ideal
    assert lattice.misaligned_axes((32, 90)) == [0]
    assert lattice.computed_voxels((32, 90)) > ideal
    # One tile covering an axis: the chunk is the whole axis.
    assert TileLattice(spec, (18, 90), (60, 60)).aligned_chunks((16, 16)) == (18, 20)


def test_bad_lattices_are_refused():
    same = TileSpec(UNetConfig(ndim=2, depth=2, padding="same"), 2)
    with pytest.raises(InvalidShapeError, match="cannot advance"):
        TileLattice(same, (50, 50), (48, 48))  # 4 usable, 2 of them before the grid line
    spec = TileSpec(UNetConfig(ndim=2, depth=2), 2)
    with pytest.raises(InvalidShapeError):
        TileLattice(spec, (50, 50), (45, 45))  # not a valid input size
    with pytest.raises(ConfigError, match="leaves the volume"):
        TileLattice(spec, (50, 50), (60, 60)).plan(Box((40, 0), (20, 10)))
