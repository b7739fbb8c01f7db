"""Regions: groups of blocks that one Prefect task computes (on Dask), and their done-ness.

A TB volume has hundreds of thousands of blocks; a Prefect task per block would swamp the
orchestrator. Blocks are grouped, in C order of the block grid, into regions of
``blocks_per_region`` so a run makes at most ``max_regions`` Prefect task runs (default
2000). A region is done when all its blocks carry a done marker for this run's key
(:class:`tasks.store.DoneTracker`), so a new run, a retried run, or a retried task skips
the finished part of a region and computes the rest.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import numpy as np

from tasks.cluster import client_for
from tasks.segment import SegmentPlan, run_blocks
from tasks.store import DoneTracker
from unet_core.errors import ConfigError

log = logging.getLogger(__name__)

#: Test-only fault injection: "REGION:N[,REGION:N]" makes region REGION fail on its first
#: N attempts ("always" for every attempt). Read at run time, never set in production.
FAULT_ENV = "SEGFLOW_FAULT_REGIONS"


def blocks_per_region(n_blocks: int, max_regions: int = 2000, at_least: int = 1) -> int:
    """Blocks per region so that there are at most ``max_regions`` regions."""
    if max_regions < 1:
        raise ConfigError(f"max_regions must be at least 1, got {max_regions}")
    return max(at_least, math.ceil(n_blocks / max_regions), 1)


def n_regions(plan: SegmentPlan, per_region: int) -> int:
    return math.ceil(plan.n_blocks / per_region)


def region_blocks(plan: SegmentPlan, region: int, per_region: int) -> list[tuple[int, ...]]:
    """Block indices of a region (a run of ``per_region`` blocks in C order)."""
    count = n_regions(plan, per_region)
    if not 0 <= region < count:
        raise ConfigError(f"region {region} does not exist (this run has regions 0..{count - 1})")
    flat = range(region * per_region, min((region + 1) * per_region, plan.n_blocks))
    return [tuple(int(i) for i in np.unravel_index(f, plan.grid)) for f in flat]


def region_status(plan: SegmentPlan, per_region: int) -> np.ndarray:
    """Boolean per region: all its blocks done."""
    tracker = DoneTracker.open(plan.out_url, plan.done_step)
    count = n_regions(plan, per_region)
    if tracker is None or tracker.key != plan.key:
        return np.zeros(count, dtype=bool)
    flat = tracker.done_mask().reshape(-1)
    padded = np.ones(count * per_region, dtype=bool)
    padded[: flat.size] = flat
    return np.asarray(padded.reshape(count, per_region).all(axis=1))


def forget_regions(plan: SegmentPlan, regions: list[int], per_region: int) -> None:
    """Clear the done markers of chosen regions so they are recomputed."""
    tracker = DoneTracker.open(plan.out_url, plan.done_step, mode="r+")
    if tracker is None:
        return
    for r in regions:
        for index in region_blocks(plan, r, per_region):
            tracker.array[index] = 0


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
    dask_address: str,
    timeout_s: float | None = None,
    attempt: int = 1,
) -> dict[str, Any]:
    """Compute the unfinished blocks of one region on Dask; returns counts and timings.

    Raises if a block fails or the region exceeds ``timeout_s`` (its unfinished blocks are
    cancelled, so a hung worker cannot hold the run forever). Finished blocks stay done.
    """
    t0 = time.perf_counter()
    _inject_fault(region, attempt)
    tracker = DoneTracker.open(plan.out_url, plan.done_step)
    if tracker is None:
        raise ConfigError(f"{plan.out_url}: outputs were not prepared for this run")
    done = tracker.done_mask()
    blocks = region_blocks(plan, region, per_region)
    todo = [b for b in blocks if not done[b]]
    results = run_blocks(plan, todo, client_for(dask_address), timeout_s=timeout_s) if todo else []
    counts = np.zeros(plan.config.n_classes, dtype=np.int64)
    compute = 0.0
    for r in results:
        counts += np.asarray(r["counts"])
        compute += r["read_s"] + r["compute_s"] + r["write_s"]
    seconds = time.perf_counter() - t0
    voxels = sum(r["voxels"] for r in results)
    log.info(
        "region %d: %d blocks computed, %d already done, %.1f s (%.2f Mvox/s)",
        region,
        len(todo),
        len(blocks) - len(todo),
        seconds,
        voxels / max(seconds, 1e-9) / 1e6,
    )
    return {
        "region": region,
        "blocks": len(blocks),
        "computed": len(todo),
        "skipped": len(blocks) - len(todo),
        "voxels": voxels,
        "counts": [int(c) for c in counts],
        "seconds": seconds,
        "block_seconds": compute,
    }
