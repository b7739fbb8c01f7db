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
    dst/segflow-done/ingest          one marker per unit (DoneTracker)
    dst/segflow-done/ingest-moments  per unit: count, sum, sum of squares, min, max
    dst/segflow-done/ingest-hist     per unit histogram (exact for <= 16-bit integers;
                                     for other types filled by a read-back pass over
                                     level 0 once the global min/max are known)
    dst/segflow-done/ingest-stats    markers of that read-back pass (float images)
    dst/segflow-done/ingest-level<N> markers of the downsampled levels

A killed ingest leaves no ``ome.multiscales``, so :func:`tasks.store.read_image_info`
refuses the store ("not an OME-Zarr image") until a re-run has finished it. Re-running on
the same SRC and DST writes only the unmarked units; a different SRC (or other chunking or
compression) into an existing DST raises :class:`StoreConflictError` unless ``overwrite``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from tasks.cluster import ClusterSpec, dask_client
from tasks.store import (
    DONE_GROUP,
    NGFF_VERSION,
    DoneTracker,
    ImageInfo,
    attributes,
    check_access,
    filesystem,
    is_remote,
    join,
    multiscales,
    open_group,
    read_image_info,
    storage_options,
)
from tasks.tiff_source import TiffSource, open_source, read_box, release_files
from unet_core.errors import ConfigError, InvalidVolumeError, SegflowError, StoreConflictError
from unet_core.normalize import IntensityStats, StatsAccumulator, integer_histogram

COMPRESSIONS = ("zstd", "blosc", "none")
#: Default chunk shape of 3D images (z, y, x) and 2D images (y, x); capped at the image.
DEFAULT_CHUNKS_3D = (64, 128, 128)
DEFAULT_CHUNKS_2D = (1024, 1024)
#: Default byte budget of one write unit (the most a task holds of the image at once).
DEFAULT_UNIT_MIB = 8
#: Bins of the histogram of float (and 32-bit integer) images.
FLOAT_BINS = 65536
#: Test hook: seconds each unit sleeps before its work (to interrupt an ingest on purpose).
DELAY_ENV = "SEGFLOW_TEST_INGEST_DELAY"
STEP = "ingest"
FORMAT_VERSION = 1

Progress = Callable[[str, int, int], None]


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
        return 1 << (8 * d.itemsize) if self.exact_stats else FLOAT_BINS


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
    from zarr.codecs import BloscCodec, ZstdCodec

    if compression == "zstd":
        return ZstdCodec(level=3)
    if compression == "blosc":
        itemsize = np.dtype(dtype).itemsize
        return BloscCodec(
            cname="zstd",
            clevel=5,
            shuffle="bitshuffle" if itemsize == 1 else "shuffle",
            typesize=itemsize,
        )
    return None


def _exists(url: str) -> bool:
    """Whether ``url`` holds anything (an empty local folder counts as nothing)."""
    if is_remote(url):
        fs = filesystem(url)
        try:
            return bool(fs.exists(url)) and bool(fs.ls(url, refresh=True))
        except FileNotFoundError:
            return False
    if os.path.isdir(url):
        return bool(os.listdir(url))
    return os.path.exists(url)


def _is_zarr(url: str) -> bool:
    if is_remote(url):
        return bool(filesystem(url).exists(join(url, "zarr.json")))
    return os.path.isfile(os.path.join(url, "zarr.json"))


def _delete(url: str) -> None:
    if is_remote(url):
        filesystem(url).rm(url, recursive=True)
    elif os.path.isdir(url):
        shutil.rmtree(url)
    else:
        os.remove(url)


def _previous_ingest(url: str) -> dict[str, Any] | None:
    try:
        attrs = attributes(open_group(url, "r"))
    except SegflowError:
        return None
    seg = attrs.get("segflow")
    return seg if isinstance(seg, dict) else None


