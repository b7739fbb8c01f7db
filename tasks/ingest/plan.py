"""Ingest plan: the write units (boxes of whole chunks) and the keys of an ingest."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.tiff import TiffSource
from unet_core.errors import (
    ConfigError,
)
from unet_core.geometry import Box
from unet_core.normalize import (
    KEY_BINS,
)

log = logging.getLogger(__name__)

COMPRESSIONS = ("zstd", "blosc", "none")
#: Default chunk shape of 3D images (z, y, x) and 2D images (y, x); capped at the image.
DEFAULT_CHUNKS_3D = (64, 128, 128)
DEFAULT_CHUNKS_2D = (1024, 1024)
#: Default byte budget of one write unit (the most a task holds of the image at once).
DEFAULT_UNIT_MIB = 8
#: A source declaring more than this many times the bytes its files hold is refused as
#: sparse (deflate's best ratio is about 1032:1) unless asked for, if over the minimum.
SPARSE_RATIO = 1000
SPARSE_MIN_BYTES = 64 * 2**20
#: Test hook: seconds each unit sleeps before its work (to interrupt an ingest on purpose).
DELAY_ENV = "SEGFLOW_TEST_INGEST_DELAY"
STEP = "ingest"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Grid:
    """Write units of one image level: a box of whole chunks per unit."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    unit_chunks: tuple[int, ...]  # chunks per unit along each axis

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return tuple(u * c for u, c in zip(self.unit_chunks, self.chunks, strict=True))

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(math.ceil(n / u) for n, u in zip(self.shape, self.unit_shape, strict=True))

    @property
    def n_units(self) -> int:
        return math.prod(self.grid)

    def box(self, index: Sequence[int]) -> tuple[tuple[int, int], ...]:
        return tuple(
            (i * u, min((i + 1) * u, n))
            for i, u, n in zip(index, self.unit_shape, self.shape, strict=True)
        )

    def flat(self, index: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(index), self.grid))

    def units(self) -> Iterator[tuple[int, ...]]:
        for index in np.ndindex(*self.grid):
            yield tuple(int(i) for i in index)


@dataclass(frozen=True)
class IngestPlan:
    """Everything a unit task needs (picklable: descriptors, no handles, no data)."""

    source: TiffSource
    dst: str
    axes: str
    dtype: str
    compression: str
    level0: Grid
    data_key: str  # what the image holds: source identity + layout + compression
    key: str  # data_key + unit layout: tags the done markers and partial statistics

    @property
    def unit_grid(self) -> Grid:
        return self.level0

    @property
    def exact_stats(self) -> bool:
        d = np.dtype(self.dtype)
        return d.kind in "ui" and d.itemsize <= 2

    @property
    def bins(self) -> int:
        d = np.dtype(self.dtype)
        return 1 << (8 * d.itemsize) if self.exact_stats else KEY_BINS


def default_chunks(axes: str, shape: Sequence[int]) -> tuple[int, ...]:
    spatial = DEFAULT_CHUNKS_3D if "z" in axes else DEFAULT_CHUNKS_2D
    out: list[int] = []
    it = iter(spatial)
    for a, n in zip(axes, shape, strict=True):
        out.append(n if a == "c" else min(next(it), n))
    return tuple(out)


def _chunks_for(axes: str, shape: Sequence[int], chunks: Sequence[int] | None) -> tuple[int, ...]:
    if chunks is None:
        return default_chunks(axes, shape)
    req = [int(c) for c in chunks]
    spatial = [a for a in axes if a != "c"]
    if len(req) == len(spatial) and len(req) != len(axes):
        it = iter(req)
        req = [n if a == "c" else next(it) for a, n in zip(axes, shape, strict=True)]
    if len(req) != len(axes) or any(c < 1 for c in req):
        raise ConfigError(
            f"chunks {tuple(chunks)} must give {len(spatial)} positive sizes "
            f"({','.join(spatial)}) or {len(axes)} ({','.join(axes)}) for this image"
        )
    return tuple(min(c, n) for c, n in zip(req, shape, strict=True))


def plan_units(
    axes: str, shape: Sequence[int], chunks: Sequence[int], itemsize: int, budget: int
) -> tuple[int, ...]:
    """Chunks per unit: all channels, then grow along x, y, z while within ``budget`` bytes."""
    nchunks = [math.ceil(n / c) for n, c in zip(shape, chunks, strict=True)]
    units = [nc if a == "c" else 1 for a, nc in zip(axes, nchunks, strict=True)]

    def nbytes(u: Sequence[int]) -> int:
        return math.prod(min(k * c, n) for k, c, n in zip(u, chunks, shape, strict=True)) * itemsize

    for a in "xyz":
        if a not in axes:
            continue
        i = axes.index(a)
        while units[i] < nchunks[i]:
            trial = list(units)
            trial[i] = min(nchunks[i], units[i] * 2)
            if nbytes(trial) > budget:
                # largest multiple that still fits
                per = nbytes(units) // units[i]
                units[i] = max(units[i], min(nchunks[i], budget // max(per, 1)))
                break
            units[i] = trial[i]
        if units[i] < nchunks[i]:
            break  # the next axis only grows once this one is whole
    return tuple(units)


def make_plan(
    source: TiffSource,
    dst: str,
    chunks: Sequence[int] | None = None,
    compression: str = "zstd",
    unit_mib: float = DEFAULT_UNIT_MIB,
) -> IngestPlan:
    if compression not in COMPRESSIONS:
        raise ConfigError(f"compression '{compression}' is not one of {', '.join(COMPRESSIONS)}")
    if not unit_mib > 0:
        raise ConfigError(f"unit size must be positive, got {unit_mib} MiB")
    ch = _chunks_for(source.axes, source.shape, chunks)
    itemsize = np.dtype(source.dtype).itemsize
    units = plan_units(source.axes, source.shape, ch, itemsize, int(unit_mib * 2**20))
    grid = Grid(tuple(source.shape), ch, units)
    data = {
        "format": FORMAT_VERSION,
        "source": source.identity(),
        "axes": source.axes,
        "shape": list(source.shape),
        "dtype": source.dtype,
        "chunks": list(ch),
        "compression": compression,
    }
    data_key = _digest(data)
    return IngestPlan(
        source=source,
        dst=str(dst).rstrip("/"),
        axes=source.axes,
        dtype=source.dtype,
        compression=compression,
        level0=grid,
        data_key=data_key,
        key=_digest({"data": data_key, "units": list(units)}),
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def _unit_box(plan: Any, index: tuple[int, ...]) -> Box:
    """The voxel box of a unit of any ingest pass (its plan has a ``unit_grid``)."""
    box = plan.unit_grid.box(index)
    return Box.from_bounds([a for a, _ in box], [b for _, b in box])


def _test_delay() -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _slices(box: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)
