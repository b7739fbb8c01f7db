"""Ingest: stream a TIFF volume into a chunked OME-Zarr image (zarr v3, OME-NGFF 0.5).

The volume is cut into *write units*: boxes of whole zarr chunks, one chunk deep along z
and as wide along x, then y, as a byte budget allows (``unit_mib``). One Dask task per
unit reads exactly the TIFF pages and rows of its box (:func:`tasks.tiff.read_box`),
writes its chunks, stores its partial intensity statistics and only then marks itself done::

    z ▲  ┌──────────────────────┐
      │  │ unit (0,1,0)         │   a unit = 1 chunk in z × k chunk rows in y × all of x
      │  ├──────────────────────┤   (x is split too when one chunk row is over budget)
      │  │ unit (0,0,0)         │
         └──────────────────────┘ ▶ x

Peak memory is therefore a few units per worker, whatever the volume size.

What the store holds while and after ingesting (see :mod:`tasks.store`)::

    dst/zarr.json            segflow.source (identity of SRC), segflow.ingest (parameters,
                             status "incomplete" | "complete"), and only once complete:
                             ome.multiscales (NGFF 0.5) and segflow.stats
    dst/0, dst/1, ...        image levels ([c,] [z,] y, x), chunked, zstd by default
    dst/segflow-done/ingest          one marker per unit (tasks.blockwise.Markers)
    dst/segflow-done/ingest-moments  per unit: count, sum, sum of squares, min, max
    dst/segflow-done/ingest-hist     per unit histogram (exact for <= 16-bit integers;
                                     for wider types the coarse histogram of sort keys,
                                     filled by a read-back pass over level 0)
    dst/segflow-done/ingest-stats    markers of that read-back pass (wider types)
    dst/segflow-done/ingest-fine     per unit exact keys inside the coarse bins that hold
    dst/segflow-done/ingest-refine   the percentiles, and the markers of that second pass
    dst/segflow-done/ingest-level<N> markers of the downsampled levels

A killed ingest leaves no ``ome.multiscales``, so :func:`tasks.store.read_image_info`
refuses the store ("not an OME-Zarr image") until a re-run has finished it. Re-running on
the same SRC and DST writes only the unmarked units; a different SRC (or other chunking or
compression) into an existing DST raises :class:`StoreConflictError` unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.blockwise import Markers, ProgressFn, Runner, Step
from tasks.cluster import ClusterSpec, client_for, dask_client
from tasks.ingest.levels import _build_levels, downsample, level_factors
from tasks.ingest.plan import (
    DEFAULT_UNIT_MIB,
    DELAY_ENV,
    STEP,
    IngestPlan,
    _unit_box,
    make_plan,
    plan_units,
)
from tasks.ingest.statistics import _collect_stats
from tasks.ingest.store import (
    _array,
    _partials,
    _prepare_store,
    _previous_ingest,
    check_sizes,
    destination,
    ingest_record,
)
from tasks.ingest.write import ingest_unit
from tasks.lease import Lease
from tasks.ngff import Multiscale, image_ome
from tasks.outputs import RunInputs, check_store_target
from tasks.paths import volume_name
from tasks.records import KEY, StoreRecord
from tasks.store import (
    DONE_GROUP,
    ImageInfo,
    listing_digest,
    open_group,
    read_image_info,
)
from tasks.tiff import open_source, release_files
from unet_core.errors import ConfigError, InvalidVolumeError
from unet_core.normalize import IntensityStats

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_UNIT_MIB",
    "DELAY_ENV",
    "check_sizes",
    "downsample",
    "ingest_runner",
    "ingest_status",
    "ingest_volume",
    "level_factors",
    "make_plan",
    "plan_units",
]


# ----------------------------------------------------------------------- running


def ingest_runner(
    scheduler: Any = None,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    stack: contextlib.ExitStack | None = None,
) -> Runner:
    """The blockwise runner for an ingest.

    ``scheduler``: None or "threads" (local threads, by default two per core: a unit waits
    on its reads and on zarr's compression threads, so one per core left a 2-core machine
    11% slower), "sync" (one unit at a time, for debugging), a scheduler address such as
    "tcp://10.0.0.1:8786", a :class:`tasks.cluster.ClusterSpec` (e.g. SLURM worker jobs,
    started on ``stack`` and closed with it), or a ``distributed.Client``. Units get
    descriptors only; each opens the files it reads itself.
    """
    if scheduler is None or scheduler == "threads":
        return Runner(None, threads=workers, progress=progress)
    if scheduler in ("sync", "synchronous"):
        return Runner(None, threads=1, progress=progress)
    if isinstance(scheduler, ClusterSpec):
        if stack is None:
            raise ConfigError("a cluster for the ingest needs a place to close it")
        return Runner(stack.enter_context(dask_client(cluster=scheduler)), progress=progress)
    if isinstance(scheduler, str):
        if "://" not in scheduler:
            raise ConfigError(
                f"scheduler '{scheduler}' is not threads, sync or a scheduler address "
                "(e.g. tcp://host:8786)"
            )
        return Runner(client_for(scheduler), progress=progress)
    if not hasattr(scheduler, "submit"):
        raise ConfigError(f"scheduler {scheduler!r} is neither a name, an address nor a Client")
    return Runner(scheduler, progress=progress)


# -------------------------------------------------------------------------- main


def ingest_volume(
    src: str,
    dst: str,
    chunks: Sequence[int] | None = None,
    axes: str | None = None,
    compression: str = "zstd",
    levels: int = 0,
    overwrite: bool = False,
    scheduler: Any = None,
    progress: ProgressFn | None = None,
    *,
    voxel_size: Sequence[float] | None = None,
    unit_mib: float = DEFAULT_UNIT_MIB,
    workers: int | None = None,
    refresh: bool = False,
    lease_wait_s: float = 0.0,
    allow_sparse: bool = False,
) -> ImageInfo:
    """Stream SRC (TIFF / OME-TIFF / BigTIFF file, folder or glob of slices) into DST.

    ``chunks``: zarr chunk shape, spatial (z,y,x / y,x) or per axis; default
    64×128×128 (3D) or 1024×1024 (2D), all channels in one chunk. ``axes`` overrides the
    TIFF's axes (e.g. "zyx", "zcyx"). ``levels``: downsampled pyramid levels to add.
    ``progress`` receives a :class:`tasks.blockwise.Progress` as units finish (its step
    names the phase). ``refresh``: re-ingest in place when DST is segflow's ingest of this
    same source and the file changed (what the flows do). The ingest holds DST's lease.
    ``allow_sparse`` accepts a source that declares far more data than its files hold
    (:func:`check_sizes`). See the module docstring for the store layout, resume and
    conflict rules.
    """
    if levels < 0:
        raise ConfigError(f"levels must be 0 or more, got {levels}")
    source = open_source(str(src), axes, voxel_size)
    plan = make_plan(source, str(dst), chunks, compression, unit_mib)
    # reachable, writable, ours, not an input, not leased
    check_store_target(plan.dst, RunInputs.of(src), lease_wait_s=lease_wait_s)
    check_sizes(plan, levels, allow_sparse)
    destination(plan, overwrite, refresh)  # a conflict is refused before the lease is taken
    with Lease(plan.dst, "ingest", wait_s=lease_wait_s) as lease:
        _prepare_store(plan, overwrite, refresh)
        grid = plan.level0
        _partials(plan.dst, f"{STEP}-moments", (grid.n_units, 5), "float64", plan.key)
        _partials(plan.dst, f"{STEP}-digest", (grid.n_units, 1), "uint64", plan.key)
        if plan.exact_stats:
            _partials(plan.dst, f"{STEP}-hist", (grid.n_units, plan.bins), "int64", plan.key)
        stack = contextlib.ExitStack()
        runner = ingest_runner(scheduler, workers, progress, stack)
        try:
            runner.run(Step(STEP, plan.dst, grid.grid, plan.key, ingest_unit, plan, _unit_box))
            stats = _collect_stats(plan, runner)
            factors = _build_levels(plan, levels, runner, progress, unit_mib)
        finally:
            stack.close()
            release_files()
        lease.check()
        _finalize(plan, levels, factors, stats)
    return read_image_info(plan.dst)


def _finalize(
    plan: IngestPlan,
    levels: int,
    factors: list[tuple[int, ...]],
    stats: IntensityStats | None,
) -> None:
    markers = Markers.open(plan.dst, STEP)
    if markers is None or not markers.all_done(plan.key):
        raise InvalidVolumeError(f"{plan.dst}: ingest finished with units missing")
    crcs = np.asarray(_array(plan.dst, f"{DONE_GROUP}/{STEP}-digest", "r")[...]).reshape(-1)
    identity = hashlib.sha256(
        json.dumps([list(plan.level0.shape), plan.dtype, list(plan.level0.unit_shape)]).encode()
        + crcs.astype("<u8").tobytes()
    ).hexdigest()[:32]
    root = open_group(plan.dst, "r+")
    before = StoreRecord.of(root)
    owned = before.files  # the files beside the store stay its own
    replaced = (before.ingest or {}).get("replaces")
    if replaced == "crc-" + identity:
        log.info(
            "%s: the source's pixels are the same as before; what was made of them stays valid",
            plan.dst,
        )
    elif replaced:
        log.info(
            "%s: the source's pixels changed; what was made of the old ones is computed again",
            plan.dst,
        )
    name = volume_name(plan.source.url) or "image"
    record = ingest_record(plan, "complete", levels, stats, "crc-" + identity).updated(
        # what level 0 looks like on storage now: a later in-place edit shows
        image_listing=listing_digest(plan.dst),
        files=owned,
    )
    ome = image_ome(Multiscale.build(plan.axes, plan.source.scale, factors, plan.source.unit, name))
    root.attrs.update({"ome": ome, KEY: record.dump()})


def ingest_status(dst: str) -> dict[str, Any]:
    """Progress of an ingest as stored in DST: status, units done and total."""
    record = _previous_ingest(dst)
    done = (record.ingest if record is not None else None) or {}
    markers = Markers.open(dst, STEP)
    key = str(done.get("key", ""))
    return {
        "status": done.get("status", "absent"),
        "units_done": markers.count(key) if markers and key else 0,
        "units": math.prod(markers.grid) if markers else 0,
    }
