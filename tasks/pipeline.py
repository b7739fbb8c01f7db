"""The one pipeline: a volume goes ingest -> segment -> instances -> outputs and report.

Every front door runs it: ``segflow segment`` and ``segflow predict`` call :func:`run`; the
``segment-volume`` flow wraps the same steps as Prefect tasks (its regions are how it runs
the blocks, :func:`segment` takes them as ``run_blocks``). Nothing else assembles these
steps, so the guarantees live here once::

    Request(source, model, out, options)          one options object (tasks.options)
      │
      ├─ check      everything, before anything is written: device, checkpoint, that the
      │             model fits the image, option conflicts, and every target through the
      │             output policy (tasks.outputs): the image store, the output store, the
      │             files beside it (tables, preview, labels TIFF)
      ├─ ingest     a TIFF source into its store (resumed; again if the TIFF changed)
      ├─ plan       blocks, tiles, normalisation and the run key (metadata only)
      ├─ segment    under the output store's fenced lease: prepare the arrays, run the
      │             blocks (run_blocks), finalize; not complete -> IncompleteError
      ├─ instances  objects across chunks (tasks.instances), when asked
      └─ outputs    the labels TIFF beside the store (predict) and the preview

Where the image and the outputs go:

- an OME-Zarr source: labels into the source's store, or into ``out`` (a store);
- a TIFF source: ingested into ``ingest_to`` (predict: OUT/<name>.ome.zarr), else ``out``,
  else a store beside the TIFF; labels into that store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from tasks.blockwise import ProgressFn, Runner
from tasks.cluster import ClusterSpec, dask_client
from tasks.options import InstanceOptions, PipelineOptions
from tasks.outputs import (
    FileKind,
    RunInputs,
    canonical,
    check_file_target,
    check_store_target,
    store_record,
)
from tasks.paths import beside_store, special_file, store_beside, table_paths
from tasks.segment.driver import ensure_complete, run_segmentation
from tasks.segment.plan import (
    SegmentPlan,
    SegmentResult,
    check_model_fits,
    fit_shapes,
    plan_segmentation,
    source_info,
)
from tasks.store import is_tiff_source
from unet_core.errors import ConfigError, StoreConflictError, VolumeNotFoundError, opt

log = logging.getLogger(__name__)

#: The name of the instance labels a run writes beside its semantic labels.
INSTANCES = "instances"
#: What ``predict`` writes beside each store: the labels as an OME-TIFF.
LABELS_TIFF = "labels.ome.tif"


@dataclass(frozen=True)
class Request:
    """One run: what to segment, with which model, where the outputs go, and how."""

    source: str
    model: str
    out: str | None = None
    options: PipelineOptions = field(default_factory=PipelineOptions)
    #: where a TIFF source is ingested (default: ``out``, else beside the TIFF)
    ingest_to: str | None = None
    #: also write the labels as an OME-TIFF beside the output store (``predict``)
    export_tiff: bool = False

    @property
    def tiff(self) -> bool:
        return is_tiff_source(self.source)

    @property
    def image_store(self) -> str:
        """The OME-Zarr image the network reads (the source, or its ingest)."""
        if not self.tiff:
            return str(self.source).rstrip("/") or "/"
        return str(self.ingest_to or self.out or store_beside(self.source)).rstrip("/") or "/"

    @property
    def out_store(self) -> str:
        """The store the labels go into."""
        if self.tiff or not self.out:
            return self.image_store
        return str(self.out).rstrip("/") or "/"

    @property
    def shown_labels(self) -> str:
        """The labels the preview and the TIFF show: the instances when asked for."""
        return INSTANCES if self.options.instances else self.options.labels_name

    @property
    def labels_tiff(self) -> str | None:
        return beside_store(self.out_store, LABELS_TIFF) if self.export_tiff else None

    @property
    def preview_file(self) -> str | None:
        from tasks.preview import preview_path

        return preview_path(self.out_store) if self.options.preview else None

    def files(self) -> list[tuple[str, FileKind]]:
        """The files this run writes beside its output store (owned by it)."""
        found: list[tuple[str, FileKind]] = []
        if self.options.instances:
            found += [(p, "beside") for p in table_paths(self.out_store, INSTANCES)]
        for path in (self.preview_file, self.labels_tiff):
            if path is not None:
                found.append((path, "beside"))
        return found


@dataclass
class Result:
    """What a run made."""

    request: Request
    image: str
    segment: SegmentResult
    plan: SegmentPlan
    instances: dict[str, Any] | None = None
    labels_tiff: str | None = None
    labels_tiff_reused: bool = False
    preview: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def reused(self) -> bool:
        """Nothing was recomputed or rewritten (every step found its work done)."""
        return (
            self.segment.blocks_computed == 0
            and (self.instances is None or bool(self.instances["reused"]))
            and (self.labels_tiff is None or self.labels_tiff_reused)
        )


# -------------------------------------------------------------------------- check


def check(request: Request, local: bool = True) -> None:
    """Every input and every target of ``request``, before anything is ingested or written.

    ``local``: the model runs on this machine (else CUDA is not looked for here). Each
    problem is one sentence (a :class:`unet_core.errors.SegflowError`); option names in it
    are fields (:func:`unet_core.errors.opt`) that each door names in its own words."""
    from unet_core.checkpoint import read_checkpoint_header
    from unet_core.devices import check_device

    options = request.options
    check_device(options.device, indexed=False, here=local)
    config, _ = read_checkpoint_header(request.model)
    special = special_file(request.source)
    if special is not None:
        raise VolumeNotFoundError(f"{request.source}: is {special}, not an image file or store")
    info = source_info(request.source, options.axes, options.voxel_size)
    check_model_fits(info, config, str(request.model), options.channel)
    fit_shapes(config, info, options.engine())
    if options.instances and options.labels_name == INSTANCES:
        raise ConfigError(
            f"{opt('labels_name')} '{INSTANCES}' is where {opt('instances')} go; name the "
            "semantic labels otherwise"
        )
    inputs = RunInputs.of(request.source, request.model)
    hint = (
        "choose a new or empty location"
        if request.out or request.ingest_to
        else f"pass {opt('out')} to write the labels to a new store"
    )
    if request.tiff:
        check_store_target(
            request.image_store, inputs, image=request.image_store, hint=hint,
            lease_wait_s=options.lease_wait_s,
        )  # fmt: skip
        record = store_record(request.image_store)
        ingested = record.source_location if record is not None else None
        if ingested and canonical(ingested) != canonical(request.source):
            raise StoreConflictError(
                f"{request.image_store}: holds the image ingested from {ingested}; a run of "
                f"{request.source} never replaces another image, not even with "
                f"{opt('overwrite')} (choose another location, or replace it with "
                "segflow ingest --overwrite)"
            )
    check_store_target(
        request.out_store, inputs, image=request.image_store, hint=hint,
        lease_wait_s=options.lease_wait_s,
    )  # fmt: skip
    for path, kind in request.files():
        check_file_target(path, kind, inputs, owner=request.out_store, option="overwrite")


# ------------------------------------------------------------------------- steps


def ingest(
    request: Request, scheduler: Any = None, progress: ProgressFn | None = None, levels: int = 0
) -> str:
    """The image store the network reads: a TIFF source ingested (resumed, and again in
    place when the TIFF changed since), an OME-Zarr source as it is."""
    if not request.tiff:
        return request.image_store
    from tasks.ingest import ingest_volume

    info = ingest_volume(
        request.source,
        request.image_store,
        axes=request.options.axes,
        voxel_size=request.options.voxel_size,
        overwrite=request.options.overwrite,
        refresh=True,
        levels=levels,
        scheduler=scheduler,
        progress=progress,
        lease_wait_s=request.options.lease_wait_s,
    )
    return str(info.url)


def plan(request: Request, image: str) -> SegmentPlan:
    """The segmentation's plan (metadata only): blocks, tiles, normalisation, run key."""
    out = None if request.out_store == image.rstrip("/") else request.out_store
    return plan_segmentation(image, request.model, out, request.options.engine())


