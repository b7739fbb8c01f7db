"""Segment an OME-Zarr image with a U-Net on Dask: one task per block of output chunks.

Data path of one block (see :mod:`unet_core.geometry` for the drawing)::

    zarr image ──read block.read (mirror only outside the volume)──▶ normalise (global stats)
      ──▶ tiles through the model (batched) ──▶ keep usable centres ──▶ logits of block.write
      ──▶ argmax → labels/<name>/0[block.write]   softmax → probabilities/0[:, block.write]
      ──▶ mark the block done in segflow-done/segment-<name>

Blocks are whole multiples of the output chunks, so no two blocks write the same chunk and
no locks are needed. The model is loaded once per worker process (cached by checkpoint
digest), never per block. A forward pass holds a per-device lock so that, while one block
computes, the other Dask threads read, normalise and write the next ones.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field

from tasks.cluster import ClusterSpec, dask_client, share
from tasks.store import (
    LABELS_GROUP,
    PROBABILITIES_GROUP,
    DoneTracker,
    ImageInfo,
    attributes,
    get_array,
    multiscales,
    open_group,
    open_level,
    read_image_info,
)
from unet_core.checkpoint import load_checkpoint, read_checkpoint_header
from unet_core.config import UNetConfig
from unet_core.errors import ConfigError, InvalidVolumeError
from unet_core.geometry import Block, Box, Tile, TileSpec, plan_tiles
from unet_core.normalize import IntensityStats, StatsAccumulator, apply_affine
from unet_core.predict import Predictor, class_labels, label_dtype, read_mirrored, softmax

log = logging.getLogger(__name__)


class SegmentParams(BaseModel):
    """How to segment: shared by the CLI and the Prefect flows (renders as a UI form)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunks: tuple[int, ...] | None = Field(
        None, description="Output chunk shape per spatial axis (default: the image's chunks)."
    )
    tile: tuple[int, ...] | None = Field(
        None,
        description="Largest tile input shape per spatial axis (default: chosen from the model).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    batch_size: int = Field(4, ge=1, le=256, description="Tiles per forward pass.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    exact: bool = Field(
        True,
        description="CPU fp32: bitwise equal to a whole-volume pass (slower kernels).",
    )
    probabilities: bool = Field(False, description="Also write class probabilities.")
    probabilities_dtype: Literal["float16", "float32"] = Field("float16")
    channel: int | None = Field(
        None, ge=0, description="Use only this channel of a multi-channel image."
    )
    labels_name: str = Field("semantic", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")

    def run_key(self, digest: str, stats: IntensityStats | None) -> str:
        """Identity of a result: model digest, everything that changes outputs, image stats."""
        fields = self.model_dump(exclude={"device", "batch_size"})
        blob = json.dumps(
            {"model": digest, "params": fields, "stats": stats.model_dump() if stats else None},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class SegmentPlan:
    """Everything a block needs, as descriptors (URLs, boxes, numbers): cheap to ship."""

    image: ImageInfo
    model_path: str
    model_digest: str
    config: UNetConfig
    out_url: str
    params: SegmentParams
    block_shape: tuple[int, ...]
    chunks: tuple[int, ...]
    tile: tuple[int, ...]
    offset: float
    scale: float
    key: str
    class_names: tuple[str, ...]
    foreground_class: int = 1
    suggested_min_size: int = 0

    @property
    def labels_path(self) -> str:
        return f"{LABELS_GROUP}/{self.params.labels_name}"

    @property
    def done_step(self) -> str:
        return f"segment-{self.params.labels_name}"

    @property
    def grid(self) -> tuple[int, ...]:
        """Blocks per axis."""
        return tuple(
            -(-n // b) for n, b in zip(self.image.spatial_shape, self.block_shape, strict=True)
        )

    @property
    def n_blocks(self) -> int:
        return int(np.prod(self.grid))

    def indices(self) -> list[tuple[int, ...]]:
        return [tuple(int(i) for i in idx) for idx in np.ndindex(*self.grid)]

    def block(self, index: Sequence[int]) -> Block:
        """The block at a grid index (computed, not stored: plans stay small)."""
        index = tuple(int(i) for i in index)
        if len(index) != len(self.grid) or any(
            not 0 <= i < g for i, g in zip(index, self.grid, strict=True)
        ):
            raise ConfigError(f"block index {index} is outside the block grid {self.grid}")
        volume = Box.of_shape(self.image.spatial_shape)
        begin = tuple(i * b for i, b in zip(index, self.block_shape, strict=True))
        write = Box(begin, self.block_shape).intersect(volume)
        read, _ = plan_tiles(TileSpec(self.config, volume.ndim), write, self.tile)
        return Block(index=index, read=read, write=write)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.image.spatial_shape))


@dataclass
class SegmentResult:
    out_url: str
    labels_path: str
    probabilities_path: str | None
    blocks_total: int
    blocks_computed: int
    blocks_skipped: int
    voxels: int
    seconds: float
    class_voxels: dict[str, int] = field(default_factory=dict)

    @property
    def voxels_per_second(self) -> float:
        return self.voxels / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------- planning


def default_block_shape(
    spec: TileSpec, chunks: Sequence[int], tile: Sequence[int]
) -> tuple[int, ...]:
    """Whole chunks per block, about one tile's usable output along each model axis."""
    usable = spec.usable(tile)
    return tuple(
        c if a < spec.slice_axes else c * max(1, u // c)
        for a, (c, u) in enumerate(zip(chunks, usable, strict=True))
    )


def plan_segmentation(
    src: str,
    model_path: str,
    out: str | None = None,
    params: SegmentParams | None = None,
    block_shape: Sequence[int] | None = None,
) -> SegmentPlan:
    """Check the inputs against each other and plan the blocks (reads metadata only)."""
    params = params or SegmentParams()
    info = read_image_info(src)
    config, meta = read_checkpoint_header(model_path)
    spatial = info.spatial_shape
    if any(n < 1 for n in spatial):
        raise InvalidVolumeError(f"{src}: the image is empty (shape {info.shape})")
    if config.ndim > len(spatial):
        raise InvalidVolumeError(
            f"{src}: a {config.ndim}D model cannot segment a {len(spatial)}D image"
        )
    n_in = info.n_channels if params.channel is None else 1
    if params.channel is not None and params.channel >= info.n_channels:
        raise InvalidVolumeError(
            f"{src}: channel {params.channel} asked for but the image has {info.n_channels}"
        )
    if n_in != config.in_channels:
        raise InvalidVolumeError(
            f"{src}: the image has {n_in} channel(s) but the model {model_path} expects "
            f"{config.in_channels} (select one with --channel)"
        )
    spec = TileSpec(config, len(spatial))
    chunks = tuple(params.chunks or info.chunks[-len(spatial) :])
    if len(chunks) != len(spatial) or any(c < 1 for c in chunks):
        raise ConfigError(f"chunks {chunks} do not fit the image's {len(spatial)} spatial axes")
    tile = spec.valid_tile_shape(params.tile) if params.tile else spec.default_tile_shape()
    overhead = float(np.prod(tile)) / max(float(np.prod(spec.usable(tile))), 1.0)
    if overhead > 8:
        log.warning(
            "tile %s keeps only %s of its input (%.0fx recomputation); a larger tile is faster",
            tile,
            spec.usable(tile),
            overhead,
        )
    blocks_shape = tuple(block_shape) if block_shape else default_block_shape(spec, chunks, tile)
    if any(b % c for b, c in zip(blocks_shape, chunks, strict=True)):
        raise ConfigError(f"block shape {blocks_shape} is not a multiple of the chunks {chunks}")
    stats = info.stats
    if meta.normalization.kind != "none" and stats is None:
        log.warning("%s has no stored intensity statistics; computing them now", src)
        stats = compute_image_stats(info)
    offset, scale = meta.normalization.affine(stats)
    out_url = str(out or src)
    return SegmentPlan(
        image=info,
        model_path=str(model_path),
        model_digest=meta.digest,
        config=config,
        out_url=out_url,
        params=params,
        block_shape=blocks_shape,
        chunks=chunks,
        tile=tile,
        offset=offset,
        scale=scale,
        key=params.run_key(meta.digest, stats),
        class_names=tuple(meta.names_for(config.n_classes)),
        foreground_class=min(meta.foreground_class, config.n_classes - 1),
        suggested_min_size=meta.object_stats.suggested_min_size if meta.object_stats else 0,
    )


def compute_image_stats(info: ImageInfo) -> IntensityStats:
    """Global statistics by streaming the image's chunks (two passes for float data)."""
    arr = open_level(info)
    boxes = _chunk_slabs(arr)
    dtype = np.dtype(info.dtype)
    value_range = None
    if not (dtype.kind in "ui" and dtype.itemsize <= 2):
        lo, hi = np.inf, -np.inf
        for sl in boxes:
            a = np.asarray(arr[sl])
            lo, hi = min(lo, float(a.min())), max(hi, float(a.max()))
        value_range = (lo, hi)
    acc = StatsAccumulator(dtype, value_range=value_range)
    for sl in boxes:
        acc.add(np.asarray(arr[sl]))
    return acc.result()


def _chunk_slabs(arr: zarr.Array) -> list[tuple[slice, ...]]:
    """Slabs of whole chunks along the first axis (bounded memory)."""
    step = int(arr.chunks[0])
    return [
        (slice(i, min(i + step, arr.shape[0])),) + (slice(None),) * (arr.ndim - 1)
        for i in range(0, arr.shape[0], step)
    ]


# ---------------------------------------------------------------------------- outputs


def _label_metadata(plan: SegmentPlan, source: str) -> dict[str, Any]:
    axes = plan.image.spatial_axes
    colors = _class_colors(len(plan.class_names))
    return {
        "ome": {
            "version": "0.5",
            "multiscales": multiscales(
                axes,
                plan.image.spatial_scale,
                [],
                unit=plan.image.unit,
                name=plan.params.labels_name,
            ),
            "image-label": {
                "version": "0.5",
                "colors": [{"label-value": i, "rgba": rgba} for i, rgba in enumerate(colors)],
                "properties": [
                    {"label-value": i, "class": name} for i, name in enumerate(plan.class_names)
                ],
                "source": {"image": source},
            },
        },
        "segflow": {
            "model_digest": plan.model_digest,
            "model": plan.model_path,
            "key": plan.key,
            "complete": False,
            "foreground_class": plan.foreground_class,
            "suggested_min_size": plan.suggested_min_size,
        },
    }


def _class_colors(n: int) -> list[list[int]]:
    palette = [
        [0, 0, 0, 0],
        [255, 64, 64, 160],
        [64, 160, 255, 160],
        [64, 255, 96, 160],
        [255, 200, 0, 160],
        [200, 64, 255, 160],
    ]
    return [palette[i % len(palette)] if i < len(palette) else palette[1 + i % 5] for i in range(n)]


def prepare_outputs(plan: SegmentPlan, force: bool = False) -> DoneTracker:
    """Create (or reuse, when resuming the same run) the output arrays; return the tracker.

    Arrays are reused only when they have the planned shape, chunks and dtype and the done
    markers carry this run's key; otherwise they are recreated and every block recomputes.
    """
    same_store = plan.out_url.rstrip("/") == plan.image.url.rstrip("/")
    root = open_group(plan.out_url, "a")
    if not same_store and not attributes(root).get("segflow"):
        root.attrs.update(
            {"segflow": {"source_image": plan.image.url, "role": "segmentation outputs"}}
        )
    tracker = DoneTracker(plan.out_url, plan.done_step, plan.grid, plan.key)
    if force:
        tracker.array[...] = 0
    spatial = plan.image.spatial_shape
    dims = list(plan.image.spatial_axes)
    labels_group = root.require_group(LABELS_GROUP)
    names = list(attributes(labels_group).get("ome", {}).get("labels", []))
    if plan.params.labels_name not in names:
        names.append(plan.params.labels_name)
    labels_group.attrs.update({"ome": {"version": "0.5", "labels": names}})
    source = "../../" if same_store else plan.image.url
    lgroup = labels_group.require_group(plan.params.labels_name)
    lgroup.attrs.update(_label_metadata(plan, source))
    _require_array(
        lgroup, "0", spatial, plan.chunks, label_dtype(plan.config.n_classes), dims, tracker
    )
    if plan.params.probabilities:
        pgroup = root.require_group(PROBABILITIES_GROUP)
        pgroup.attrs.update(
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": multiscales(
                        "c" + plan.image.spatial_axes,
                        (1.0, *plan.image.spatial_scale),
                        [],
                        unit=plan.image.unit,
                        name="probabilities",
                    ),
                },
                "segflow": {"classes": list(plan.class_names), "key": plan.key},
            }
        )
        _require_array(
            pgroup,
            "0",
            (plan.config.n_classes, *spatial),
            (plan.config.n_classes, *plan.chunks),
            np.dtype(plan.params.probabilities_dtype),
            ["c", *dims],
            tracker,
        )
    return tracker


