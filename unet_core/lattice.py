"""The tile lattice: one tiling of the whole volume, fixed for a run.

Every output voxel is computed by one tile of the lattice, with the same input, shape and
position however the volume is cut into blocks, chunks, regions or workers: the default
(chunk-invariant) mode's guarantee. The boxes, tiles and per-box planner it builds on are in
:mod:`unet_core.geometry`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from unet_core.errors import ConfigError, InvalidShapeError
from unet_core.geometry import (
    Box,
    Coord,
    Tile,
    TileSpec,
    _check_write,
    _combine,
    _coord,
)


@dataclass(frozen=True)
class TileLattice:
    r"""One tiling of the whole volume, fixed for a run: every output voxel has one tile.

    Along each axis tile ``k`` reads ``tile`` voxels from ``anchor + k * step`` (on the
    pooling grid of the whole-volume pass) and **owns** the outputs
    ``[k * step, (k + 1) * step)``, a part of its usable centre::

        volume    0            step         2*step       3*step   n
                  ├────────────┼────────────┼────────────┼────────┤
        tile 0 ◀──┼─── owns ───┼─▶
        tile 1               ◀─┼─── owns ───┼─▶              (each reads its context
        tile 2                            ◀─┼─── owns ───┼─▶  on either side)
        tile 3                                         ◀─┼── owns ┼─ - - ▶

    A block computes the tiles whose owned outputs meet its write box and keeps those
    parts. The lattice depends on the network, the tile shape and the volume shape, never
    on the blocks: a voxel is always computed by the same tile, from the same input, in a
    forward pass of the same shape, so with deterministic kernels the result is bitwise
    the same for any chunking, block order or number of workers. A tile that straddles a
    block border is computed by each block it meets (the same values each time: a cost,
    not an error); blocks whose borders sit on multiples of ``step`` (see
    :meth:`aligned_chunks`) compute every tile once.
    """

    spec: TileSpec
    volume_shape: tuple[int, ...]
    tile: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_shape", _coord(self.volume_shape))
        object.__setattr__(self, "tile", _coord(self.tile))
        ndim = self.spec.volume_ndim
        if len(self.volume_shape) != ndim or any(n < 1 for n in self.volume_shape):
            raise ConfigError(f"volume shape {self.volume_shape} does not fit a {ndim}D lattice")
        if len(self.tile) != ndim:
            raise InvalidShapeError(f"tile shape {self.tile} has {len(self.tile)} axes, not {ndim}")
        for axis, t in enumerate(self.tile):
            if axis < self.spec.slice_axes:
                if t != 1:
                    raise InvalidShapeError(f"a 2D network's tiles are one slice thick, not {t}")
                continue
            smallest = _lattice_size(self.spec, axis, self.spec.grid[axis])
            if self.spec.config._output_size_1d(t) is None or t < smallest:
                raise InvalidShapeError(
                    f"tile {t} on axis {axis} cannot advance on the grid of this network "
                    f"(the smallest lattice tile is {smallest})"
                )

    @property
    def ndim(self) -> int:
        return len(self.tile)

    @property
    def step(self) -> tuple[int, ...]:
        """Outputs each tile owns per axis (a multiple of the grid on the model's axes)."""
        return tuple(_lattice_step(self.spec, a, t) for a, t in enumerate(self.tile))

    @property
    def counts(self) -> tuple[int, ...]:
        """Tiles per axis."""
        return tuple(-(-n // s) for n, s in zip(self.volume_shape, self.step, strict=True))

    @property
    def n_tiles(self) -> int:
        n = 1
        for c in self.counts:
            n *= c
        return n

    def origin(self, axis: int, k: int) -> int:
        """First input voxel of tile ``k`` along ``axis`` (volume coordinates)."""
        if axis < self.spec.slice_axes:
            return k
        return self.spec.anchor(axis) + k * self.step[axis]

    def _axis(self, axis: int, begin: int, end: int) -> list[tuple[int, int, int]]:
        s = self.step[axis]
        return [
            (self.origin(axis, k), max(k * s, begin), min((k + 1) * s, end))
            for k in range(begin // s, (end - 1) // s + 1)
        ]

    def plan(self, write: Box) -> tuple[Box, list[Tile]]:
        """The lattice tiles a block writing ``write`` computes; returns (read box, tiles)."""
        _check_write(self.spec, write)
        if not Box.of_shape(self.volume_shape).contains(write):
            raise ConfigError(f"box {write} leaves the volume {self.volume_shape}")
        per_axis = [
            self._axis(a, b, e) for a, (b, e) in enumerate(zip(write.begin, write.end, strict=True))
        ]
        return _combine(per_axis, self.tile)

    def computed_voxels(self, block_shape: Sequence[int]) -> int:
        """Input voxels the forward passes of all blocks of ``block_shape`` cover together.

        Equal to ``n_tiles * prod(tile)`` when block borders sit on the lattice, more when
        blocks share tiles.
        """
        total = 1
        for axis, (n, b, t) in enumerate(
            zip(self.volume_shape, _coord(block_shape), self.tile, strict=True)
        ):
            per_axis = sum(len(self._axis(axis, i, min(i + b, n))) for i in range(0, n, b))
            total *= per_axis * t
        return total

    def aligned_chunks(self, preferred: Sequence[int]) -> tuple[int, ...]:
        """Chunks near ``preferred`` whose borders sit on the lattice: whole multiples of
        ``step`` on the model's axes (the whole axis where one tile covers it)."""
        out = []
        for axis, (n, c, s, k) in enumerate(
            zip(self.volume_shape, _coord(preferred), self.step, self.counts, strict=True)
        ):
            if axis < self.spec.slice_axes:
                out.append(min(max(c, 1), n))
            elif k == 1:
                out.append(n)
            else:
                out.append(min(s * max(1, round(c / s)), n))
        return tuple(out)

    def misaligned_axes(self, block_shape: Sequence[int]) -> list[int]:
        """Axes along which blocks of ``block_shape`` cut through lattice tiles."""
        return [
            a
            for a, (n, b, s) in enumerate(
                zip(self.volume_shape, _coord(block_shape), self.step, strict=True)
            )
            if b < n and b % s
        ]


def _lattice_lag(spec: TileSpec, axis: int) -> int:
    """Voxels between a tile's first usable output and its first owned one (0 for valid
    networks; below one grid step for same networks, whose anchor is rounded to the grid)."""
    return -spec.anchor(axis) - spec.before(axis)


def _lattice_step(spec: TileSpec, axis: int, size: int, lag: int | None = None) -> int:
    if axis < spec.slice_axes:
        return 1
    g = spec.grid[axis]
    lag = _lattice_lag(spec, axis) if lag is None else lag
    return g * ((spec.usable_1d(axis, size) - lag) // g)


def _lattice_size(spec: TileSpec, axis: int, step: int) -> int:
    """The smallest tile whose lattice step is at least ``step``."""
    return spec.valid_size(axis, 1, usable=step + _lattice_lag(spec, axis))


def _lattice_candidates(spec: TileSpec, axis: int, n: int, largest: int) -> list[tuple[int, int]]:
    """(tile, tiles needed) along one axis, the smallest tile for each count, up to
    ``largest`` (or the one tile that covers the axis); tiles ascending, counts descending."""
    g = spec.grid[axis]
    lag = _lattice_lag(spec, axis)
    size = _lattice_size(spec, axis, g)
    whole = _lattice_size(spec, axis, g * -(-n // g))
    out: list[tuple[int, int]] = []
    while True:
        count = -(-n // _lattice_step(spec, axis, size, lag))
        if not out or count < out[-1][1]:
            out.append((size, count))
        if size >= min(largest, whole):
            break
        size = spec.config.valid_input_size_1d(size + 1)
        if size > largest:
            break
    return out


def plan_lattice(
    spec: TileSpec,
    volume_shape: Sequence[int],
    tile_shape: Sequence[int] | None = None,
    max_voxels: int | None = None,
) -> TileLattice:
    """The tile lattice of a run: the tile shape that computes the fewest voxels in all.

    ``tile_shape`` bounds each axis (rounded up to a valid size, as in :func:`plan_tiles`);
    ``max_voxels`` bounds one tile's voxels on the model's axes (default: those of
    ``tile_shape``, else of :meth:`TileSpec.default_tile_shape`, which sizes a forward
    pass for CPU memory). Where the volume is small, one tile covers an axis; elsewhere the
    tiles are balanced so the last one does not compute mostly mirrored voxels.
    """
    shape = _coord(volume_shape)
    if len(shape) != spec.volume_ndim or any(n < 1 for n in shape):
        raise ConfigError(f"volume shape {shape} does not fit a {spec.volume_ndim}D network")
    model_axes = list(range(spec.slice_axes, spec.volume_ndim))
    if tile_shape is not None:
        bound = spec.valid_tile_shape(tile_shape)
    else:
        bound = Coord((1,) * spec.slice_axes + (max(shape) * 4 + 4096,) * len(model_axes))
    budget = max_voxels
    if budget is None:
        reference = spec.default_tile_shape() if tile_shape is None else bound
        budget = 1
        for a in model_axes:
            budget *= reference[a]
    candidates = []
    for a in model_axes:
        smallest = _lattice_size(spec, a, spec.grid[a])
        others = 1
        for b in model_axes:
            if b != a:
                others *= _lattice_size(spec, b, spec.grid[b])
        largest = max(min(bound[a], budget // others), smallest)
        options = _lattice_candidates(spec, a, shape[a], largest)
        if len(options) > 32:  # thin very long axes: neighbouring sizes cost nearly the same
            keep = sorted({round(i * (len(options) - 1) / 31) for i in range(32)})
            options = [options[i] for i in keep]
        candidates.append(options)
    best: tuple[int, int, tuple[int, ...]] | None = None
    for combo in itertools.product(*candidates):
        voxels = 1
        cost = 1
        for size, count in combo:
            voxels *= size
            cost *= size * count
        if voxels > budget:
            continue
        key = (cost, voxels, tuple(size for size, _ in combo))
        if best is None or key < best:
            best = key
    sizes = best[2] if best else tuple(options[0][0] for options in candidates)
    return TileLattice(spec, shape, (1,) * spec.slice_axes + sizes)