#: The segmentation step: under the output store's fenced lease, prepare the outputs, run
#: the blocks with a door's ``run_blocks`` (the CLI: a :class:`Runner`; the flow: its region
#: tasks), finalize; the result says whether the labels are complete (:func:`ensure_complete`).
segment = run_segmentation


def instances(
    store: str,
    labels: str,
    options: InstanceOptions,
    *,
    client: Any = None,
    cluster: ClusterSpec | None = None,
    progress: ProgressFn | None = None,
    foreground: int | None = None,
    name: str = INSTANCES,
    lease_wait_s: float = 0.0,
) -> dict[str, Any]:
    """Objects of ``labels`` across chunks (:func:`tasks.instances.stitch`), as a summary."""
    from tasks.instances import stitch

    result = stitch(
        store,
        labels=labels,
        out_name=name,
        foreground=None if foreground is None else (foreground,),
        connectivity=options.connectivity,
        min_size=options.min_size,
        cluster=cluster,
        client=client,
        method=None if options.instance_method == "auto" else options.instance_method,
        link_iou=options.link_iou,
        progress=progress,
        lease_wait_s=lease_wait_s,
    )
    table = result.table
    return {
        "instances": f"{result.store}/{result.labels_path}",
        "method": result.method,
        "objects": result.objects,
        "dtype": result.dtype,
        "table_csv": result.table_csv,
        "table_parquet": result.table_parquet,
        "min_size": result.min_size,
        "min_size_unit": result.min_size_unit,
        "min_size_from": result.min_size_from,
        "removed": result.removed,
        "seconds": round(result.seconds, 3),
        "reused": result.reused,
        "table": table,
    }