def _prepare_store(plan: IngestPlan, overwrite: bool) -> bool:
    """Create DST, or check that it is a (partial) ingest of the same data. True = resume."""
    dst = plan.dst
    check_access(dst)
    if _exists(dst):
        previous = _previous_ingest(dst) if _is_zarr(dst) else None
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
        if not overwrite:
            if previous and previous.get("source", {}).get("url"):
                what = f"an image ingested from {previous['source']['url']}"
                if same:
                    what = "a damaged ingest of this source"
                elif previous["source"].get("url") == plan.source.url:
                    what = "an ingest of this source with other settings or an older version"
            elif _is_zarr(dst):
                what = "a zarr store with other data"
            else:
                what = "other files"
            raise StoreConflictError(f"{dst}: already holds {what}; pass --overwrite to replace it")
        if not _is_zarr(dst):
            raise StoreConflictError(
                f"{dst}: exists and is not a zarr store, so it is not deleted even with "
                "--overwrite; choose another destination"
            )
        _delete(dst)
    root = open_group(dst, "w")
    root.attrs.update({"segflow": _segflow_attrs(plan, "incomplete", 0)})
    root.create_array(
        "0",
        shape=plan.level0.shape,
        chunks=plan.level0.chunks,
        dtype=plan.dtype,
        compressors=_compressors(plan.compression, plan.dtype),
        fill_value=0,
        dimension_names=list(plan.axes),
    )
    return False


def _segflow_attrs(
    plan: IngestPlan, status: str, levels: int, stats: IntensityStats | None = None
) -> dict[str, Any]:
    src = plan.source
    attrs: dict[str, Any] = {
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
            "chunks": list(plan.level0.chunks),
            "compression": plan.compression,
            "levels": levels,
            "unit_chunks": list(plan.level0.unit_chunks),
            "format": FORMAT_VERSION,
        },
    }
    if stats is not None:
        attrs["stats"] = stats.model_dump()
    return attrs


