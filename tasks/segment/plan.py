"""Planning a segmentation: parameters, the run key, the block plan and input checks.

Everything here reads metadata only (the image's, the checkpoint's header); nothing is
written. A :class:`SegmentPlan` holds descriptors (URLs, boxes, numbers), cheap to ship
to the Dask workers, and computes each block's read and write boxes on demand.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zarr

from tasks.options import SegmentParams
from tasks.runstate import image_digest
from tasks.store import (
    LABELS_GROUP,
    ImageInfo,
    open_level,
    read_image_info,
    read_region,
)
from unet_core.checkpoint import read_checkpoint_header
from unet_core.config import UNetConfig
from unet_core.errors import ConfigError, InvalidVolumeError, opt
from unet_core.geometry import Block, Box, ChunkGrid, Tile, TileSpec, plan_tiles
from unet_core.lattice import TileLattice, plan_lattice
from unet_core.normalize import (
    NONFINITE_VALUE,
    NORMALIZE_REVISION,
    IntensityStats,
    StatsAccumulator,
)
from unet_core.numerics import INVARIANT_REVISION
from unet_core.predict import effective_batch_size
from unet_core.slicelink import DEFAULT_LINK_IOU

log = logging.getLogger(__name__)


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
    def blocks(self) -> ChunkGrid:
        """The image cut into blocks (the one block grid, :class:`ChunkGrid`)."""
        return ChunkGrid(self.image.spatial_shape, self.block_shape)

    @property
    def grid(self) -> tuple[int, ...]:
        """Blocks per axis."""
        return tuple(int(n) for n in self.blocks.grid)

    @property
    def n_blocks(self) -> int:
        return self.blocks.n_blocks

    def indices(self) -> list[tuple[int, ...]]:
        return [tuple(int(i) for i in idx) for idx in self.blocks.indices()]

    def block(self, index: Sequence[int]) -> Block:
        """The block at a grid index (computed, not stored: plans stay small)."""
        index = tuple(int(i) for i in index)
        try:
            write = self.blocks.box(index)
        except IndexError:
            raise ConfigError(
                f"block index {index} is outside the block grid {self.grid}"
            ) from None
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

    @functools.cached_property
    def reads_overlap(self) -> bool:
        """Whether a block reads voxels of its neighbours (the network's context reaches
        across a block border), so that neighbouring blocks read some chunks in common."""
        first = self.block((0,) * len(self.grid))
        return any(
            g > 1 and r > w
            for g, r, w in zip(self.grid, first.read.shape, first.write.shape, strict=True)
        )

    @property
    def batch_size(self) -> int:
        """Tiles per forward pass (see :func:`unet_core.predict.effective_batch_size`)."""
        return effective_batch_size(self.config.ndim, self.params.mode, self.params.batch_size)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.image.spatial_shape))

    def write_box(self, index: Sequence[int]) -> Box:
        return self.block(index).write


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
            f"{config.in_channels} (select one with {opt('channel')})"
        )


def fit_shapes(
    config: UNetConfig, info: ImageInfo, params: SegmentParams
) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    """Output chunks (given or the image's) and the tile bound per spatial axis of the image.

    For a 2D model on a stack the tile may be given in-plane (``Y,X``): it means
    ``1,Y,X``, the slices the model sees. Chunks larger than the image are the image's
    size along that axis, and a tile never asks for more than the image and the network's
    context on both sides (a chunk of 9999³ must not allocate 931 GiB)."""
    spatial = info.spatial_shape
    n = len(spatial)
    chunks = tuple(params.chunks or info.chunks[-n:])
    if len(chunks) != n or any(c < 1 for c in chunks):
        raise ConfigError(
            f"chunks {chunks} do not fit the image's {n} spatial axes ({info.spatial_axes})"
        )
    chunks = tuple(min(c, s) for c, s in zip(chunks, spatial, strict=True))
    tile = params.tile
    if tile is not None and config.ndim == 2 and n == 3 and len(tile) == 2:
        tile = (1, *tile)
    if tile is not None and len(tile) != n:
        plane = " or, for this 2D model, the in-plane Y,X" if config.ndim == 2 and n == 3 else ""
        raise ConfigError(
            f"tile {tile} does not fit the image's {n} spatial axes: give "
            f"{','.join(info.spatial_axes.upper())}{plane}"
        )
    if tile is not None:
        reach = 2 * config.context + 2 * config.grid
        tile = tuple(
            min(t, s + reach) if a >= n - config.ndim else min(t, s)
            for a, (t, s) in enumerate(zip(tile, spatial, strict=True))
        )
    return chunks, tile


def source_info(
    src: str, axes: str | None = None, voxel_size: Sequence[float] | None = None
) -> ImageInfo:
    """What the engine needs of SRC before anything is written: an OME-Zarr image's
    metadata, or a TIFF source's axes and shape (its header only, read with ``axes`` and
    ``voxel_size`` as an ingest would; not yet ingested)."""
    from tasks.store import is_tiff_source

    if not is_tiff_source(src):
        return read_image_info(src)
    from tasks.tiff import open_source

    source = open_source(src, axes, voxel_size)
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
        numerics = {
            "tile": list(tile),
            "batch": batch,
            "device": params.device,
            "revision": INVARIANT_REVISION,
            "torch": torch.__version__,  # oneDNN and cuDNN come with it
        }
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
    out_url = str(out or src).rstrip("/") or "/"
    digest = image_digest(info.url)
    effective = {
        **params.output_fields(),
        "chunks": list(chunks),
        "tile": list(tile),
        "channel": None if info.n_channels == 1 else params.channel,
        "normalize": NORMALIZE_REVISION,  # the arithmetic that maps intensities (clip too)
    }
    if numerics is not None:  # what fixes the bits in the invariant mode
        effective["numerics"] = numerics
    return SegmentPlan(
        image=info,
        model_path=str(model_path),
        model_digest=meta.identity,
        config=config,
        out_url=out_url,
        params=params,
        block_shape=blocks_shape,
        chunks=chunks,
        tile=tile,
        offset=offset,
        scale=scale,
        key=segment_key(digest, meta.identity, effective, stats),
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
