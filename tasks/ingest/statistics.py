"""Global intensity statistics of an ingest: per-unit partials and the read-back passes."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr

from tasks.blockwise import Runner, Step
from tasks.ingest.plan import STEP, Grid, IngestPlan, _digest, _slices, _unit_box
from tasks.ingest.store import _array, _partials
from tasks.reads import StrictArray
from tasks.store import (
    DONE_GROUP,
)
from unet_core.errors import (
    InvalidVolumeError,
)
from unet_core.normalize import (
    KEY_BINS,
    IntensityStats,
    StatsAccumulator,
    coarse_histogram,
    fine_histogram,
    finite_values,
    integer_histogram,
)


def _pieces(block: np.ndarray, voxels: int = 1 << 18) -> Iterator[np.ndarray]:
    """Small sub-arrays covering ``block`` (bounded temporaries for statistics)."""
    if block.ndim == 0 or block.size <= voxels:
        yield block
        return
    step = max(1, voxels // max(1, block[0].size)) if block.ndim > 1 else voxels
    if block.ndim > 1 and block[0].size > voxels:
        for i in range(block.shape[0]):
            yield from _pieces(block[i], voxels)
        return
    for i in range(0, block.shape[0], step):
        yield block[i : i + step]


def _moments(block: np.ndarray) -> np.ndarray:
    """count, sum, sum of squares, min, max of the finite voxels of ``block``."""
    count, total, total_sq = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for piece in _pieces(block):
        p = finite_values(piece)
        if p.size == 0:
            continue
        f = p.astype(np.float64)
        count += int(p.size)
        total += float(f.sum())
        total_sq += float(np.dot(f.reshape(-1), f.reshape(-1)))
        lo, hi = min(lo, float(p.min())), max(hi, float(p.max()))
    return np.array([count, total, total_sq, lo, hi], dtype=np.float64)


def _exact_partials(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hist: np.ndarray | None = None
    for piece in _pieces(block):
        h = integer_histogram(piece)
        hist = h if hist is None else hist + h
    assert hist is not None
    acc = StatsAccumulator(block.dtype)
    acc.add_histogram(hist)
    moments = np.array([acc.count, acc.total, acc.total_sq, acc.min, acc.max], dtype=np.float64)
    return moments, hist


def histogram_unit(plan: IngestPlan, index: tuple[int, ...]) -> int:
    """Read-back pass of wide types (float, 32-bit integers): the coarse histogram of one
    unit of level 0 (:func:`unet_core.normalize.coarse_histogram`)."""
    grid = plan.level0
    box = grid.box(index)
    block = StrictArray(_array(plan.dst, "0", "r"), plan.dst, "0")[_slices(box)]
    hist = np.zeros(KEY_BINS, dtype=np.int64)
    for piece in _pieces(block):
        hist += coarse_histogram(piece)
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-hist")[grid.flat(index)] = hist
    return int(block.nbytes)


@dataclass(frozen=True)
class RefinePlan:
    """The second read-back pass: the ingest plan and the coarse bins to refine."""

    plan: IngestPlan
    bins: tuple[int, ...]

    @property
    def unit_grid(self) -> Grid:
        return self.plan.level0


def refine_unit(rp: RefinePlan, index: tuple[int, ...]) -> int:
    """Second read-back pass of wide types: exact keys of one unit inside the coarse
    ``bins`` that hold the percentiles (:func:`unet_core.normalize.fine_histogram`)."""
    plan, bins = rp.plan, rp.bins
    grid = plan.level0
    box = grid.box(index)
    block = StrictArray(_array(plan.dst, "0", "r"), plan.dst, "0")[_slices(box)]
    fine = np.zeros((len(bins), KEY_BINS), dtype=np.int64)
    for piece in _pieces(block):
        fine += fine_histogram(piece, bins)
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-fine")[grid.flat(index)] = fine.reshape(-1)
    return int(block.nbytes)


def _collect_stats(plan: IngestPlan, runner: Runner) -> IntensityStats:
    """Merge the units' partial statistics; for wide types first run the read-back passes
    (coarse histogram, then exact keys around the percentiles)."""
    grid = plan.level0
    moments = np.asarray(_array(plan.dst, f"{DONE_GROUP}/{STEP}-moments", "r")[...])
    counts = moments[:, 0]
    voxels = math.prod(grid.shape)
    if counts.sum() == 0:
        raise InvalidVolumeError(
            f"{plan.source.url}: the image has no finite values "
            f"(all {voxels} voxels are NaN or ±Inf)"
        )
    seen = counts > 0
    if not plan.exact_stats:
        key = _digest({"key": plan.key, "pass": "coarse"})
        _partials(plan.dst, f"{STEP}-hist", (grid.n_units, KEY_BINS), "int64", key)
        runner.run(Step(f"{STEP}-stats", plan.dst, grid.grid, key, histogram_unit, plan, _unit_box))
    acc = StatsAccumulator(np.dtype(plan.dtype))
    acc.add_parts(
        int(counts.sum()),
        float(moments[:, 1].sum()),
        float(moments[:, 2].sum()),
        float(moments[seen, 3].min()),
        float(moments[seen, 4].max()),
        _sum_rows(_array(plan.dst, f"{DONE_GROUP}/{STEP}-hist", "r")),
        nonfinite=voxels - int(counts.sum()),
    )
    bins = acc.refine_bins()
    if bins:
        key = _digest({"key": plan.key, "pass": "fine", "bins": list(bins)})
        _partials(plan.dst, f"{STEP}-fine", (grid.n_units, len(bins) * KEY_BINS), "int64", key)
        rp = RefinePlan(plan, tuple(bins))
        runner.run(Step(f"{STEP}-refine", plan.dst, grid.grid, key, refine_unit, rp, _unit_box))
        acc.add_fine_histogram(bins, _sum_rows(_array(plan.dst, f"{DONE_GROUP}/{STEP}-fine", "r")))
    return acc.result()


def _sum_rows(arr: zarr.Array, step: int = 4) -> np.ndarray:
    """Sum of the rows of a per-unit partial array, a few rows at a time."""
    total = np.zeros(arr.shape[1], dtype=np.int64)
    for start in range(0, arr.shape[0], step):
        total += np.asarray(arr[start : start + step]).sum(axis=0)
    return total