def _array(url: str, path: str, mode: str = "r+") -> zarr.Array:
    full = join(url, path)
    arr = zarr.open_array(full, mode=mode, storage_options=storage_options(full))
    # every chunk is written, even one that holds only zeros: no per-chunk comparison
    # (it costs time and temporaries), and a written unit is complete in the store
    return arr.with_config({"write_empty_chunks": True})


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
    from zarr.codecs import ZstdCodec

    return group.create_array(
        name,
        shape=shape,
        chunks=(1, shape[1]),
        dtype=dtype,
        fill_value=0,
        compressors=ZstdCodec(level=3),
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


def _finite(piece: np.ndarray) -> np.ndarray:
    if piece.dtype.kind == "f":
        flat = piece.reshape(-1) if piece.flags.c_contiguous else piece.ravel()
        mask = np.isfinite(flat)
        return flat if mask.all() else flat[mask]
    return piece


def _moments(block: np.ndarray) -> np.ndarray:
    """count, sum, sum of squares, min, max of the finite voxels of ``block``."""
    count, total, total_sq = 0, 0.0, 0.0
    lo, hi = math.inf, -math.inf
    for piece in _pieces(block):
        p = _finite(piece)
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
    _array(plan.dst, f"{DONE_GROUP}/{STEP}")[tuple(index)] = 1
    return int(block.nbytes)


def histogram_unit(
    plan: IngestPlan, index: tuple[int, ...], value_range: tuple[float, float]
) -> int:
    """Second pass for float images: histogram one unit of level 0 in the global range."""
    grid = plan.level0
    box = grid.box(index)
    block = np.asarray(_array(plan.dst, "0", "r")[_slices(box)])
    acc = StatsAccumulator(np.dtype(plan.dtype), value_range=value_range, bins=FLOAT_BINS)
    for piece in _pieces(block):
        p = _finite(piece)
        if p.size:
            h, _ = np.histogram(p, bins=FLOAT_BINS, range=acc.value_range)
            acc.hist += h
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-hist")[grid.flat(index)] = acc.hist
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-stats")[tuple(index)] = 1
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
    _array(plan.dst, f"{DONE_GROUP}/{STEP}-level{plan.level}")[tuple(index)] = 1
    return int(block.nbytes)


# ----------------------------------------------------------------------- running


class Runner:
    """Runs tasks on Dask: a local scheduler by name, a scheduler address, or a Client.

    ``scheduler``: None or "threads" (Dask's threaded scheduler in this process, on a pool
    of ``workers`` threads, by default two per core: a unit waits on its reads and on zarr's
    compression threads, so one per core left a 2-core machine 11% slower), "processes"
    (Dask's multiprocessing scheduler), "sync" (one task at a time, for debugging), an
    address such as "tcp://10.0.0.1:8786", a :class:`tasks.cluster.ClusterSpec` (e.g. SLURM
    worker jobs), or a ``distributed.Client``. Tasks get
    descriptors only; each opens the files it reads itself.
    """

    def __init__(self, scheduler: Any = None, workers: int | None = None) -> None:
        self.scheduler = "threads" if scheduler is None else scheduler
        if self.scheduler == "synchronous":
            self.scheduler = "sync"
        self.workers = workers
        self._client: Any = None
        self._own_client: dask_client | None = None
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> Runner:
        s = self.scheduler
        if s == "threads":
            self._pool = ThreadPoolExecutor(self.workers or 2 * (os.cpu_count() or 1))
        elif isinstance(s, ClusterSpec) or (isinstance(s, str) and s not in ("processes", "sync")):
            own = dask_client(cluster=s) if isinstance(s, ClusterSpec) else dask_client(address=s)
            self._client = own.__enter__()
            self._own_client = own
        elif not isinstance(s, str):
            if not hasattr(s, "submit"):
                raise ConfigError(f"scheduler {s!r} is neither a name, an address nor a Client")
            self._client = s
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # its threads' open files go with them
        release_files()
        if self._own_client is not None:
            self._own_client.__exit__(*exc)

    def run(
        self,
        fn: Callable[..., int],
        calls: list[tuple[Any, ...]],
        phase: str,
        progress: Progress | None,
    ) -> int:
        """Run ``fn(*args)`` for each args; returns the sum of the results (bytes)."""
        total = len(calls)
        if progress:
            progress(phase, 0, total)
        if not calls:
            return 0
        if self._client is not None:
            return self._run_distributed(fn, calls, phase, progress)
        # a plain task graph for Dask's local schedulers (dask.compute would also import
        # distributed, some 30 MB, for nothing)
        from dask.callbacks import Callback

        graph: dict[Any, Any] = {
            (phase, i): (functools.partial(fn, *args),) for i, args in enumerate(calls)
        }
        keys = list(graph)
        done = [0]

        def posttask(key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            done[0] += 1
            if progress:
                progress(phase, done[0], total)

        with Callback(posttask=posttask):
            if self.scheduler == "threads":
                import dask.threaded

                results = dask.threaded.get(graph, keys, pool=self._pool)
            elif self.scheduler == "processes":
                import dask.multiprocessing

                results = dask.multiprocessing.get(graph, keys, num_workers=self.workers)
            else:
                import dask.local

                results = dask.local.get_sync(graph, keys)
        return int(sum(results))

    def _run_distributed(
        self,
        fn: Callable[..., int],
        calls: list[tuple[Any, ...]],
        phase: str,
        progress: Progress | None,
    ) -> int:
        from distributed import as_completed

        client = self._client
        futures = [client.submit(fn, *args, pure=False) for args in calls]
        total, done = 0, 0
        try:
            for fut in as_completed(futures):
                total += int(fut.result())
                done += 1
                if progress:
                    progress(phase, done, len(calls))
        finally:
            for fut in futures:
                fut.cancel()
        return total


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
    progress: Progress | None = None,
    *,
    voxel_size: Sequence[float] | None = None,
    unit_mib: float = DEFAULT_UNIT_MIB,
    workers: int | None = None,
) -> ImageInfo:
    """Stream SRC (TIFF / OME-TIFF / BigTIFF file, folder or glob of slices) into DST.

    ``chunks``: zarr chunk shape, spatial (z,y,x / y,x) or per axis; default
    64×128×128 (3D) or 1024×1024 (2D), all channels in one chunk. ``axes`` overrides the
    TIFF's axes (e.g. "zyx", "zcyx"). ``levels``: downsampled pyramid levels to add.
    ``progress(phase, done, total)`` is called as units finish. See the module docstring
    for the store layout, resume and conflict rules.
    """
    if levels < 0:
        raise ConfigError(f"levels must be 0 or more, got {levels}")
    source = open_source(str(src), axes, voxel_size)
    plan = make_plan(source, str(dst), chunks, compression, unit_mib)
    _prepare_store(plan, overwrite)
    grid = plan.level0
    tracker = DoneTracker(plan.dst, STEP, grid.grid, plan.key)
    _partials(plan.dst, f"{STEP}-moments", (grid.n_units, 5), "float64", plan.key)
    if plan.exact_stats:
        _partials(plan.dst, f"{STEP}-hist", (grid.n_units, plan.bins), "int64", plan.key)
    done = tracker.done_mask()
    todo = [(plan, index) for index in grid.units() if not done[index]]
    with Runner(dask_client_or_scheduler, workers) as runner:
        runner.run(ingest_unit, todo, "ingest", progress)
        stats = _collect_stats(plan, runner, progress)
        factors = _build_levels(plan, levels, runner, progress, unit_mib)
    _finalize(plan, levels, factors, stats)
    return read_image_info(plan.dst)


def _collect_stats(
    plan: IngestPlan, runner: Runner, progress: Progress | None
) -> IntensityStats | None:
    grid = plan.level0
    moments = np.asarray(_array(plan.dst, f"{DONE_GROUP}/{STEP}-moments", "r")[...])
    counts = moments[:, 0]
    if counts.sum() == 0:
        return None
    seen = counts > 0
    if plan.exact_stats:
        acc = StatsAccumulator(np.dtype(plan.dtype))
    else:
        value_range = (float(moments[seen, 3].min()), float(moments[seen, 4].max()))
        key = _digest({"key": plan.key, "range": list(value_range)})
        tracker = DoneTracker(plan.dst, f"{STEP}-stats", grid.grid, key)
        _partials(plan.dst, f"{STEP}-hist", (grid.n_units, plan.bins), "int64", key)
        done = tracker.done_mask()
        todo = [(plan, i, value_range) for i in grid.units() if not done[i]]
        runner.run(histogram_unit, todo, "statistics", progress)
        acc = StatsAccumulator(np.dtype(plan.dtype), value_range=value_range, bins=FLOAT_BINS)
    hist_arr = _array(plan.dst, f"{DONE_GROUP}/{STEP}-hist", "r")
    hist = np.zeros(plan.bins, dtype=np.int64)
    step = 4  # rows of 256 or 65536 bins at a time
    for start in range(0, grid.n_units, step):
        hist += np.asarray(hist_arr[start : start + step]).sum(axis=0)
    acc.add_parts(
        int(counts.sum()),
        float(moments[:, 1].sum()),
        float(moments[:, 2].sum()),
        float(moments[seen, 3].min()),
        float(moments[seen, 4].max()),
        hist,
    )
    return acc.result()


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
    progress: Progress | None,
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
        tracker = DoneTracker(plan.dst, f"{STEP}-level{level}", grid.grid, key)
        done = tracker.done_mask()
        lp = LevelPlan(plan.dst, level, factors, shape, grid)
        todo = [(lp, i) for i in grid.units() if not done[i]]
        runner.run(level_unit, todo, f"level {level}", progress)
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
    tracker = DoneTracker.open(plan.dst, STEP)
    if tracker is None or not tracker.all_done():
        raise InvalidVolumeError(f"{plan.dst}: ingest finished with units missing")
    root = open_group(plan.dst, "r+")
    name = os.path.basename(plan.source.url.rstrip("/")) or "image"
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    root.attrs.update(
        {
            "ome": {
                "version": NGFF_VERSION,
                "multiscales": multiscales(
                    plan.axes, plan.source.scale, factors, plan.source.unit, name=name
                ),
            },
            "segflow": _segflow_attrs(plan, "complete", levels, stats),
        }
    )


def ingest_status(dst: str) -> dict[str, Any]:
    """Progress of an ingest as stored in DST: status, units done and total."""
    seg = _previous_ingest(dst) or {}
    tracker = DoneTracker.open(dst, STEP)
    return {
        "status": seg.get("ingest", {}).get("status", "absent"),
        "units_done": tracker.count() if tracker else 0,
        "units": math.prod(tracker.grid) if tracker else 0,
    }


# -------------------------------------------------------------------------- prefect

if TYPE_CHECKING:
    from prefect import Task

    #: The Prefect task wrapping :func:`ingest_volume` (name "ingest", one retry: a retry
    #: resumes where the failed attempt stopped).
    ingest_task: Task[..., ImageInfo]


def __getattr__(name: str) -> Any:
    # ``ingest_task`` is made on first use, so that the plain function (the CLI, Dask
    # workers, the benchmark) does not import Prefect.
    if name == "ingest_task":
        from prefect import task

        value = task(name="ingest", retries=1)(ingest_volume)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