def _require_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype,
    dims: list[str],
    tracker: DoneTracker,
) -> zarr.Array:
    existing = group.get(name)
    if (
        isinstance(existing, zarr.Array)
        and tuple(existing.shape) == tuple(shape)
        and tuple(existing.chunks) == tuple(chunks)
        and existing.dtype == dtype
    ):
        return existing
    if tracker.count():
        tracker.array[...] = 0  # the outputs are new: nothing in them is done
    from zarr.codecs import ZstdCodec

    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=0,
        compressors=ZstdCodec(level=3),
        dimension_names=dims,
        overwrite=True,
    )


def finalize_outputs(plan: SegmentPlan, tracker: DoneTracker) -> None:
    """Once every block is done: pyramid levels like the image's, then mark complete."""
    if not tracker.all_done():
        return
    from tasks.pyramid import write_label_levels

    write_label_levels(plan.out_url, plan.params.labels_name, plan.image.url)
    lgroup = open_group(plan.out_url, "r+")[plan.labels_path]
    meta = attributes(lgroup)
    meta.setdefault("segflow", {})["complete"] = True
    lgroup.attrs.update({"segflow": meta["segflow"]})


# ------------------------------------------------------------------------ block work

_predictors: dict[tuple[Any, ...], Predictor] = {}
#: How many times this process loaded a checkpoint (observability: once per worker).
model_loads = 0
_predictors_lock = threading.Lock()
_device_locks: dict[str, threading.Lock] = {}