def export_labels(request: Request) -> tuple[str, bool] | None:
    """The labels TIFF beside the output store, when asked: (path, reused)."""
    path = request.labels_tiff
    if path is None:
        return None
    from tasks.export import export_labels_once

    reused = export_labels_once(request.out_store, path, request.shown_labels)
    return path, reused


def preview(request: Request, image: str) -> tuple[str | None, str | None]:
    """The preview PNG beside the output store, when asked: (path, None), or (None, the
    reason it could not be made): a preview never fails a finished run."""
    if request.preview_file is None:
        return None, None
    from tasks.preview import write_preview
    from tasks.storage_errors import translate_storage_error

    try:
        return write_preview(image, request.out_store, request.shown_labels), None
    except Exception as exc:
        err = translate_storage_error(exc, request.out_store)
        return None, f"no preview: {err if err is not None else exc}"


# ----------------------------------------------------------------------- the whole


def run(
    request: Request,
    *,
    client: Any = None,
    cluster: ClusterSpec | None = None,
    progress: ProgressFn | None = None,
    checked: bool = False,
) -> Result:
    """The whole pipeline for one request on one Dask client (``client``, else one for
    ``cluster``, else a local one). Raises :class:`IncompleteError` when the labels are
    not complete at the end; ``checked``: :func:`check` ran already."""
    local = cluster is None or cluster.kind == "local"
    if not checked:
        check(request, local=local)
    image = ingest(request, progress=progress)
    segment_plan = plan(request, image)
    options = request.options
    with dask_client(client, cluster=cluster, device=segment_plan.params.device) as c:
        runner = Runner(c, progress=progress)
        result = segment(
            segment_plan,
            runner.run,
            force=options.force,
            lease_wait_s=options.lease_wait_s,
            runner=runner,
        )
        ensure_complete(result)
        found = None
        if options.instances:
            found = instances(
                result.out_url,
                options.labels_name,
                options,
                client=c,
                progress=progress,
                lease_wait_s=options.lease_wait_s,
            )
    out = Result(request=request, image=image, segment=result, plan=segment_plan, instances=found)
    exported = export_labels(request)
    if exported is not None:
        out.labels_tiff, out.labels_tiff_reused = exported
    out.preview, warning = preview(request, image)
    if warning:
        out.warnings.append(warning)
    return out


__all__ = [
    "INSTANCES",
    "LABELS_TIFF",
    "Request",
    "Result",
    "check",
    "ensure_complete",
    "export_labels",
    "ingest",
    "instances",
    "plan",
    "preview",
    "run",
    "segment",
]
