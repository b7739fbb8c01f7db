"""The run driver: create and finish the output arrays, and segment a whole image.

:func:`segment_image` plans (:mod:`tasks.segment.plan`), takes the output store's lease,
prepares the outputs, runs :func:`tasks.segment.worker.segment_block` on every block not
yet done through the blockwise runner, then writes the label pyramid and marks the outputs
complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import zarr

from tasks.blockwise import Markers, ProgressFn, Runner, Step, StepResult
from tasks.cluster import ClusterSpec, dask_client
from tasks.lease import Lease, held_fence
from tasks.ngff import (
    Multiscale,
    add_label,
    compressors,
    image_ome,
    label_names,
    label_ome,
    remove_label,
)
from tasks.outputs import canonical, claim_store, refuse_foreign, remove_owned_file
from tasks.records import KEY, OutputRecord
from tasks.runstate import set_complete
from tasks.segment.plan import SegmentParams, SegmentPlan, SegmentResult, plan_segmentation
from tasks.segment.worker import segment_block
from tasks.store import (
    LABELS_GROUP,
    PROBABILITIES_GROUP,
    open_group,
)
from unet_core.errors import IncompleteError, LeaseLostError, opt
from unet_core.predict import label_dtype

log = logging.getLogger(__name__)


def segmentation_step(plan: SegmentPlan) -> Step:
    """The segmentation of ``plan`` as a step of the blockwise runner."""
    return Step(
        name=plan.done_step,
        store=plan.out_url,
        grid=plan.grid,
        key=plan.key,
        process=segment_block,
        plan=plan,
        box=type(plan).write_box,
        outputs=(plan.labels_path, *((PROBABILITIES_GROUP,) * plan.params.probabilities)),
    )


# ---------------------------------------------------------------------------- outputs


def _label_metadata(plan: SegmentPlan, source: str) -> dict[str, Any]:
    ms = Multiscale.build(
        plan.image.spatial_axes,
        plan.image.spatial_scale,
        unit=plan.image.unit,
        name=plan.params.labels_name,
    )
    record = OutputRecord(
        model_digest=plan.model_digest,
        model=plan.model_path,
        key=plan.key,
        complete=False,
        foreground_class=plan.foreground_class,
        suggested_min_size=plan.suggested_min_size,
        model_ndim=plan.config.ndim,  # 2 on a stack: instances by slice linking
        link_iou=plan.link_iou,
    )
    return {"ome": label_ome(ms, {"image": source}, plan.class_names), KEY: record.dump()}


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
        refuse_foreign(plan.out_url, f"pass {opt('out')} to write the labels to a new store")
        root = open_group(plan.out_url, "r+")
    else:
        root = claim_store(
            plan.out_url, "segmentation outputs", source_image=canonical(plan.image.url)
        )
    step = segmentation_step(plan)
    markers = Markers.require(step)
    if force:
        markers.clear(step.indices())
    spatial = plan.image.spatial_shape
    dims = list(plan.image.spatial_axes)
    previous = root.get(plan.labels_path)
    previous_key = OutputRecord.of(previous).key if previous is not None else None
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
                KEY: OutputRecord(
                    classes=list(plan.class_names),
                    key=plan.key,
                    made_from=plan.params.labels_name,
                    complete=False,
                ).dump(),
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
    from tasks.paths import table_paths

    removed: list[str] = []
    name = plan.params.labels_name
    labels_group = root.get(LABELS_GROUP)
    if isinstance(labels_group, zarr.Group):
        for child in label_names(labels_group):
            node = labels_group.get(child)
            made = OutputRecord.of(node) if node is not None else OutputRecord()
            if child != name and made.made_from == name:
                remove_label(labels_group, child)
                removed.append(f"{LABELS_GROUP}/{child}")
                for path in table_paths(plan.out_url, child):
                    remove_owned_file(plan.out_url, path)  # a user's file there stays
        if name in labels_group:
            set_complete(plan.out_url, f"{LABELS_GROUP}/{name}", False, key=plan.key)
    probs = root.get(PROBABILITIES_GROUP)
    if probs is not None and (OutputRecord.of(probs).made_from or name) == name:
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
    outputs = [plan.labels_path, *([PROBABILITIES_GROUP] * plan.params.probabilities)]
    fence = held_fence(plan.out_url)
    if fence is not None:
        fence.check()  # only the run that holds the lease marks the outputs complete
    for path in outputs:
        set_complete(plan.out_url, path, True, key=plan.key)
    if fence is not None:
        try:
            fence.check()  # taken over while marking: the mark is not this run's to give
        except LeaseLostError:
            for path in outputs:
                set_complete(plan.out_url, path, False)
            raise
    return True


# ------------------------------------------------------------------------ whole runs

#: How a caller runs the blocks of a step: a :class:`Runner`'s ``run``, or the flow's region
#: tasks. Returns a :class:`tasks.blockwise.StepResult` (results: the blocks' dicts).
RunBlocks = Callable[[Step], StepResult]


def run_segmentation(
    plan: SegmentPlan,
    run_blocks: RunBlocks,
    *,
    force: bool = False,
    lease_wait_s: float = 0.0,
    runner: Runner | None = None,
    what: str = "segment",
) -> SegmentResult:
    """The one sequence that writes a segmentation, under the output store's fenced lease:
    prepare the output arrays (resume, or clear stale ones), run the blocks not done under
    the run key (``run_blocks``), check the lease is still this run's, then the label
    pyramid and the completion marks. The result says whether the labels are complete; a
    caller never reports success when they are not (:func:`ensure_complete`)."""
    t0 = time.perf_counter()
    with Lease(plan.out_url, what, wait_s=lease_wait_s) as lease:
        prepare_outputs(plan, force=force)
        done = run_blocks(segmentation_step(plan))
        lease.check()
        complete = finalize_outputs(plan, runner)
    log.info(
        "%s: %d blocks (%d computed, %d already done), block %s, tile %s, chunks %s",
        plan.image.url,
        plan.n_blocks,
        done.computed,
        done.skipped,
        plan.block_shape,
        plan.tile,
        plan.chunks,
    )
    return _result(plan, done, time.perf_counter() - t0, complete)


def _result(plan: SegmentPlan, done: StepResult, seconds: float, complete: bool) -> SegmentResult:
    counts = np.zeros(plan.config.n_classes, dtype=np.int64)
    for r in done.results:
        counts += np.asarray(r["counts"])
    return SegmentResult(
        out_url=plan.out_url,
        labels_path=plan.labels_path,
        probabilities_path=f"{PROBABILITIES_GROUP}/0" if plan.params.probabilities else None,
        blocks_total=plan.n_blocks,
        blocks_computed=done.computed,
        blocks_skipped=done.skipped,
        voxels=sum(int(r["voxels"]) for r in done.results),
        seconds=seconds,
        compute_seconds=done.seconds,
        class_voxels=(
            {n: int(c) for n, c in zip(plan.class_names, counts, strict=True)}
            if done.computed == plan.n_blocks
            else {}
        ),
        complete=complete,
    )


def ensure_complete(result: SegmentResult) -> None:
    """A run whose labels are not complete never ends as a success."""
    if not result.complete:
        raise IncompleteError(
            f"{result.out_url}: the labels at '{result.labels_path}' are not complete after "
            "this run (some blocks failed, or were taken back after the run lost its "
            "lease); run it again to finish them"
        )


def segment_image(
    src: str,
    model_path: str,
    out: str | None = None,
    params: SegmentParams | None = None,
    client: Any = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    block_shape: Sequence[int] | None = None,
    plan: SegmentPlan | None = None,
    lease_wait_s: float = 0.0,
    cluster: ClusterSpec | None = None,
) -> SegmentResult:
    """Segment ``src`` (an OME-Zarr image) with the checkpoint at ``model_path``: the
    segmentation step alone (:func:`run_segmentation` on a :class:`Runner`), for callers
    that compose steps themselves; the whole pipeline is :func:`tasks.pipeline.run`.

    Writes ``labels/<labels_name>/0`` (and ``probabilities/0`` when asked) into ``out``
    (default: into ``src``). Blocks already done under the same run key (image, model,
    effective parameters) are skipped unless ``force``. Uses ``client``, else a client of
    the ``cluster`` (a :class:`ClusterSpec`; a scheduler address is one; default: an
    in-process cluster; see
    :mod:`tasks.cluster`). ``progress`` receives a :class:`tasks.blockwise.Progress` per
    block. Raises :class:`IncompleteError` when the labels are not complete at the end.
    """
    plan = plan or plan_segmentation(src, model_path, out, params, block_shape)
    with dask_client(client, cluster=cluster, device=plan.params.device) as c:
        runner = Runner(c, progress=progress)
        result = run_segmentation(
            plan, runner.run, force=force, lease_wait_s=lease_wait_s, runner=runner
        )
    ensure_complete(result)
    return result
