"""The block worker: read one block, run it through the model, write its outputs.

Data path of one block (see :mod:`unet_core.geometry` for the drawing)::

    zarr image ──read block.read (mirror only outside the volume)──▶ normalise (global stats)
      ──▶ tiles through the model (batched) ──▶ keep usable centres ──▶ logits of block.write
      ──▶ argmax → labels/<name>/0[block.write]   softmax → probabilities/0[:, block.write]

The runner marks the block done in segflow-done/segment-<name> after it returns. The model
is loaded once per worker process (cached by checkpoint digest), never per block; image
chunks that neighbouring blocks share are kept decoded (:data:`image_chunks`). A
forward pass holds a per-device lock so that, while one block computes, the other Dask
threads read, normalise and write the next ones. Functions shipped to the workers stay
module-level (pickled by module path).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from tasks.blockwise import current_fence
from tasks.lease import Fence
from tasks.reads import ChunkCache, StrictArray
from tasks.store import PROBABILITIES_GROUP, every_chunk, get_array, is_remote, open_group
from unet_core.checkpoint import load_checkpoint
from unet_core.errors import ConfigError
from unet_core.geometry import Block, Box, Tile
from unet_core.mirror import read_mirrored
from unet_core.normalize import apply_affine
from unet_core.predict import Predictor, class_labels, softmax
from unet_core.runtime import configure

if TYPE_CHECKING:
    from tasks.segment.plan import SegmentPlan

log = logging.getLogger(__name__)


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
            if meta.identity != plan.model_digest:
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


#: Decoded image chunks of this process's blocks (see :class:`tasks.reads.ChunkCache`).
image_chunks = ChunkCache()

_arrays: dict[tuple[str, str, str], zarr.Array] = {}
_ARRAYS_KEPT = 16


def run_array(plan: SegmentPlan, url: str, path: str, write: bool = False) -> zarr.Array:
    """An array of this run, opened once per worker process and run (keyed by the run key:
    the same key means the same image, outputs and their layout). Opening a group and
    its array read their metadata, a few percent of a block's time. Before a write the
    local output store is checked to be still there, so that a store deleted during the
    run fails its blocks by name instead of being half re-created."""
    key = (plan.key, url, path)
    with _predictors_lock:
        arr = _arrays.get(key)
    if arr is not None and write and not is_remote(url) and not os.path.exists(url):
        arr = None
    if arr is None:
        arr = get_array(open_group(url, "r+" if write else "r"), path, url)
        if write:
            arr = every_chunk(arr)
        with _predictors_lock:
            while len(_arrays) >= _ARRAYS_KEPT:
                _arrays.pop(next(iter(_arrays)))
            _arrays[key] = arr
    return arr


def read_block_input(plan: SegmentPlan, read: Box) -> np.ndarray:
    """(C, *read.shape) float32: the read box, mirror-extended at the volume border only,
    normalised with the global statistics (non-finite voxels become 0, see
    :func:`unet_core.normalize.apply_affine`). A missing or undecodable chunk is named."""
    cache = image_chunks if plan.reads_overlap else None
    arr = StrictArray(run_array(plan, plan.image.url, "0"), plan.image.url, "0", cache, plan.key)
    if cache is not None:
        # Room for the chunks of two blocks' reads: the next block (in C order, or on the
        # other thread beside a GPU) finds the chunks it shares with this one decoded.
        channels = () if plan.image.channel_axis is None else (plan.image.n_channels,)
        cache.reserve(2 * arr.chunk_set_bytes((*channels, *read.shape)))
    c_axis = plan.image.channel_axis
    leading = 0 if c_axis is None else 1
    data = read_mirrored(arr, read, plan.image.spatial_shape, leading, dtype=np.float32)
    if c_axis is None:
        data = data[None]
    elif plan.params.channel is not None:
        data = data[plan.params.channel : plan.params.channel + 1]
    return apply_affine(data, plan.offset, plan.scale, in_place=True, source_dtype=arr.dtype)


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
    fence: Fence | None = None,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read, predict and write one block; ``lock`` guards only the forward passes; the
    ``fence`` (the run's lease) is checked right before the writes."""
    t0 = time.perf_counter()
    data = read_block_input(plan, read)
    t1 = time.perf_counter()
    with lock or contextlib.nullcontext():
        logits = predictor.logits(data, read, tiles, block.write)
    t2 = time.perf_counter()
    del data
    labels, counts = class_labels(logits)
    if fence is not None:
        fence.check()  # the forward passes took long: is this still the run that writes?
    labels_arr = run_array(plan, plan.out_url, f"{plan.labels_path}/0", write=True)
    labels_arr[block.write.to_slices()] = labels
    if plan.params.probabilities:
        probs = softmax(logits).astype(plan.params.probabilities_dtype)
        probs_arr = run_array(plan, plan.out_url, f"{PROBABILITIES_GROUP}/0", write=True)
        probs_arr[(slice(None), *block.write.to_slices())] = probs
    return counts, (t0, t1, t2)


def segment_block(plan: SegmentPlan, index: Sequence[int]) -> dict[str, Any]:
    """Compute and write one block; returns per-class voxel counts and timings.

    The runner marks the block done after this returns (its writes are stored)."""
    block = plan.block(index)
    predictor = get_predictor(plan)
    read, tiles = plan.tiles(block.write)
    fence = current_fence()
    if read != block.read:
        raise ConfigError(f"block {block.index}: planned read box {block.read} != {read}")
    if predictor.device.type == "cpu":
        # The forward pass already uses every core. Reads and writes of other blocks beside
        # it stall its parallel loops, and a different calling thread each time means a
        # different OpenMP team: measured 10-25% slower than one block at a time on one
        # thread. So CPU blocks run whole (read -> compute -> write) on one thread per process.
        counts, (t0, t1, t2) = (
            _cpu_thread()
            .submit(_compute_block, plan, predictor, read, tiles, block, None, fence)
            .result()
        )
    else:
        # On a GPU only the compute holds the device; reads and writes of the next blocks
        # overlap it.
        counts, (t0, t1, t2) = _compute_block(
            plan, predictor, read, tiles, block, _device_locks[str(predictor.device)], fence
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
