r"""Boxes, tiles and blocks: where each piece of the volume is read, computed and written.

Vocabulary (after daisy): a :class:`Box` is an offset and a shape in voxels. A
:class:`Block` pairs the box it **writes** with the larger box it **reads**; the
difference is the halo, always derived, never stored. Inside a block the network runs on
**tiles** of one valid input shape; each tile keeps the centre of its output (the usable
part, ``context`` voxels in from every side) and writes a sub-box of the block::

      read box of the block (mirror-extended only where it leaves the volume)
    ┌───────────────────────────────────────────────┐
    │ context                                       │
    │   ┌───────────────┬───────────────┬───────┐   │
    │   │ tile 0 writes │ tile 1 writes │ tile 2│   │   tile k reads its write box grown by
    │   │               │               │ writes│   │   the context; tile origins lie on the
    │   ├───────────────┼───────────────┼───────┤   │   2**depth grid anchored where the
    │   │ ...           │               │       │   │   whole-volume pass starts, so every
    │   └───────────────┴───────────────┴───────┘   │   tile computes exactly what one pass
    │                                               │   over the whole volume would.
    │           write box of the block              │
    └───────────────────────────────────────────────┘

Everything is in volume coordinates: voxel 0 is the first voxel of the volume; boxes may
reach below 0 or beyond the volume, where data is mirror-extended.

The reference pass (no tiling) is the special case of one tile whose input starts at
the anchor (``-context`` for a valid network) and is the smallest valid size covering the
volume plus the margins.

Two planners: :func:`plan_tiles` plans the tiles of one box (fewest voxels for that box);
:class:`unet_core.lattice.TileLattice` (from ``plan_lattice``) fixes one tiling of the
whole volume, so that the tile computing a voxel does not depend on how the volume is cut
into blocks.
"""

from __future__ import annotations

import functools
import itertools
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import SupportsInt

from unet_core.config import UNetConfig
from unet_core.errors import ConfigError, InvalidShapeError


