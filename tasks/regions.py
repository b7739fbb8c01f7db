"""Regions: groups of blocks that one Prefect task computes (on Dask), and their done-ness.

A TB volume has hundreds of thousands of blocks; a Prefect task per block would swamp the
orchestrator. Blocks are grouped, in C order of the block grid, into regions
(:class:`Regions`) so a run makes at most ``max_regions`` Prefect task runs
(default 2000). A region is done when all its blocks carry a marker of this run's key, so a
new run, a retried run, or a retried task skips the finished part of a region and computes
the rest; a region task reads only its own blocks' markers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.blockwise import Index, Markers, Runner, Step
from tasks.cluster import client_for
from tasks.segment import SegmentPlan, segmentation_step
from unet_core.errors import ConfigError

log = logging.getLogger(__name__)


def blocks_per_region(n_blocks: int, max_regions: int = 2000) -> int:
    """Blocks per region so that there are at most ``max_regions`` regions."""
    if max_regions < 1:
        raise ConfigError(f"max_regions must be at least 1, got {max_regions}")
    return max(math.ceil(n_blocks / max_regions), 1)


@dataclass(frozen=True)
class Regions:
    """Runs of ``per_region`` blocks of a grid in C order: the unit Prefect sees."""

    grid: tuple[int, ...]
    per_region: int

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def count(self) -> int:
        return math.ceil(self.n_blocks / self.per_region)

    def blocks(self, region: int) -> list[Index]:
        if not 0 <= region < self.count:
            raise ConfigError(
                f"region {region} does not exist (this run has regions 0..{self.count - 1})"
            )
        flat = range(region * self.per_region, min((region + 1) * self.per_region, self.n_blocks))
        return [tuple(int(i) for i in np.unravel_index(f, self.grid)) for f in flat]

    def done(self, step: Step) -> np.ndarray:
        """Boolean per region: all its blocks done under the step's key."""
        markers = Markers.open(step.store, step.name)
        if markers is None or markers.grid != step.grid:
            return np.zeros(self.count, dtype=bool)
        flat = markers.done_mask(step.key).reshape(-1)
        padded = np.ones(self.count * self.per_region, dtype=bool)
        padded[: flat.size] = flat
        return np.asarray(padded.reshape(self.count, self.per_region).all(axis=1))


#: Test-only fault injection: "REGION:N[,REGION:N]" makes region REGION fail on its first
#: N attempts ("always" for every attempt). Read at run time, never set in production.
FAULT_ENV = "SEGFLOW_FAULT_REGIONS"


def forget_regions(plan: SegmentPlan, regions: Regions, chosen: list[int]) -> None:
    """Clear the done markers of chosen regions so they are recomputed."""
    markers = Markers.open(plan.out_url, plan.done_step, mode="r+")
    if markers is None:
        return
    for r in chosen:
        markers.clear(regions.blocks(r))


def _inject_fault(region: int, attempt: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        target, _, times = item.partition(":")
        if int(target) == region and (times == "always" or attempt <= int(times or 1)):
            raise RuntimeError(f"injected fault in region {region} (attempt {attempt})")


def run_region(
    plan: SegmentPlan,
    region: int,
    per_region: int,
    address: str,
    timeout_s: float | None = None,
    attempt: int = 1,
) -> dict[str, Any]:
    """Compute the unfinished blocks of one region on Dask; returns counts and timings.

    Raises if a block fails or the region exceeds ``timeout_s`` (its unfinished blocks are
    cancelled, so a hung worker cannot hold the run forever). Finished blocks stay done.
    """
    t0 = time.perf_counter()
    _inject_fault(region, attempt)
    blocks = Regions(plan.grid, per_region).blocks(region)
    runner = Runner(client_for(address), timeout_s=timeout_s)
    result = runner.run(segmentation_step(plan), blocks)
    counts = np.zeros(plan.config.n_classes, dtype=np.int64)
    compute = 0.0
    for r in result.results:
        counts += np.asarray(r["counts"])
        compute += r["read_s"] + r["compute_s"] + r["write_s"]
    seconds = time.perf_counter() - t0
    voxels = sum(r["voxels"] for r in result.results)
    log.info(
        "region %d: %d blocks computed, %d already done, %.1f s (%.2f Mvox/s)",
        region,
        result.computed,
        result.skipped,
        seconds,
        voxels / max(seconds, 1e-9) / 1e6,
    )
    return {
        "region": region,
        "blocks": len(blocks),
        "computed": result.computed,
        "skipped": result.skipped,
        "voxels": voxels,
        "counts": [int(c) for c in counts],
        "seconds": seconds,
        "block_seconds": compute,
    }
