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
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field

from tasks.blockwise import Markers, ProgressFn, Runner, Step
from tasks.cluster import ClusterSpec, dask_client
from tasks.ngff import (
    Multiscale,
    add_label,
    compressors,
    image_ome,
    label_names,
    label_ome,
    remove_label,
)
from tasks.runstate import (
    Lease,
    StrictArray,
    check_output,
    claim_store,
    image_digest,
    refuse_foreign,
    set_complete,
)
from tasks.store import (
    LABELS_GROUP,
    PROBABILITIES_GROUP,
    ImageInfo,
    attributes,
    every_chunk,
    filesystem,
    get_array,
    open_group,
    open_level,
    read_image_info,
    read_region,
)
from unet_core.checkpoint import load_checkpoint, read_checkpoint_header
from unet_core.config import UNetConfig
from unet_core.errors import ConfigError, InvalidVolumeError
from unet_core.geometry import Block, Box, Tile, TileLattice, TileSpec, plan_lattice, plan_tiles
from unet_core.normalize import (
    NONFINITE_VALUE,
    IntensityStats,
    StatsAccumulator,
    apply_affine,
)
from unet_core.predict import (
    DEFAULT_BATCH_SIZE,
    Mode,
    Predictor,
    class_labels,
    effective_batch_size,
    label_dtype,
    read_mirrored,
    softmax,
)
from unet_core.runtime import configure
from unet_core.slicelink import DEFAULT_LINK_IOU

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
    batch_size: int = Field(
        DEFAULT_BATCH_SIZE,
        ge=1,
        le=256,
        description="Tiles per forward pass (a 3D network's default-mode tile fills one alone).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    mode: Mode = Field(
        "invariant",
        description=(
            "invariant: bitwise the same result for any chunks, workers or resumed runs, "
            "fast kernels; reference: bitwise equal to one whole-volume pass (CPU, slow); "
            "fast: tiles planned per block, equal up to float rounding."
        ),
    )
    probabilities: bool = Field(False, description="Also write class probabilities.")
    probabilities_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Data type of the written probabilities."
    )
    channel: int | None = Field(
        None, ge=0, description="Use only this channel of a multi-channel image."
    )
    labels_name: str = Field(
        "semantic",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Name of the labels image written under labels/ (letters, digits, _ . -).",
    )

    def output_fields(self) -> dict[str, Any]:
        """The fields that change what is written (device and batch size do not)."""
        fields = self.model_dump(exclude={"device", "batch_size"})
        if not self.probabilities:
            fields.pop("probabilities_dtype")
        return fields


def segment_key(
    image_digest: str,
    model_digest: str,
    effective: dict[str, Any],
    stats: IntensityStats | None,
) -> str:
    """Identity of a segmentation: the image's content, the model, the *effective*
    output-affecting parameters (defaults resolved) and the normalisation statistics."""
    blob = json.dumps(
        {
            "image": image_digest,
            "model": model_digest,
            "params": effective,
            "stats": stats.model_dump() if stats else None,
        },
        sort_keys=True,
        default=list,
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
    image_digest: str = ""
    foreground_class: int = 1
    suggested_min_size: int = 0
    link_iou: float = DEFAULT_LINK_IOU

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
        read, _ = self.tiles(write)
        return Block(index=index, read=read, write=write)

    @property
    def lattice(self) -> TileLattice | None:
        """The run's tile lattice (invariant mode), else None: tiles are planned per block."""
        if self.params.mode != "invariant":
            return None
        return TileLattice(
            TileSpec(self.config, len(self.image.spatial_shape)),
            self.image.spatial_shape,
            self.tile,
        )

    def tiles(self, write: Box) -> tuple[Box, list[Tile]]:
        """(read box, tiles) of a block writing ``write``, as this run's mode plans them."""
        lattice = self.lattice
        if lattice is not None:
            return lattice.plan(write)
        return plan_tiles(TileSpec(self.config, write.ndim), write, self.tile)

    @property
    def batch_size(self) -> int:
        """Tiles per forward pass (see :func:`unet_core.predict.effective_batch_size`)."""
        return effective_batch_size(self.config.ndim, self.params.mode, self.params.batch_size)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.image.spatial_shape))

    def write_box(self, index: Sequence[int]) -> Box:
        return self.block(index).write

    def step(self) -> Step:
        """The segmentation as a step of the blockwise runner."""
        return Step(
            name=self.done_step,
            store=self.out_url,
            grid=self.grid,
            key=self.key,
            process=segment_block,
            plan=self,
            box=SegmentPlan.write_box,
        )


