"""Downsampled pyramid levels of an ingested image, unit by unit."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import zarr

from tasks.blockwise import ProgressFn, Runner, Step
from tasks.ingest.plan import (
    STEP,
    Grid,
    IngestPlan,
    _digest,
    _slices,
    _test_delay,
    _unit_box,
    plan_units,
)
from tasks.ingest.store import _array, _compressors
from tasks.store import (
    DONE_GROUP,
    open_group,
)


@dataclass(frozen=True)
class LevelPlan:
    """One downsampled level: read a box of the level above, average, write."""

    dst: str
    level: int
    factors: tuple[int, ...]
    source_shape: tuple[int, ...]
    grid: Grid

    @property
    def unit_grid(self) -> Grid:
        return self.grid


def downsample(block: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """Block mean by integer ``factors`` (edge voxels repeated to fill the last block)."""
    pad = [(0, (-n) % f) for n, f in zip(block.shape, factors, strict=True)]
    a = np.pad(block, pad, mode="edge") if any(p for _, p in pad) else block
    shape: list[int] = []
    for n, f in zip(a.shape, factors, strict=True):
        shape += [n // f, f]
    work = np.float32 if block.dtype.itemsize <= 2 else np.float64
    mean = a.reshape(shape).mean(axis=tuple(range(1, 2 * a.ndim, 2)), dtype=work)
    if block.dtype.kind in "ui":
        info = np.iinfo(block.dtype)
        return np.clip(np.rint(mean), info.min, info.max).astype(block.dtype)
    return mean.astype(block.dtype)


def level_unit(plan: LevelPlan, index: tuple[int, ...]) -> int:
    _test_delay()
    box = plan.grid.box(index)
    src_box = tuple(
        (a * f, min(b * f, n))
        for (a, b), f, n in zip(box, plan.factors, plan.source_shape, strict=True)
    )
    block = np.asarray(_array(plan.dst, str(plan.level - 1), "r")[_slices(src_box)])
    _array(plan.dst, str(plan.level))[_slices(box)] = downsample(block, plan.factors)
    return int(block.nbytes)


def level_factors(axes: str, shape: Sequence[int], scale: Sequence[float]) -> tuple[int, ...]:
    """2 along y and x; along z only while z is not coarser than 1.5 × the xy spacing."""
    xy = min(s for a, s in zip(axes, scale, strict=True) if a in "yx")
    out: list[int] = []
    for a, n, s in zip(axes, shape, scale, strict=True):
        if a == "c" or n == 1:
            out.append(1)
        elif a == "z":
            out.append(2 if s <= 1.5 * xy else 1)
        else:
            out.append(2)
    return tuple(out)


def _build_levels(
    plan: IngestPlan,
    levels: int,
    runner: Runner,
    progress: ProgressFn | None,
    unit_mib: float,
) -> list[tuple[int, ...]]:
    root = open_group(plan.dst, "r+")
    factors_list: list[tuple[int, ...]] = []
    shape = plan.level0.shape
    scale = list(plan.source.scale)
    itemsize = np.dtype(plan.dtype).itemsize
    for level in range(1, levels + 1):
        factors = level_factors(plan.axes, shape, scale)
        new_shape = tuple(math.ceil(n / f) for n, f in zip(shape, factors, strict=True))
        chunks = tuple(min(c, n) for c, n in zip(plan.level0.chunks, new_shape, strict=True))
        # a unit reads prod(factors) times its size, plus float temporaries
        budget = int(unit_mib * 2**20 / (math.prod(factors) * (1 + 8 / itemsize)))
        units = plan_units(plan.axes, new_shape, chunks, itemsize, max(budget, 1))
        grid = Grid(new_shape, chunks, units)
        key = _digest({"key": plan.key, "level": level, "factors": list(factors), "units": units})
        existing = root.get(str(level))
        if not (
            isinstance(existing, zarr.Array)
            and tuple(existing.shape) == new_shape
            and tuple(existing.chunks) == chunks
        ):
            root.create_array(
                str(level),
                shape=new_shape,
                chunks=chunks,
                dtype=plan.dtype,
                compressors=_compressors(plan.compression, plan.dtype),
                fill_value=0,
                dimension_names=list(plan.axes),
                overwrite=True,
            )
        lp = LevelPlan(plan.dst, level, factors, shape, grid)
        runner.run(
            Step(f"{STEP}-level{level}", plan.dst, grid.grid, key, level_unit, lp, _unit_box)
        )
        factors_list.append(factors)
        shape = new_shape
        scale = [s * f for s, f in zip(scale, factors, strict=True)]
    # levels left over from an earlier run with more of them
    level = levels + 1
    while str(level) in root:
        del root[str(level)]
        with contextlib.suppress(KeyError):
            del root[f"{DONE_GROUP}/{STEP}-level{level}"]
        level += 1
    return factors_list
