"""Objects across chunks: the instance step of the pipeline.

- :mod:`tasks.instances.components`: connected components chunk by chunk, merged across
  faces (label, faces and relabel passes; the object table);
- :mod:`tasks.instances.slices`: for a stack segmented slice by slice, 2D objects linked
  across slices by overlap (its own tables pass, then the same union and relabel);
- :func:`stitch` (here): either method as one step under the store's lease, reusing an
  earlier result under the same key, with the object table beside the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from tasks.blockwise import ProgressFn, Runner
from tasks.cluster import ClusterSpec
from tasks.instances.components import (
    SCRATCH,
    FacePlan,
    RelabelPlan,
    StitchPlan,
    StitchResult,
    _finish_instances,
    _image_url,
    _object_table,
    _prepare_instances,
    _union,
    face_block,
    id_dtype,
    label_chunk,
    plan_stitch,
    relabel_block,
    without_dropped,
    write_object_table,
)
from tasks.instances.slices import (
    default_method,
    links_between_slices,
    plan_link,
    slice_tables,
)
from tasks.lease import Lease
from tasks.ngff import compressors
from tasks.outputs import RunInputs, check_files, owns_file
from tasks.paths import table_paths
from tasks.records import OutputRecord
from tasks.runstate import set_complete
from tasks.store import LABELS_GROUP, filesystem, get_array, open_group
from unet_core.errors import ConfigError
from unet_core.slicelink import LinkParams

log = logging.getLogger(__name__)


def stitch(
    store: str,
    labels: str = "semantic",
    out_name: str = "instances",
    foreground: Sequence[int] | None = None,
    connectivity: int = 1,
    min_size: int | None = None,
    client: Any = None,
    write_table: bool = True,
    progress: ProgressFn | None = None,
    id_offset: int = 0,
    force: bool = False,
    lease_wait_s: float = 0.0,
    method: str | None = None,
    link_iou: float | None = None,
    link_params: Any = None,
    cluster: ClusterSpec | None = None,
) -> StitchResult:
    """Instance labels ``labels/<out_name>/0`` and an object table from a semantic mask.

    Ids are consecutive from ``id_offset + 1`` (an offset keeps ids unique across volumes),
    also after objects under ``min_size`` are removed (their voxels become 0). ``min_size``
    counts an object's voxels (pixels of a 2D image); default: the suggestion of the model
    that made the labels, in those units (:func:`tasks.instances.components.labels_min_size`:
    a 2D model's training areas are converted to voxels for a stack).
    The semantic labels must be complete. Instances already complete under the same key
    (semantic labels' key and these parameters) are reused unless ``force``.
    ``method``: ``components`` (3D connected components) or ``slices`` (slice objects
    linked by overlap, :mod:`tasks.instances.slices`, with ``link_iou``); default ``slices``
    for a stack segmented by a 2D model, else ``components``; ``link_params`` (a
    :class:`unet_core.slicelink.LinkParams`) sets the slice linking's thresholds.
    """
    from tasks.cluster import dask_client

    method = method or default_method(store, labels)
    if method not in ("components", "slices"):
        raise ConfigError(f"instance method '{method}' is not 'components' or 'slices'")
    t0 = time.perf_counter()
    link_plan = None
    if method == "slices":
        link_plan = plan_link(
            store,
            labels,
            out_name,
            foreground,
            connectivity,
            min_size,
            link_iou,
            id_offset,
            link_params,
        )
        plan = link_plan.stitch
    else:
        plan = plan_stitch(store, labels, out_name, foreground, connectivity, min_size, id_offset)
    if not force:
        reused = _reuse(plan, write_table)
        if reused is not None:
            return reused
    if write_table:  # the table files beside the store: absent or the store's own
        check_files(
            ((path, "beside") for path in table_paths(plan.store, plan.out_name)),
            RunInputs(),
            owner=plan.store,
        )
    with Lease(plan.store, "stitch", wait_s=lease_wait_s) as lease:
        root = open_group(plan.store, "r+")
        if f"{LABELS_GROUP}/{plan.out_name}" in root:
            set_complete(plan.store, f"{LABELS_GROUP}/{plan.out_name}", False)
        root.require_group(SCRATCH).create_array(
            plan.scratch_path.split("/", 1)[1],
            shape=plan.shape,
            chunks=plan.chunks,
            dtype="uint32",
            fill_value=0,
            compressors=compressors(level=1),
            overwrite=True,
        )
        with dask_client(client, cluster=cluster) as c:
            runner = Runner(c, progress=progress)
            # Pass 1: local labels.
            results = runner.run(plan.step("label", label_chunk, plan, plan.grid)).results
            n = np.zeros(plan.grid, dtype=np.int64)
            sums: dict[tuple[int, ...], dict[str, np.ndarray]] = {}
            for r in results:
                n[tuple(r["index"])] = r["n"]
                sums[tuple(r["index"])] = r["objects"]
            offsets = (np.cumsum(n.reshape(-1)) - n.reshape(-1)).reshape(plan.grid) + plan.id_offset
            total = int(n.sum()) + plan.id_offset
            # Pass 2: pairs across faces (block = chunk index + axis); slice objects meet
            # only across y and x faces.
            first = 1 if plan.slices else 0
            faces = FacePlan(plan, offsets, first)
            grid = (*plan.grid, len(plan.shape) - first)
            pairs = runner.run(plan.step("faces", face_block, faces, grid)).results
            if link_plan is not None:  # slice objects linked one to one by overlap
                tables = runner.run(plan.step("tables", slice_tables, link_plan, plan.grid))
                links = links_between_slices(
                    tables.results, pairs, offsets, total, plan.id_offset, link_plan.params
                )
                pairs = [*pairs, links]
            merged_ids, merged_final, absorbed = _union(pairs, total)
            n_final = total - absorbed.size
            table = _object_table(plan, sums, offsets, merged_ids, merged_final, absorbed)
            dropped = np.zeros(0, dtype=np.uint64)
            if plan.min_size > 1 and len(table):
                small = table["voxels"] < plan.min_size
                dropped = np.sort(table.loc[small, "id"].to_numpy(dtype=np.uint64))
                table = table.loc[~small].reset_index(drop=True)
                table["id"] = without_dropped(table["id"].to_numpy(dtype=np.uint64), dropped)
            dtype = id_dtype(total)
            _prepare_instances(plan, dtype, labels)
            # Pass 3: relabel, each chunk with only its slice of the sparse tables.
            rp = RelabelPlan(
                plan, offsets, n, merged_ids, merged_final, absorbed, dropped, dtype.name
            )
            runner.run(plan.step("relabel", relabel_block, rp, plan.grid))
            del root[SCRATCH]
            image_url = _image_url(plan, labels)
            if image_url:
                from tasks.pyramid import write_label_levels

                write_label_levels(plan.store, plan.out_name, image_url, plan.key, runner)
        csv_path = parquet_path = None
        lease.check()  # a superseded run neither writes the table nor marks the instances
        if write_table:
            csv_path, parquet_path = write_object_table(plan, table)
        _finish_instances(plan, n_final - dropped.size, len(table), int(dropped.size))
        try:
            lease.check()
        except Exception:
            set_complete(plan.store, f"{LABELS_GROUP}/{plan.out_name}", False)
            raise
        if link_plan is not None:
            set_complete(plan.store, plan.out_path.rsplit("/", 1)[0], True, **link_plan.meta())
    return StitchResult(
        store=plan.store,
        labels_path=plan.out_path,
        objects=len(table),
        dtype=dtype.name,
        table_csv=csv_path,
        table_parquet=parquet_path,
        seconds=time.perf_counter() - t0,
        table=table,
        method=method,
        min_size=plan.min_size,
        min_size_unit=plan.min_size_unit,
        min_size_from=plan.min_size_from,
        removed=int(dropped.size),
    )


def _reuse(plan: StitchPlan, write_table: bool) -> StitchResult | None:
    """The finished result of an earlier stitch under the same key, if there is one."""
    root = open_group(plan.store, "r")
    group = root.get(f"{LABELS_GROUP}/{plan.out_name}")
    if group is None:
        return None
    made = OutputRecord.of(group)
    if not made.complete or made.key != plan.key:
        return None
    csv_path, parquet_path = table_paths(plan.store, plan.out_name)
    table = pd.DataFrame()
    if write_table:
        if not (owns_file(plan.store, parquet_path) and owns_file(plan.store, csv_path)):
            return None  # the table went missing or was changed: stitch again
        fs = filesystem(parquet_path)
        with fs.open(parquet_path, "rb") as f:
            table = pd.read_parquet(f)
    arr = get_array(root, plan.out_path, plan.store)
    log.info("%s: instances are complete under the same key; reused", plan.store)
    return StitchResult(
        store=plan.store,
        labels_path=plan.out_path,
        objects=made.objects if made.objects is not None else len(table),
        dtype=str(arr.dtype),
        table_csv=csv_path if write_table else None,
        table_parquet=parquet_path if write_table else None,
        seconds=0.0,
        table=table,
        reused=True,
        method=made.method or "components",
        min_size=plan.min_size,
        min_size_unit=plan.min_size_unit,
        min_size_from=plan.min_size_from,
        removed=made.removed or 0,
    )


def link_slices(store: str, params: LinkParams | None = None, **kw: Any) -> StitchResult:
    """:func:`stitch` with the ``slices`` method (and ``params``)."""
    return stitch(store, method="slices", link_params=params, **kw)


__all__ = ["StitchPlan", "StitchResult", "id_dtype", "link_slices", "plan_stitch", "stitch"]