@dataclass
class SegmentResult:
    out_url: str
    labels_path: str
    probabilities_path: str | None
    blocks_total: int
    blocks_computed: int
    blocks_skipped: int
    voxels: int
    seconds: float  # the whole call: plan, lease, cluster, blocks, finalising
    class_voxels: dict[str, int] = field(default_factory=dict)  # only when all computed
    complete: bool = False
    compute_seconds: float = 0.0  # the blocks' step, from the first submitted block

    @property
    def voxels_per_second(self) -> float:
        """Voxels this run computed per second of block work (0 when it computed none)."""
        seconds = self.compute_seconds or self.seconds
        return self.voxels / seconds if self.voxels and seconds > 0 else 0.0


# --------------------------------------------------------------------------- planning


def default_block_shape(
    spec: TileSpec,
    chunks: Sequence[int],
    tile: Sequence[int],
    lattice: TileLattice | None = None,
    batch: int = 1,
) -> tuple[int, ...]:
    """Whole chunks per block.

    Without a lattice: about one tile's usable output along each model axis. On a lattice:
    the fewest whole chunks whose borders sit on the lattice (chunks from
    :meth:`TileLattice.aligned_chunks` already do), so that no tile is computed twice; then
    grown until a block holds a multiple of ``batch`` tiles where the volume allows, so
    that no forward pass is padded.
    """
    if lattice is None:
        usable = spec.usable(tile)
        return tuple(
            c if a < spec.slice_axes else c * max(1, u // c)
            for a, (c, u) in enumerate(zip(chunks, usable, strict=True))
        )
    shape = lattice.volume_shape
    block = []
    for a, (c, s, n) in enumerate(zip(chunks, lattice.step, shape, strict=True)):
        b = c
        if a >= spec.slice_axes and c % s and c < n:
            common = math.lcm(c, s)
            b = common if common <= 4 * max(c, s) else c * max(1, round(s / c))
        block.append(min(b, c * -(-n // c)))
    for _ in range(4):
        tiles = math.prod(
            -(-min(b, n) // s) for b, n, s in zip(block, shape, lattice.step, strict=True)
        )
        room = [a for a in range(len(block)) if block[a] < shape[a]]
        if tiles % batch == 0 or not room:
            break
        a = max(room, key=lambda i: shape[i] / block[i])
        block[a] *= 2
    return tuple(block)


def check_model_fits(info: ImageInfo, config: UNetConfig, model: str, channel: int | None) -> None:
    """The model can segment the image: dimensionality and input channels (``channel``:
    the one channel to use, or None for all)."""
    spatial = info.spatial_shape
    if any(n < 1 for n in spatial):
        raise InvalidVolumeError(f"{info.url}: the image is empty (shape {info.shape})")
    if config.ndim > len(spatial):
        raise InvalidVolumeError(
            f"{info.url}: a {config.ndim}D model ({model}) cannot segment a {len(spatial)}D image"
        )
    if channel is not None and channel >= info.n_channels:
        raise InvalidVolumeError(
            f"{info.url}: channel {channel} asked for but the image has {info.n_channels}"
        )
    n_in = info.n_channels if channel is None else 1
    if n_in != config.in_channels:
        raise InvalidVolumeError(
            f"{info.url}: the image has {n_in} channel(s) but the model {model} expects "
            f"{config.in_channels} (select one with --channel)"
        )


def fit_shapes(
    config: UNetConfig, info: ImageInfo, params: SegmentParams
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Output chunks (given or the image's) and the tile bound per spatial axis of the image.

    For a 2D model on a stack the tile may be given in-plane (``Y,X``): it means
    ``1,Y,X``, the slices the model sees."""
    spatial = info.spatial_shape
    n = len(spatial)
    chunks = tuple(params.chunks or info.chunks[-n:])
    if len(chunks) != n or any(c < 1 for c in chunks):
        raise ConfigError(
            f"chunks {chunks} do not fit the image's {n} spatial axes ({info.spatial_axes})"
        )
    tile = params.tile
    if tile is not None and config.ndim == 2 and n == 3 and len(tile) == 2:
        tile = (1, *tile)
    if tile is not None and len(tile) != n:
        plane = " or, for this 2D model, the in-plane Y,X" if config.ndim == 2 and n == 3 else ""
        raise ConfigError(
            f"tile {tile} does not fit the image's {n} spatial axes: give "
            f"{','.join(info.spatial_axes.upper())}{plane}"
        )
    return chunks, tile


def source_info(src: str) -> ImageInfo:
    """What the engine needs of SRC before anything is written: an OME-Zarr image's
    metadata, or a TIFF source's axes and shape (its header only; not yet ingested)."""
    from tasks.paths import is_tiff_source

    if not is_tiff_source(src):
        return read_image_info(src)
    from tasks.tiff_source import open_source

    source = open_source(src)
    return ImageInfo(
        url=src,
        axes=source.axes,
        shape=tuple(source.shape),
        chunks=tuple(source.shape),
        dtype=source.dtype,
        scale=tuple(source.scale),
        unit=source.unit,
        stats=None,
    )


def check_segment_inputs(
    src: str,
    model_path: str,
    out: str | None = None,
    params: SegmentParams | None = None,
    lease_wait_s: float = 0.0,
    ingest_to: str | None = None,
    local: bool = True,
) -> None:
    """Every input of a segmentation, checked before anything is ingested or written: the
    device, the checkpoint, that the model fits the image (channels, dimensionality, tile
    and chunk shapes), and that the outputs can be written (``out``, else SRC's store, else,
    for a TIFF, ``ingest_to``): writable, made by segflow, no other run writing them.
    ``local``: the model runs on this machine (else CUDA is not looked for here). Each
    problem is one sentence (a :class:`SegflowError`)."""
    from unet_core.predict import check_device

    params = params or SegmentParams()
    check_device(params.device, indexed=False, here=local)
    config, _ = read_checkpoint_header(model_path)
    info = source_info(src)
    check_model_fits(info, config, str(model_path), params.channel)
    fit_shapes(config, info, params)
    target = out or ingest_to or src
    hint = None if out or ingest_to else "pass --out to write the labels to a new store"
    check_output(str(target), lease_wait_s, hint)
    if ingest_to and out and str(ingest_to).rstrip("/") != str(out).rstrip("/"):
        check_output(str(ingest_to), lease_wait_s)


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
    check_model_fits(info, config, str(model_path), params.channel)
    spec = TileSpec(config, len(spatial))
    chunks, given_tile = fit_shapes(config, info, params)
    lattice = None
    if params.mode == "invariant":
        lattice = plan_lattice(spec, spatial, given_tile)
        tile = lattice.tile
        if params.chunks is None:
            chunks = lattice.aligned_chunks(chunks)
    else:
        tile = spec.valid_tile_shape(given_tile) if given_tile else spec.default_tile_shape()
    overhead = float(np.prod(tile)) / max(float(np.prod(spec.usable(tile))), 1.0)
    if overhead > 8:
        log.warning(
            "tile %s keeps only %s of its input (%.0fx recomputation); a larger tile is faster",
            tile,
            spec.usable(tile),
            overhead,
        )
    batch = effective_batch_size(config.ndim, params.mode, params.batch_size)
    blocks_shape = (
        tuple(block_shape)
        if block_shape
        else default_block_shape(spec, chunks, tile, lattice, batch)
    )
    if any(b % c for b, c in zip(blocks_shape, chunks, strict=True)):
        raise ConfigError(f"block shape {blocks_shape} is not a multiple of the chunks {chunks}")
    numerics: dict[str, Any] | None = None
    if lattice is not None:
        _warn_misaligned(lattice, blocks_shape)
        numerics = {"tile": list(tile), "batch": batch, "device": params.device}
    stats = info.stats
    if meta.normalization.kind != "none" and stats is None:
        log.warning("%s has no stored intensity statistics; computing them now", src)
        stats = compute_image_stats(info)
    if stats is not None and stats.nonfinite:
        log.warning(
            "%s: %d voxels are NaN or ±Inf; they are segmented as normalised intensity %s",
            src,
            stats.nonfinite,
            NONFINITE_VALUE,
        )
    offset, scale = meta.normalization.affine(stats)
    out_url = str(out or src).rstrip("/")
    digest = image_digest(info.url)
    effective = {
        **params.output_fields(),
        "chunks": list(chunks),
        "tile": list(tile),
        "channel": None if info.n_channels == 1 else params.channel,
    }
    if numerics is not None:  # what fixes the bits in the invariant mode
        effective["numerics"] = numerics
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
        key=segment_key(digest, meta.digest, effective, stats),
        class_names=tuple(meta.names_for(config.n_classes)),
        image_digest=digest,
        foreground_class=min(meta.foreground_class, config.n_classes - 1),
        suggested_min_size=meta.object_stats.suggested_min_size if meta.object_stats else 0,
        link_iou=meta.link_iou,
    )


def _warn_misaligned(lattice: TileLattice, block_shape: Sequence[int]) -> None:
    """Blocks that cut through lattice tiles compute those tiles once per block they meet:
    the same values each time (the result does not change), at a price in time."""
    axes = lattice.misaligned_axes(block_shape)
    if not axes:
        return
    ideal = lattice.n_tiles * math.prod(lattice.tile)
    factor = lattice.computed_voxels(block_shape) / ideal
    log.warning(
        "blocks %s cut through the tile lattice (step %s) on axes %s: tiles on block borders "
        "are computed once per block they meet (%.2fx the work; the result is the same). "
        "Chunks that are multiples of the step avoid it.",
        tuple(block_shape),
        lattice.step,
        axes,
        factor,
    )


def compute_image_stats(info: ImageInfo) -> IntensityStats:
    """Global statistics by streaming the image's chunks (two passes for wide types)."""
    arr = open_level(info)
    boxes = _chunk_slabs(arr)
    acc = StatsAccumulator(np.dtype(info.dtype))
    for sl in boxes:
        acc.add(read_region(arr, sl, info.url))
    if acc.refine_bins():
        for sl in boxes:
            acc.add_fine(read_region(arr, sl, info.url))
    try:
        return acc.result()
    except InvalidVolumeError as exc:
        raise InvalidVolumeError(f"{info.url}: {exc}") from None


def _chunk_slabs(arr: zarr.Array) -> list[tuple[slice, ...]]:
    """Slabs of whole chunks along the first axis (bounded memory)."""
    step = int(arr.chunks[0])
    return [
        (slice(i, min(i + step, arr.shape[0])),) + (slice(None),) * (arr.ndim - 1)
        for i in range(0, arr.shape[0], step)
    ]


# ---------------------------------------------------------------------------- outputs


def _label_metadata(plan: SegmentPlan, source: str) -> dict[str, Any]:
    ms = Multiscale.build(
        plan.image.spatial_axes,
        plan.image.spatial_scale,
        unit=plan.image.unit,
        name=plan.params.labels_name,
    )
    return {
        "ome": label_ome(ms, {"image": source}, plan.class_names),
        "segflow": {
            "model_digest": plan.model_digest,
            "model": plan.model_path,
            "key": plan.key,
            "complete": False,
            "foreground_class": plan.foreground_class,
            "suggested_min_size": plan.suggested_min_size,
            "model_ndim": plan.config.ndim,  # 2 on a stack: instances by slice linking
            "link_iou": plan.link_iou,
        },
    }


def prepare_outputs(plan: SegmentPlan, force: bool = False) -> Markers:
    """Create (or reuse, when resuming the same run) the output arrays; return the markers.

    The output store must be one segflow made (or an empty location, which it then makes).
    Arrays with the planned shape, chunks and dtype are reused: blocks marked under this
    run's key are kept, all others are recomputed. Labels of another key are marked
    incomplete first, and outputs derived from them (instances, probabilities of another
    key) are removed, so nothing stale stays marked complete beside the new labels.
    """
    same_store = plan.out_url == plan.image.url.rstrip("/")
    if same_store:
        refuse_foreign(plan.out_url, "pass --out to write the labels to a new store")
        root = open_group(plan.out_url, "r+")
    else:
        root = claim_store(plan.out_url, "segmentation outputs", source_image=plan.image.url)
    step = plan.step()
    markers = Markers.require(step)
    if force:
        markers.clear(step.indices())
    spatial = plan.image.spatial_shape
    dims = list(plan.image.spatial_axes)
    previous = root.get(plan.labels_path)
    previous_key = attributes(previous).get("segflow", {}).get("key") if previous else None
    if previous_key != plan.key:
        remove_stale_outputs(plan, root)
        root = open_group(plan.out_url, "r+")  # its metadata changed
    labels_group = root.require_group(LABELS_GROUP)
    add_label(labels_group, plan.params.labels_name)
    source = "../../" if same_store else plan.image.url
    lgroup = labels_group.require_group(plan.params.labels_name)
    lgroup.attrs.update(_label_metadata(plan, source))
    _require_array(lgroup, "0", spatial, plan.chunks, label_dtype(plan.config.n_classes), dims)
    if plan.params.probabilities:
        pgroup = root.require_group(PROBABILITIES_GROUP)
        pgroup.attrs.update(
            {
                "ome": image_ome(
                    Multiscale.build(
                        "c" + plan.image.spatial_axes,
                        (1.0, *plan.image.spatial_scale),
                        unit=plan.image.unit,
                        name="probabilities",
                    )
                ),
                "segflow": {
                    "classes": list(plan.class_names),
                    "key": plan.key,
                    "from": plan.params.labels_name,
                    "complete": False,
                },
            }
        )
        _require_array(
            pgroup,
            "0",
            (plan.config.n_classes, *spatial),
            (plan.config.n_classes, *plan.chunks),
            np.dtype(plan.params.probabilities_dtype),
            ["c", *dims],
        )
    return markers


def remove_stale_outputs(plan: SegmentPlan, root: zarr.Group) -> list[str]:
    """Remove what an earlier run of these labels with another key left: instances
    derived from them (and their object tables) and probabilities. Returns their paths."""
    from tasks.stitch import table_paths

    removed: list[str] = []
    name = plan.params.labels_name
    labels_group = root.get(LABELS_GROUP)
    if isinstance(labels_group, zarr.Group):
        for child in label_names(labels_group):
            node = labels_group.get(child)
            meta = attributes(node).get("segflow", {}) if node is not None else {}
            if child != name and meta.get("from") == name:
                remove_label(labels_group, child)
                removed.append(f"{LABELS_GROUP}/{child}")
                for path in table_paths(plan.out_url, child):
                    fs = filesystem(path)
                    if fs.exists(path):
                        fs.rm(path)
        if name in labels_group:
            set_complete(plan.out_url, f"{LABELS_GROUP}/{name}", False, key=plan.key)
    probs = root.get(PROBABILITIES_GROUP)
    if probs is not None and attributes(probs).get("segflow", {}).get("from", name) == name:
        del root[PROBABILITIES_GROUP]
        removed.append(PROBABILITIES_GROUP)
    if removed:
        log.info("%s: removed outputs of an earlier run: %s", plan.out_url, ", ".join(removed))
    return removed


def _require_array(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    chunks: Sequence[int],
    dtype: np.dtype,
    dims: list[str],
) -> zarr.Array:
    existing = group.get(name)
    if (
        isinstance(existing, zarr.Array)
        and tuple(existing.shape) == tuple(shape)
        and tuple(existing.chunks) == tuple(chunks)
        and existing.dtype == dtype
    ):
        return existing
    # Markers hold the run key, so blocks of a recreated array are recomputed only if the
    # key changed too; a changed shape, chunking or dtype always comes with a new key.
    return group.create_array(
        name,
        shape=tuple(shape),
        chunks=tuple(chunks),
        dtype=dtype,
        fill_value=0,
        compressors=compressors(),
        dimension_names=dims,
        overwrite=True,
    )


def finalize_outputs(plan: SegmentPlan, runner: Runner | None = None) -> bool:
    """Once every block is done: pyramid levels like the image's, then mark complete.

    Returns whether the labels are complete."""
    markers = Markers.open(plan.out_url, plan.done_step)
    if markers is None or markers.grid != plan.grid or not markers.all_done(plan.key):
        return False
    from tasks.pyramid import write_label_levels

    write_label_levels(plan.out_url, plan.params.labels_name, plan.image.url, plan.key, runner)
    set_complete(plan.out_url, plan.labels_path, True, key=plan.key)
    if plan.params.probabilities:
        set_complete(plan.out_url, PROBABILITIES_GROUP, True, key=plan.key)
    return True


# ------------------------------------------------------------------------ block work

_predictors: dict[tuple[Any, ...], Predictor] = {}
#: How many times this process loaded a checkpoint (observability: once per worker).
model_loads = 0
_predictors_lock = threading.Lock()
_device_locks: dict[str, threading.Lock] = {}


def get_predictor(plan: SegmentPlan) -> Predictor:
    """The worker's predictor for this checkpoint (loaded once per process)."""
    configure()  # this process's CPU settings, before its first model load
    p = plan.params
    key = (plan.model_path, plan.model_digest, p.device, p.batch_size, p.precision, p.mode)
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
                mode=p.mode,
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
    normalised with the global statistics (non-finite voxels become 0, see
    :func:`unet_core.normalize.apply_affine`). A missing or undecodable chunk is named."""
    arr = StrictArray(open_level(plan.image), plan.image.url, "0")
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
    labels_arr = every_chunk(get_array(root, f"{plan.labels_path}/0", plan.out_url))
    labels_arr[block.write.to_slices()] = labels
    if plan.params.probabilities:
        probs = softmax(logits).astype(plan.params.probabilities_dtype)
        probs_arr = every_chunk(get_array(root, f"{PROBABILITIES_GROUP}/0", plan.out_url))
        probs_arr[(slice(None), *block.write.to_slices())] = probs
    return counts, (t0, t1, t2)


def segment_block(plan: SegmentPlan, index: Sequence[int]) -> dict[str, Any]:
    """Compute and write one block; returns per-class voxel counts and timings.

    The runner marks the block done after this returns (its writes are stored)."""
    block = plan.block(index)
    if _fault_hook is not None:
        _fault_hook(plan, block)
    predictor = get_predictor(plan)
    read, tiles = plan.tiles(block.write)
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


def segment_image(
    src: str,
    model_path: str,
    out: str | None = None,
    params: SegmentParams | None = None,
    client: Any = None,
    dask_address: str | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    block_shape: Sequence[int] | None = None,
    plan: SegmentPlan | None = None,
    lease_wait_s: float = 0.0,
    cluster: ClusterSpec | None = None,
) -> SegmentResult:
    """Segment ``src`` (an OME-Zarr image) with the checkpoint at ``model_path``.

    Writes ``labels/<labels_name>/0`` (and ``probabilities/0`` when asked) into ``out``
    (default: into ``src``). Blocks already done under the same run key (image, model,
    effective parameters) are skipped unless ``force``. The run holds the output store's
    lease (waiting up to ``lease_wait_s`` for another run). Uses ``client``, else a client
    of ``dask_address``, else the ``cluster`` (default: an in-process cluster; see
    :mod:`tasks.cluster`). ``progress`` receives a :class:`tasks.blockwise.Progress` per
    block.
    """
    t0 = time.perf_counter()
    plan = plan or plan_segmentation(src, model_path, out, params, block_shape)
    with Lease(plan.out_url, "segment", wait_s=lease_wait_s) as lease:
        prepare_outputs(plan, force=force)
        with dask_client(client, dask_address, cluster=cluster, device=plan.params.device) as c:
            runner = Runner(c, progress=progress)
            result = runner.run(plan.step())
            lease.check()
            complete = finalize_outputs(plan, runner)
    log.info(
        "%s: %d blocks (%d computed, %d already done), block %s, tile %s, chunks %s",
        plan.image.url,
        plan.n_blocks,
        result.computed,
        result.skipped,
        plan.block_shape,
        plan.tile,
        plan.chunks,
    )
    counts = np.zeros(plan.config.n_classes, dtype=np.int64)
    for r in result.results:
        counts += np.asarray(r["counts"])
    return SegmentResult(
        out_url=plan.out_url,
        labels_path=plan.labels_path,
        probabilities_path=f"{PROBABILITIES_GROUP}/0" if plan.params.probabilities else None,
        blocks_total=plan.n_blocks,
        blocks_computed=result.computed,
        blocks_skipped=result.skipped,
        voxels=sum(int(r["voxels"]) for r in result.results),
        seconds=time.perf_counter() - t0,
        compute_seconds=result.seconds,
        class_voxels=(
            {n: int(c) for n, c in zip(plan.class_names, counts, strict=True)}
            if result.computed == plan.n_blocks
            else {}
        ),
        complete=complete,
    )