def get_predictor(plan: SegmentPlan) -> Predictor:
    """The worker's predictor for this checkpoint (loaded once per process)."""
    p = plan.params
    key = (plan.model_path, plan.model_digest, p.device, p.batch_size, p.precision, p.exact)
    global model_loads
    with _predictors_lock:
        predictor = _predictors.get(key)
        if predictor is None:
            model, meta = load_checkpoint(plan.model_path)
            model_loads += 1
            if meta.digest != plan.model_digest:
                raise ConfigError(
                    f"{plan.model_path}: the checkpoint changed while the run was going on"
                )
            predictor = Predictor(
                model,
                device=p.device,
                batch_size=p.batch_size,
                precision=p.precision,
                exact=p.exact,
            )
            _predictors[key] = predictor
            _device_locks.setdefault(str(predictor.device), threading.Lock())
            log.info(
                "loaded model %s (digest %s) on %s",
                plan.model_path,
                plan.model_digest[:12],
                predictor.device,
            )
        return predictor


def read_block_input(plan: SegmentPlan, read: Box) -> np.ndarray:
    """(C, *read.shape) float32: the read box, mirror-extended at the volume border only,
    normalised with the global statistics."""
    arr = open_level(plan.image)
    c_axis = plan.image.channel_axis
    data = read_mirrored(arr, read, plan.image.spatial_shape, leading=0 if c_axis is None else 1)
    if c_axis is None:
        data = data[None]
    elif plan.params.channel is not None:
        data = data[plan.params.channel : plan.params.channel + 1]
    return apply_affine(data, plan.offset, plan.scale)