def ceildiv(a: int, b: int) -> int:
    """``a / b`` rounded up, for integers (``b > 0``)."""
    return -(-a // b)


_Operand = Sequence[int] | int


class Coord(tuple[int, ...]):
    """An immutable point or extent in voxels, one int per axis.

    A vector, not a sequence to concatenate: ``+ - * //`` work element-wise against another
    coordinate of the same length or against one int (``Coord((4, 6)) // 2 == (2, 3)``);
    unpack to concatenate (``Coord((*a, *b))``). It equals and hashes like the plain tuple
    of its values, and ``<``/``<=`` stay tuple (lexicographic) comparisons; the per-axis
    comparisons are :meth:`all_le`, :meth:`all_lt` and friends.
    """

    __slots__ = ()

    def __new__(cls, values: Iterable[SupportsInt] = ()) -> Coord:
        return super().__new__(cls, (int(v) for v in values))

    @classmethod
    def of(cls, values: _Operand, ndim: int | None = None) -> Coord:
        """``values`` as a coordinate; an int is repeated over ``ndim`` axes."""
        if isinstance(values, (int, Integral)):
            if ndim is None:
                raise ConfigError("a scalar coordinate needs the number of dimensions")
            return cls((int(values),) * ndim)
        return values if type(values) is cls else cls(values)

    @classmethod
    def fill(cls, value: int, ndim: int) -> Coord:
        return cls((value,) * ndim)

    # No methods named like NumPy reductions (prod, min, max, sum, size, ndim, ...): NumPy
    # calls those on any object, np.prod(coord) must stay the product of a plain tuple.

    @property
    def product(self) -> int:
        """The product of the values (the voxel count of a shape)."""
        n = 1
        for v in self:
            n *= v
        return n

    def _pairs(self, other: _Operand) -> Iterator[tuple[int, int]]:
        if isinstance(other, (int, Integral)):
            b = int(other)
            return ((a, b) for a in self)
        if len(other) != len(self):
            raise ConfigError(f"coordinates {tuple(self)} and {tuple(other)} differ in length")
        return zip(self, (int(b) for b in other), strict=True)

    def _map(self, op: Callable[[int, int], int], other: _Operand) -> Coord:
        return Coord(op(a, b) for a, b in self._pairs(other))

    def __add__(self, other: _Operand) -> Coord:  # type: ignore[override]
        return self._map(operator.add, other)

    def __radd__(self, other: _Operand) -> Coord:
        return self._map(operator.add, other)

    def __sub__(self, other: _Operand) -> Coord:
        return self._map(operator.sub, other)

    def __rsub__(self, other: _Operand) -> Coord:
        return self._map(lambda a, b: b - a, other)

    def __mul__(self, other: _Operand) -> Coord:  # type: ignore[override]
        return self._map(operator.mul, other)

    def __rmul__(self, other: _Operand) -> Coord:  # type: ignore[override]
        return self._map(operator.mul, other)

    def __floordiv__(self, other: _Operand) -> Coord:
        return self._map(operator.floordiv, other)

    def __neg__(self) -> Coord:
        return Coord(-a for a in self)

    def ceildiv(self, other: _Operand) -> Coord:
        """Element-wise division rounded up (e.g. chunks per axis)."""
        return self._map(ceildiv, other)

    def minimum(self, other: _Operand) -> Coord:
        """Element-wise minimum."""
        return self._map(min, other)

    def maximum(self, other: _Operand) -> Coord:
        """Element-wise maximum."""
        return self._map(max, other)

    def all_le(self, other: _Operand) -> bool:
        return all(a <= b for a, b in self._pairs(other))

    def all_lt(self, other: _Operand) -> bool:
        return all(a < b for a, b in self._pairs(other))

    def all_ge(self, other: _Operand) -> bool:
        return all(a >= b for a, b in self._pairs(other))

    def all_gt(self, other: _Operand) -> bool:
        return all(a > b for a, b in self._pairs(other))

    def __repr__(self) -> str:
        return f"Coord({tuple(self)!r})"


def _coord(values: _Operand, ndim: int | None = None) -> Coord:
    return Coord.of(values, ndim)


@dataclass(frozen=True, init=False)
class Box:
    """An axis-aligned box: ``offset`` (may be negative) and ``shape`` (>= 0)."""

    offset: Coord
    shape: Coord

    def __init__(self, offset: Sequence[int], shape: Sequence[int]) -> None:
        object.__setattr__(self, "offset", _coord(offset))
        object.__setattr__(self, "shape", _coord(shape))
        if len(self.offset) != len(self.shape):
            raise ConfigError(f"box offset {self.offset} and shape {self.shape} differ in length")
        if any(s < 0 for s in self.shape):
            raise ConfigError(f"box shape {self.shape} has a negative extent")

    @classmethod
    def from_bounds(cls, begin: Sequence[int], end: Sequence[int]) -> Box:
        begin = _coord(begin)
        return cls(begin, (_coord(end) - begin).maximum(0))

    @classmethod
    def of_shape(cls, shape: Sequence[int]) -> Box:
        shape = _coord(shape)
        return cls(Coord.fill(0, len(shape)), shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def begin(self) -> Coord:
        return self.offset

    @property
    def end(self) -> Coord:
        return self.offset + self.shape

    @property
    def size(self) -> int:
        return self.shape.product

    @property
    def empty(self) -> bool:
        return self.size == 0

    def intersect(self, other: Box) -> Box:
        begin = self.begin.maximum(other.begin)
        return Box.from_bounds(begin, self.end.minimum(other.end).maximum(begin))

    def contains(self, other: Box) -> bool:
        return self.begin.all_le(other.begin) and other.end.all_le(self.end)

    def to_slices(self, relative_to: Box | Sequence[int] | None = None) -> tuple[slice, ...]:
        """Slices of this box, in an array whose first element is ``relative_to``'s origin."""
        origin: Coord
        if relative_to is None:
            origin = Coord.fill(0, self.ndim)
        elif isinstance(relative_to, Box):
            origin = relative_to.offset
        else:
            origin = _coord(relative_to)
        return tuple(
            slice(b, e) for b, e in zip(self.begin - origin, self.end - origin, strict=True)
        )

    def __str__(self) -> str:
        return f"[{', '.join(f'{b}:{e}' for b, e in zip(self.begin, self.end, strict=True))})"


@dataclass(frozen=True)
class Tile:
    """One forward pass: the box its input covers and the box of its output it keeps."""

    read: Box
    write: Box


@dataclass(frozen=True, init=False)
class Block:
    """A unit of parallel work: reads ``read``, writes exactly ``write`` (whole chunks)."""

    index: Coord
    read: Box
    write: Box

    def __init__(self, index: Sequence[int], read: Box, write: Box) -> None:
        object.__setattr__(self, "index", _coord(index))
        object.__setattr__(self, "read", read)
        object.__setattr__(self, "write", write)

    @property
    def halo(self) -> tuple[Coord, Coord]:
        """Voxels read beyond the write box, (before, after) per axis."""
        return self.write.begin - self.read.begin, self.read.end - self.write.end


@dataclass(frozen=True)
class TileSpec:
    """The network's geometry along each spatial axis of a volume.

    A 2D network on a 3D volume runs slice by slice: the leading axis then has no context
    and no grid (context 0, grid 1) and tiles are one slice thick.
    """

    config: UNetConfig
    volume_ndim: int

    def __post_init__(self) -> None:
        if self.volume_ndim not in (2, 3):
            raise ConfigError(f"volumes must have 2 or 3 spatial axes, not {self.volume_ndim}")
        if self.volume_ndim < self.config.ndim:
            raise ConfigError(
                f"a {self.config.ndim}D network cannot run on a {self.volume_ndim}D image"
            )

    @property
    def slice_axes(self) -> int:
        """Leading axes along which the network runs slice by slice (0 or 1)."""
        return self.volume_ndim - self.config.ndim

    @property
    def grid(self) -> Coord:
        return Coord((*(1,) * self.slice_axes, *(self.config.grid,) * self.config.ndim))

    def margins_1d(self, axis: int, size: int) -> tuple[int, int]:
        """Voxels a tile of ``size`` reads beyond its usable output, (before, after).

        ``(context, context)`` for a valid network. A same network's outputs near a tile
        border see the zero padding; its margins come from
        :meth:`UNetConfig.exact_region_1d` (context + 2 on each side for depth >= 2).
        """
        if axis < self.slice_axes:
            return 0, 0
        return _margins(self.config, size)

    def anchor(self, axis: int) -> int:
        """Where the whole-volume pass starts (volume coordinates); tile origins sit on
        ``anchor + k * grid``.

        A valid network starts ``context`` before the volume (the paper's mirrored border).
        A same network starts a whole number of grid steps before it, so its pooling grid
        lines up with ``model(volume)`` run directly: away from the volume border the two
        agree exactly.
        """
        before = self.before(axis)
        if axis < self.slice_axes or self.config.padding == "valid":
            return -before
        g = self.config.grid
        return -g * ceildiv(before, g)

    def before(self, axis: int) -> int:
        """Margin before the usable output; the same for every valid tile size."""
        return self.margins_1d(axis, self.valid_size(axis, 1))[0]

    def usable_1d(self, axis: int, size: int) -> int:
        before, after = self.margins_1d(axis, size)
        return size - before - after

    def valid_size(self, axis: int, n: int, usable: int | None = None) -> int:
        """Smallest valid tile extent >= ``n`` whose usable output is >= ``usable``
        (default: one grid step, so that consecutive tiles can advance on the grid)."""
        if axis < self.slice_axes:
            return 1
        want = self.config.grid if usable is None else max(usable, 1)
        size = self.config.valid_input_size_1d(max(n, 1))
        while self.usable_1d(axis, size) < want:
            size = self.config.valid_input_size_1d(size + 1)
        return size

    def valid_tile_shape(self, shape: Sequence[int]) -> Coord:
        shape = _coord(shape)
        if len(shape) != self.volume_ndim:
            raise InvalidShapeError(
                f"tile shape {shape} has {len(shape)} axes but the volume has {self.volume_ndim}"
            )
        return Coord(self.valid_size(a, n) for a, n in enumerate(shape))

    def usable(self, tile_shape: Sequence[int]) -> Coord:
        return Coord(self.usable_1d(a, t) for a, t in enumerate(tile_shape))

    def default_tile_shape(self) -> Coord:
        """A tile that keeps the halo overhead moderate at CPU-friendly memory.

        2D: the paper's 572. 3D: 144 per axis, about 3 million voxels: the default mode runs
        one such tile per forward pass, about what ``--fast`` passes in a batch of four
        smaller tiles (measured on issue 17's case: similar peak RSS, fewer voxels).
        """
        want = 572 if self.config.ndim == 2 else 144
        return self.valid_tile_shape(
            (1,) * self.slice_axes
            + (max(want, 2 * self.config.context + 4 * self.config.grid),) * self.config.ndim
        )


@functools.lru_cache(maxsize=4096)
def _margins(config: UNetConfig, size: int) -> tuple[int, int]:
    """(before, after) margins of a tile of ``size`` (cached: planning asks often)."""
    begin, end = config.exact_region_1d(size)
    return begin, size - end


def _axis_tiles(
    spec: TileSpec, axis: int, begin: int, end: int, tile: int | None
) -> tuple[int, list[tuple[int, int, int]]]:
    """Plan one axis: (tile input extent, [(tile origin, write begin, write end), ...])."""
    if axis < spec.slice_axes:
        return 1, [(i, i, i + 1) for i in range(begin, end)]
    g = spec.grid[axis]
    before = spec.before(axis)
    anchor = spec.anchor(axis)  # the reference pass starts here; origins are anchor + k*g
    first = anchor + g * ((begin - before - anchor) // g)
    needed = spec.valid_size(axis, end - first, usable=end - first - before)
    size = needed if tile is None else min(spec.valid_size(axis, tile), needed)

    def layout(size: int) -> tuple[int, int, list[int]]:
        """Usable output, step and tile origins of tiles of ``size`` covering the axis."""
        usable = spec.usable_1d(axis, size)
        step = (usable // g) * g
        origins = [first]
        while origins[-1] + before + usable < end:
            origins.append(origins[-1] + step)
        return usable, step, origins

    usable, step, origins = layout(size)
    if len(origins) > 1:
        # Balance: the smallest tile that still needs only as many tiles (a requested tile
        # is an upper bound), so the last tile does not recompute most of its neighbour.
        per_tile = -(-(end - first - before) // len(origins))
        balanced = spec.valid_size(axis, 1, usable=g * -(-per_tile // g))
        if balanced < size and len(layout(balanced)[2]) == len(origins):
            size = balanced
            usable, step, origins = layout(size)
    if len(origins) > 1:
        # Pull the last tile back onto the grid so it reads no further than necessary.
        lowest = end - before - usable
        origins[-1] = anchor + g * (-((anchor - lowest) // g))
    out: list[tuple[int, int, int]] = []
    w = begin
    for k, o in enumerate(origins):
        stop = end if k == len(origins) - 1 else min(o + before + step, end)
        out.append((o, w, stop))
        w = stop
    return size, out


def plan_tiles(
    spec: TileSpec, write: Box, tile_shape: Sequence[int] | None = None
) -> tuple[Box, list[Tile]]:
    """Tiles that write ``write`` exactly once, planned for this box alone; returns (block
    read box, tiles).

    All tiles share one input shape (so they batch). ``tile_shape=None`` makes each axis
    one tile as large as needed: the reference pass when ``write`` is the whole volume.
    The tiles depend on the box; :class:`TileLattice` plans tiles that do not.
    """
    _check_write(spec, write)
    tiles_per_axis: list[list[tuple[int, int, int]]] = []  # (origin, write begin, end)
    sizes: list[int] = []
    for axis in range(write.ndim):
        size, axis_tiles = _axis_tiles(
            spec,
            axis,
            write.begin[axis],
            write.end[axis],
            None if tile_shape is None else int(tile_shape[axis]),
        )
        sizes.append(size)
        tiles_per_axis.append(axis_tiles)
    return _combine(tiles_per_axis, sizes)


def _check_write(spec: TileSpec, write: Box) -> None:
    if write.ndim != spec.volume_ndim:
        raise ConfigError(f"box {write} has {write.ndim} axes, the volume {spec.volume_ndim}")
    if write.empty:
        raise ConfigError(f"cannot plan tiles for the empty box {write}")


def _combine(
    tiles_per_axis: Sequence[Sequence[tuple[int, int, int]]], sizes: Sequence[int]
) -> tuple[Box, list[Tile]]:
    """Tiles (C order) from per-axis (origin, write begin, write end); and their read box."""
    planned = [
        Tile(
            read=Box(tuple(t[0] for t in combo), tuple(sizes)),
            write=Box.from_bounds(tuple(t[1] for t in combo), tuple(t[2] for t in combo)),
        )
        for combo in itertools.product(*tiles_per_axis)
    ]
    read = Box.from_bounds(
        tuple(axis[0][0] for axis in tiles_per_axis),
        tuple(axis[-1][0] + s for axis, s in zip(tiles_per_axis, sizes, strict=True)),
    )
    return read, planned


@dataclass(frozen=True, init=False)
class ChunkGrid:
    """A volume of ``shape`` cut into blocks of ``chunks`` (the last ones clipped).

    Block indices are coordinates in the grid (``index[a]`` in ``range(grid[a])``); the flat
    index numbers them in C order, the order :meth:`indices` yields them.
    """

    shape: Coord
    chunks: Coord

    def __init__(self, shape: Sequence[int], chunks: Sequence[int]) -> None:
        object.__setattr__(self, "shape", _coord(shape))
        object.__setattr__(self, "chunks", _coord(chunks))
        if len(self.chunks) != len(self.shape) or not self.chunks.all_ge(1):
            raise ConfigError(f"block shape {self.chunks} does not fit a {len(self.shape)}D volume")
        if not self.shape.all_ge(0):
            raise ConfigError(f"volume shape {self.shape} has a negative extent")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def volume(self) -> Box:
        return Box.of_shape(self.shape)

    @property
    def grid(self) -> Coord:
        """Blocks per axis."""
        return self.shape.ceildiv(self.chunks)

    @property
    def n_blocks(self) -> int:
        return self.grid.product

    def _check(self, index: Sequence[int]) -> Coord:
        index = _coord(index)
        if len(index) != self.ndim or not (index.all_ge(0) and index.all_lt(self.grid)):
            raise IndexError(f"block {tuple(index)} is outside the grid {tuple(self.grid)}")
        return index

    def box(self, index: Sequence[int]) -> Box:
        """The voxels of block ``index``, clipped to the volume."""
        index = self._check(index)
        return Box(index * self.chunks, self.chunks).intersect(self.volume)

    def indices(self) -> Iterator[Coord]:
        """Every block index, in C order (the last axis fastest)."""
        for index in itertools.product(*(range(n) for n in self.grid)):
            yield Coord(index)

    def boxes(self) -> Iterator[Box]:
        """Every block's box, in C order."""
        for index in self.indices():
            yield self.box(index)

    def flat(self, index: Sequence[int]) -> int:
        """The position of block ``index`` in C order."""
        n = 0
        for i, g in zip(self._check(index), self.grid, strict=True):
            n = n * g + i
        return n

    def unflat(self, flat: int) -> Coord:
        """The block index at position ``flat`` in C order."""
        if not 0 <= flat < self.n_blocks:
            raise IndexError(f"block number {flat} is outside a grid of {self.n_blocks} blocks")
        index = []
        for g in reversed(self.grid):
            flat, i = divmod(flat, g)
            index.append(i)
        return Coord(reversed(index))

    def intersecting(self, box: Box) -> Iterator[Coord]:
        """Indices (C order) of the blocks whose boxes share at least one voxel with ``box``."""
        if box.ndim != self.ndim:
            raise ConfigError(f"box {box} has {box.ndim} axes, the grid {self.ndim}")
        inside = box.intersect(self.volume)
        if inside.empty:
            return
        first = inside.begin // self.chunks
        stop = inside.end.ceildiv(self.chunks)
        for index in itertools.product(*(range(b, e) for b, e in zip(first, stop, strict=True))):
            yield Coord(index)


def plan_blocks(
    spec: TileSpec,
    volume_shape: Sequence[int],
    block_shape: Sequence[int],
    tile_shape: Sequence[int] | None = None,
) -> list[Block]:
    """Blocks whose write boxes tile the volume on a ``block_shape`` grid (clipped at the end).

    Pass a ``block_shape`` that is a multiple of the output chunks: then every block writes
    whole chunks that no other block writes.
    """
    grid = ChunkGrid(volume_shape, block_shape)
    blocks = []
    for index in grid.indices():
        write = grid.box(index)
        read, _ = plan_tiles(spec, write, tile_shape)
        blocks.append(Block(index=index, read=read, write=write))
    return blocks
