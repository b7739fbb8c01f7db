"""Segment an OME-Zarr image with a U-Net on Dask: one task per block of output chunks.

- :mod:`tasks.segment.plan`: what to compute, from metadata only: :class:`SegmentParams`,
  the run key, :class:`SegmentPlan` (blocks, tiles, normalisation), the input checks run
  before anything is written, and the intensity statistics an image lacks.
- :mod:`tasks.segment.worker`: one block on a Dask worker: read and normalise its input,
  the model's forward passes (the model loaded once per process), write labels and
  probabilities.
- :mod:`tasks.segment.driver`: a whole run: prepare the output arrays (resume or clear
  stale ones), run the blocks through the blockwise runner under the store's lease, then
  the label pyramid and the completion marks.

Blocks are whole multiples of the output chunks, so no two blocks write the same chunk and
no locks are needed. A block is marked done in segflow-done/segment-<name> under the run
key (image, model, effective parameters, statistics), so a re-run computes only the rest.
"""

from __future__ import annotations

from tasks.cluster import dask_client
from tasks.segment.driver import (
    RunBlocks,
    ensure_complete,
    finalize_outputs,
    prepare_outputs,
    remove_stale_outputs,
    run_segmentation,
    segment_image,
    segmentation_step,
)
from tasks.segment.plan import (
    SegmentParams,
    SegmentPlan,
    SegmentResult,
    check_model_fits,
    compute_image_stats,
    default_block_shape,
    fit_shapes,
    plan_segmentation,
    segment_key,
    source_info,
)
from tasks.segment.worker import get_predictor, read_block_input, segment_block

__all__ = [
    "RunBlocks",
    "SegmentParams",
    "SegmentPlan",
    "SegmentResult",
    "check_model_fits",
    "compute_image_stats",
    "dask_client",
    "default_block_shape",
    "ensure_complete",
    "finalize_outputs",
    "fit_shapes",
    "get_predictor",
    "plan_segmentation",
    "prepare_outputs",
    "read_block_input",
    "remove_stale_outputs",
    "run_segmentation",
    "segment_block",
    "segment_image",
    "segment_key",
    "segmentation_step",
    "source_info",
]