_fault_hook: Callable[[SegmentPlan, Block], None] | None = None


_cpu_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _cpu_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The process's one thread for CPU blocks (created on first use)."""
    global _cpu_executor
    with _predictors_lock:
        if _cpu_executor is None:
            _cpu_executor = concurrent.futures.ThreadPoolExecutor(1, "segflow-cpu")
        return _cpu_executor


def _compute_block(
    plan: SegmentPlan,
    predictor: Predictor,
    read: Box,
    tiles: Sequence[Tile],
    block: Block,
    lock: threading.Lock | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read, predict and write one block; ``lock`` guards only the forward passes."""
    t0 = time.perf_counter()
    data = read_block_input(plan, read)
    t1 = time.perf_counter()
    with lock or contextlib.nullcontext():
        logits = predictor.logits(data, read, tiles, block.write)
    t2 = time.perf_counter()
    del data
    labels, counts = class_labels(logits)
    root = open_group(plan.out_url, "r+")
    get_array(root, f"{plan.labels_path}/0", plan.out_url)[block.write.to_slices()] = labels
    if plan.params.probabilities:
        probs = softmax(logits).astype(plan.params.probabilities_dtype)
        get_array(root, f"{PROBABILITIES_GROUP}/0", plan.out_url)[
            (slice(None), *block.write.to_slices())
        ] = probs
    return counts, (t0, t1, t2)


def run_block(plan: SegmentPlan, index: Sequence[int]) -> dict[str, Any]:
    """Compute and write one block; returns per-class voxel counts and timings."""
    block = plan.block(index)
    if _fault_hook is not None:
        _fault_hook(plan, block)
    predictor = get_predictor(plan)
    spec = predictor.spec(block.write.ndim)
    read, tiles = plan_tiles(spec, block.write, plan.tile)
    if read != block.read:
        raise ConfigError(f"block {block.index}: planned read box {block.read} != {read}")
    if predictor.device.type == "cpu":
        # The forward pass already uses every core. Reads and writes of other blocks beside
        # it stall its parallel loops, and a different calling thread each time means a
        # different OpenMP team: measured 10-25% slower than one block at a time on one
        # thread. So CPU blocks run whole (read -> compute -> write) on one thread per process.
        counts, (t0, t1, t2) = (
            _cpu_thread().submit(_compute_block, plan, predictor, read, tiles, block).result()
        )
    else:
        # On a GPU only the compute holds the device; reads and writes of the next blocks
        # overlap it.
        counts, (t0, t1, t2) = _compute_block(
            plan, predictor, read, tiles, block, _device_locks[str(predictor.device)]
        )
    tracker = DoneTracker.open(plan.out_url, plan.done_step, mode="r+")
    if tracker is None:
        raise InvalidVolumeError(f"{plan.out_url}: the done markers disappeared during the run")
    tracker.mark(block.index)
    t3 = time.perf_counter()
    return {
        "index": list(block.index),
        "voxels": block.write.size,
        "counts": [int(c) for c in counts],
        "read_s": t1 - t0,
        "compute_s": t2 - t1,
        "write_s": t3 - t2,
    }


# ------------------------------------------------------------------------ whole runs


def pending_blocks(
    plan: SegmentPlan, tracker: DoneTracker, only: Iterable[Sequence[int]] | None = None
) -> list[tuple[int, ...]]:
    done = tracker.done_mask()
    wanted = plan.indices() if only is None else [tuple(int(j) for j in i) for i in only]
    return [i for i in wanted if not done[i]]


def run_blocks(
    plan: SegmentPlan,
    indices: Sequence[Sequence[int]],
    client: Any,
    progress: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
) -> list[dict[str, Any]]:
    """Run blocks on a Dask client; results in completion order. Raises on the first failure
    after the other submitted blocks finished (their work is kept and marked). With
    ``timeout_s``, blocks still unfinished after that long are cancelled and a
    ``TimeoutError`` is raised."""
    from distributed import as_completed

    # The plan is small (no block list); shared as a task result, so a lost worker's copy
    # is made again (a scattered one would be gone).
    shared = share(client, plan, "segflow-plan")
    run = uuid.uuid4().hex[:8]
    futures = [
        client.submit(
            run_block, shared, tuple(i), key=f"segflow-block-{run}-{'-'.join(map(str, i))}"
        )
        for i in indices
    ]
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    try:
        for fut in as_completed(futures, timeout=timeout_s):
            try:
                res = fut.result()
            except Exception as exc:  # keep going: finished blocks stay done
                errors.append(exc)
                continue
            results.append(res)
            if progress is not None:
                progress(res)
    except TimeoutError:
        client.cancel([f for f in futures if not f.done()])
        raise TimeoutError(
            f"{len(indices) - len(results) - len(errors)} block(s) of {plan.image.url} did not "
            f"finish within {timeout_s} s; they were cancelled"
        ) from None
    if errors:
        raise errors[0]
    return results


def segment_image(
    src: str,
    model_path: str,
    out: str | None = None,
    params: SegmentParams | None = None,
    client: Any = None,
    dask_address: str | None = None,
    force: bool = False,
    progress: Callable[[dict[str, Any], int], None] | None = None,
    block_shape: Sequence[int] | None = None,
    plan: SegmentPlan | None = None,
    cluster: ClusterSpec | None = None,
) -> SegmentResult:
    """Segment ``src`` (an OME-Zarr image) with the checkpoint at ``model_path``.

    Writes ``labels/<labels_name>/0`` (and ``probabilities/0`` when asked) into ``out``
    (default: into ``src``). Blocks already done for the same model and parameters are
    skipped unless ``force``. Uses ``client``, else a client of ``dask_address``, else the
    ``cluster`` (default: an in-process cluster; see :mod:`tasks.cluster`). A ``plan`` from
    :func:`plan_segmentation` may be passed in.
    """
    t0 = time.perf_counter()
    plan = plan or plan_segmentation(src, model_path, out, params, block_shape)
    tracker = prepare_outputs(plan, force=force)
    todo = pending_blocks(plan, tracker)
    log.info(
        "%s: %d blocks (%d to compute), block %s, tile %s, chunks %s",
        plan.image.url,
        plan.n_blocks,
        len(todo),
        plan.block_shape,
        plan.tile,
        plan.chunks,
    )
    counts = np.zeros(plan.config.n_classes, dtype=np.int64)

    def on_result(res: dict[str, Any]) -> None:
        counts[:] += np.asarray(res["counts"])
        if progress is not None:
            progress(res, len(todo))

    if todo:
        with dask_client(client, dask_address, cluster=cluster, device=plan.params.device) as c:
            run_blocks(plan, todo, c, on_result)
    finalize_outputs(plan, tracker)
    return SegmentResult(
        out_url=plan.out_url,
        labels_path=plan.labels_path,
        probabilities_path=f"{PROBABILITIES_GROUP}/0" if plan.params.probabilities else None,
        blocks_total=plan.n_blocks,
        blocks_computed=len(todo),
        blocks_skipped=plan.n_blocks - len(todo),
        voxels=plan.voxels,
        seconds=time.perf_counter() - t0,
        class_voxels={n: int(c) for n, c in zip(plan.class_names, counts, strict=True)},
    )


def read_labels(out_url: str, labels_name: str = "semantic") -> zarr.Array:
    return get_array(open_group(out_url, "r"), f"{LABELS_GROUP}/{labels_name}/0", out_url)
