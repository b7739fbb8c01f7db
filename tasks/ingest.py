"""Ingest: stream a TIFF volume into a chunked OME-Zarr image (zarr v3, OME-NGFF 0.5).

The volume is cut into *write units*: boxes of whole zarr chunks, one chunk deep along z
and as wide along x, then y, as a byte budget allows (``unit_mib``). One Dask task per
unit reads exactly the TIFF pages and rows of its box (:func:`tasks.tiff_source.read_box`),
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
import itertools
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from tasks.blockwise import Markers, ProgressFn, Runner, Step
from tasks.cluster import client_for
from tasks.ngff import Multiscale, compressors, image_ome
from tasks.paths import volume_name
from tasks.runstate import (
    OWNER,
    Lease,
    StrictArray,
    delete_owned_store,
    owned_by_segflow,
    store_exists,
)
from tasks.store import (
    DONE_GROUP,
    ImageInfo,
    attributes,
    check_access,
    every_chunk,
    filesystem,
    is_remote,
    join,
    open_group,
    read_image_info,
    storage_options,
)
from tasks.tiff_source import TiffSource, open_source, read_box, release_files
from unet_core.errors import (
    ConfigError,
    InvalidVolumeError,
    SegflowError,
    StorageError,
    StoreConflictError,
)
from unet_core.geometry import Box
from unet_core.normalize import (
    KEY_BINS,
    IntensityStats,
    StatsAccumulator,
    coarse_histogram,
    fine_histogram,
    finite_values,
    integer_histogram,
)

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

log = logging.getLogger(__name__)


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


# ------------------------------------------------------------------------ store


def _compressors(compression: str, dtype: str) -> Any:
    from zarr.codecs import BloscCodec

    if compression == "zstd":
        return compressors()
    if compression == "blosc":
        itemsize = np.dtype(dtype).itemsize
        return BloscCodec(
            cname="zstd",
            clevel=5,
            shuffle="bitshuffle" if itemsize == 1 else "shuffle",
            typesize=itemsize,
        )
    return None


def _is_zarr(url: str) -> bool:
    return bool(filesystem(url).exists(join(url, "zarr.json")))


def _previous_ingest(url: str) -> dict[str, Any] | None:
    try:
        attrs = attributes(open_group(url, "r"))
    except SegflowError:
        return None
    seg = attrs.get("segflow")
    return seg if isinstance(seg, dict) else None


def _prepare_store(plan: IngestPlan, overwrite: bool, refresh: bool = False) -> bool:
    """Create DST, or check that it is a (partial) ingest of the same data. True = resume.

    ``refresh``: DST is an ingest segflow made from this same source whose file changed
    since: ingest it again in place (its labels stay; their run keys hold the image's
    identity, so they are recomputed only if the content really changed).
    """
    dst = plan.dst
    check_access(dst)
    if store_exists(dst):
        previous = _previous_ingest(dst) if owned_by_segflow(dst) else None
        same = previous is not None and previous.get("ingest", {}).get("data_key") == plan.data_key
        if same and not overwrite:
            group = open_group(dst, "r+")
            arr = group.get("0")
            if (
                isinstance(arr, zarr.Array)
                and tuple(arr.shape) == plan.level0.shape
                and tuple(arr.chunks) == plan.level0.chunks
            ):
                return True
        same_source = (
            previous is not None
            and previous.get("source", {}).get("url") == plan.source.url
            and "ingest" in previous
        )
        if refresh and same_source and not overwrite:
            _restart_in_place(plan)
            return False
        if not owned_by_segflow(dst):
            what = "a zarr store" if _is_zarr(dst) else "other files"
            raise StoreConflictError(
                f"{dst}: already holds {what} that segflow did not make; it is never "
                "replaced, not even with --overwrite: choose another destination"
            )
        if not overwrite:
            what = "other segflow outputs"
            if previous and previous.get("source", {}).get("url"):
                what = f"an image ingested from {previous['source']['url']}"
                if same:
                    what = "a damaged ingest of this source"
                elif same_source:
                    what = "an ingest of this source with other settings or an older version"
            raise StoreConflictError(f"{dst}: already holds {what}; pass --overwrite to replace it")
        delete_owned_store(dst)
    root = open_group(dst, "a")  # "w" would delete the lease beside it
    root.attrs.update({"segflow": _segflow_attrs(plan, "incomplete", 0)})
    _create_level0(root, plan)
    return False


def _create_level0(root: zarr.Group, plan: IngestPlan) -> None:
    root.create_array(
        "0",
        shape=plan.level0.shape,
        chunks=plan.level0.chunks,
        dtype=plan.dtype,
        compressors=_compressors(plan.compression, plan.dtype),
        fill_value=0,
        dimension_names=list(plan.axes),
        overwrite=True,
    )


def _restart_in_place(plan: IngestPlan) -> None:
    """Mark DST as an unfinished ingest of the new data, keeping what else it holds."""
    root = open_group(plan.dst, "r+")
    attrs = attributes(root)
    attrs.pop("ome", None)  # not an image again until the new ingest has finished
    attrs["segflow"] = _segflow_attrs(plan, "incomplete", 0)
    root.attrs.put(attrs)
    arr = root.get("0")
    if not (
        isinstance(arr, zarr.Array)
        and tuple(arr.shape) == plan.level0.shape
        and tuple(arr.chunks) == plan.level0.chunks
        and arr.dtype == np.dtype(plan.dtype)
    ):
        _create_level0(root, plan)
    log.info("%s: the source changed since it was ingested; ingesting it again", plan.dst)


def _segflow_attrs(
    plan: IngestPlan,
    status: str,
    levels: int,
    stats: IntensityStats | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    src = plan.source
    attrs: dict[str, Any] = {
        "created_by": OWNER,
        "source": {
            **src.identity(),
            "series_kind": src.series_kind,
            "axes_from": src.axes_from,
            "scale": list(src.scale),
            "unit": src.unit,
        },
        "ingest": {
            "status": status,
            "data_key": plan.data_key,
            "key": plan.key,
            "chunks": list(plan.level0.chunks),
            "compression": plan.compression,
            "levels": levels,
            "unit_chunks": list(plan.level0.unit_chunks),
            "format": FORMAT_VERSION,
        },
    }
    if stats is not None:
        attrs["stats"] = stats.model_dump()
    if digest is not None:
        attrs["image_digest"] = digest
    return attrs


def _array(url: str, path: str, mode: str = "r+") -> zarr.Array:
    full = join(url, path)
    return every_chunk(zarr.open_array(full, mode=mode, storage_options=storage_options(full)))


def _partials(dst: str, name: str, shape: tuple[int, ...], dtype: str, key: str) -> zarr.Array:
    """A per-unit side array under segflow-done/, reset when its key or shape changes."""
    root = open_group(dst, "r+")
    group = root.require_group(DONE_GROUP)
    existing = group.get(name)
    if (
        isinstance(existing, zarr.Array)
        and tuple(existing.shape) == shape
        and attributes(existing).get("key") == key
    ):
        return existing
    return group.create_array(
        name,
        shape=shape,
        chunks=(1, shape[1]),
        dtype=dtype,
        fill_value=0,
        compressors=compressors(),
        overwrite=True,
        attributes={"key": key},
    )


# -------------------------------------------------------------------------- tasks


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


def _test_delay() -> None:
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _slices(box: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


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


@dataclass(frozen=True)
class LevelPlan:
    """One downsampled level: read a box of the level above, average, write."""

    dst: str
    level: int
    factors: tuple[int, ...]
    source_shape: tuple[int, ...]
    grid: Grid


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


# ----------------------------------------------------------------------- running


def ingest_runner(
    scheduler: Any = None, workers: int | None = None, progress: ProgressFn | None = None
) -> Runner:
    """The blockwise runner for an ingest.

    ``scheduler``: None or "threads" (local threads, by default two per core: a unit waits
    on its reads and on zarr's compression threads, so one per core left a 2-core machine
    11% slower), "sync" (one unit at a time, for debugging), a scheduler address such as
    "tcp://10.0.0.1:8786", or a ``distributed.Client``. Units get descriptors only; each
    opens the files it reads itself.
    """
    if scheduler is None or scheduler == "threads":
        return Runner(None, threads=workers, progress=progress)
    if scheduler in ("sync", "synchronous"):
        return Runner(None, threads=1, progress=progress)
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


def _unit_box(plan: Any, index: tuple[int, ...]) -> Box:
    grid: Grid = plan.grid if isinstance(plan, LevelPlan) else _ingest_plan(plan).level0
    return Box.from_bounds([a for a, _ in grid.box(index)], [b for _, b in grid.box(index)])


def _ingest_plan(plan: Any) -> IngestPlan:
    return plan.plan if isinstance(plan, RefinePlan) else plan


# -------------------------------------------------------------------------- main


def ingest_volume(
    src: str,
    dst: str,
    chunks: Sequence[int] | None = None,
    axes: str | None = None,
    compression: str = "zstd",
    levels: int = 0,
    overwrite: bool = False,
    dask_client_or_scheduler: Any = None,
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
    check_access(plan.dst)
    check_sizes(plan, levels, allow_sparse)
    with Lease(plan.dst, "ingest", wait_s=lease_wait_s) as lease:
        _prepare_store(plan, overwrite, refresh)
        grid = plan.level0
        _partials(plan.dst, f"{STEP}-moments", (grid.n_units, 5), "float64", plan.key)
        _partials(plan.dst, f"{STEP}-digest", (grid.n_units, 1), "uint64", plan.key)
        if plan.exact_stats:
            _partials(plan.dst, f"{STEP}-hist", (grid.n_units, plan.bins), "int64", plan.key)
        runner = ingest_runner(dask_client_or_scheduler, workers, progress)
        try:
            runner.run(Step(STEP, plan.dst, grid.grid, plan.key, ingest_unit, plan, _unit_box))
            stats = _collect_stats(plan, runner)
            factors = _build_levels(plan, levels, runner, progress, unit_mib)
        finally:
            release_files()
        lease.check()
        _finalize(plan, levels, factors, stats)
    return read_image_info(plan.dst)


def check_sizes(plan: IngestPlan, levels: int = 0, allow_sparse: bool = False) -> None:
    """Refuse, before anything is written, a source that declares far more data than its
    files hold (a crafted or sparse TIFF; ``allow_sparse`` accepts it) and a local
    destination without the free space the image needs (a resumed ingest is not checked).
    """
    src = plan.source
    declared = src.nbytes
    held = sum(f.size for f in src.files)
    if not allow_sparse and declared > max(SPARSE_MIN_BYTES, SPARSE_RATIO * held):
        dims = "×".join(str(n) for n in src.shape)
        raise InvalidVolumeError(
            f"{src.url}: declares {dims} {src.dtype} ({_size(declared)}) but its file"
            f"{'s hold' if len(src.files) > 1 else ' holds'} only {_size(held)}, "
            f"more than {SPARSE_RATIO}:1; pass --allow-sparse if the image really is that "
            "sparse"
        )
    if is_remote(plan.dst):
        return
    previous = _previous_ingest(plan.dst) if _is_zarr(plan.dst) else None
    if previous is not None and previous.get("ingest", {}).get("data_key") == plan.data_key:
        return
    need = declared if plan.compression == "none" else min(declared, held)
    if levels:
        need = need * 4 // 3  # each level adds at most a quarter of the one above
    parent = os.path.abspath(plan.dst)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise StorageError(
            f"{plan.dst}: the image needs about {_size(need)} but only {_size(free)} are "
            "free there; free space or choose another destination"
        )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


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
    name = volume_name(plan.source.url) or "image"
    root.attrs.update(
        {
            "ome": image_ome(
                Multiscale.build(plan.axes, plan.source.scale, factors, plan.source.unit, name)
            ),
            "segflow": _segflow_attrs(plan, "complete", levels, stats, "crc-" + identity),
        }
    )


def ingest_status(dst: str) -> dict[str, Any]:
    """Progress of an ingest as stored in DST: status, units done and total."""
    seg = _previous_ingest(dst) or {}
    markers = Markers.open(dst, STEP)
    key = str(seg.get("ingest", {}).get("key", ""))
    return {
        "status": seg.get("ingest", {}).get("status", "absent"),
        "units_done": markers.count(key) if markers and key else 0,
        "units": math.prod(markers.grid) if markers else 0,
    }
