"""Write units: read a box of the TIFF, write its chunks, its partial statistics, its checksum."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence

import numpy as np
import zarr

from tasks.ingest.plan import STEP, IngestPlan, _test_delay
from tasks.ingest.statistics import _exact_partials, _moments
from tasks.ingest.store import _array
from tasks.store import (
    DONE_GROUP,
)
from tasks.tiff import read_box


def _write_chunks(
    arr: zarr.Array,
    box: Sequence[tuple[int, int]],
    chunks: Sequence[int],
    block: np.ndarray,
) -> None:
    """Write ``block`` (the data of ``box``) one zarr chunk at a time.

    One chunk in flight per task keeps the encoder's buffers small (zarr would otherwise
    encode up to ``async.concurrency`` chunks of the box at once); the parallelism comes
    from running several units at a time.
    """
    ranges = [range(a, b, c) for (a, b), c in zip(box, chunks, strict=True)]
    for origin in itertools.product(*ranges):
        local = tuple(
            slice(o - a, min(o + c, b) - a)
            for o, (a, b), c in zip(origin, box, chunks, strict=True)
        )
        target = tuple(
            slice(o, min(o + c, b)) for o, (_, b), c in zip(origin, box, chunks, strict=True)
        )
        arr[target] = block[local]


def ingest_unit(plan: IngestPlan, index: tuple[int, ...]) -> int:
    """Read one unit from the TIFF, write its chunks and partial statistics, mark it done."""
    _test_delay()
    grid = plan.level0
    box = grid.box(index)
    block = read_box(plan.source, box)
    _write_chunks(_array(plan.dst, "0"), box, grid.chunks, block)
    row = grid.flat(index)
    if plan.exact_stats:
        moments, hist = _exact_partials(block)
        _array(plan.dst, f"{DONE_GROUP}/{STEP}-hist")[row] = hist
    else:
        moments = _moments(block)
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-moments")[row] = moments
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-digest")[row] = [_checksum(block)]
    return int(block.nbytes)


def _checksum(block: np.ndarray) -> int:
    """CRC-32 of a unit's voxels (its part of the image identity)."""
    data = np.ascontiguousarray(block)
    return zlib.crc32(data.data) if data.size else 0
