"""The ``segment-volume`` flow: ingest (TIFF) -> segment regions -> stitch -> report.

Prefect sees regions (groups of blocks), Dask computes the blocks inside a region: each
region task is a Dask client that submits its blocks to the run's cluster (a local cluster
the flow starts, or ``dask_address``). Done markers in the output store make every run,
retried run and retried task skip finished work.
"""

from __future__ import annotations

import logging
import re
import time
from datetime import datetime
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff
from pydantic import ConfigDict, Field

from flows import add_run_tags, core_logs_to_prefect, flat_parameters, publish_markdown
from tasks.blockwise import Regions, Runner, blocks_per_region
from tasks.cluster import ClusterSpec
from tasks.paths import is_tiff_source, store_beside, volume_name
from tasks.regions import forget_regions, run_region
from tasks.report import (
    markdown_report,
    png_data_uri,
    preview_picture,
    size_histogram,
    write_preview,
)
from tasks.lease import Lease
from tasks.segment import (
    SegmentParams,
    SegmentPlan,
    check_segment_inputs,
    dask_client,
    finalize_outputs,
    plan_segmentation,
    prepare_outputs,
)
from tasks.store import attributes, open_group, retry_transient
from unet_core.errors import (
    CheckpointError,
    ConfigError,
    IncompleteError,
    InvalidVolumeError,
    SegflowError,
)
from unet_core.runtime import configure


class SegmentOptions(SegmentParams):
    """How to segment: the engine's parameters (:class:`SegmentParams`, shared with the CLI)
    plus what only a flow run decides (instances, where Dask runs, regions, retries)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    instances: bool = Field(True, description="Label objects across chunks (stitch).")
    min_size: int | None = Field(
        None, ge=0, description="Drop smaller objects (voxels; default: from the model)."
    )
    connectivity: int = Field(1, ge=1, le=3, description="1 faces, 2 +edges, 3 +corners.")
    instance_method: Literal["auto", "components", "slices"] = Field(
        "auto",
        description="Objects: 3D connected components, or 2D objects linked across slices by "
        "overlap (auto: slices for a 2D model on a stack).",
    )
    link_iou: float | None = Field(
        None, ge=0.0, le=1.0, description="Slices: IoU that links slices (default: the model's)."
    )
    dask_address: str | None = Field(
        None, description="Dask scheduler address (default: a local cluster for this run)."
    )
    cluster: ClusterSpec = Field(
        default_factory=ClusterSpec,
        description="Where the Dask workers run: local, slurm/pbs/sge/lsf jobs, or an address.",
    )
    max_regions: int = Field(
        2000, ge=1, le=100_000, description="At most this many region tasks per volume."
    )
    regions_in_flight: int = Field(
        8, ge=1, le=256, description="Region tasks running at once (the rest wait their turn)."
    )
    region_retries: int = Field(2, ge=0, le=10, description="Retries of a failed region.")
    retry_delay_s: float = Field(
        10.0, ge=0, le=3600, description="First retry delay; doubles on each retry."
    )
    region_timeout_s: float = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="A region taking longer fails (hung worker)."
    )
    ingest_levels: int = Field(0, ge=0, le=10, description="Pyramid levels made at ingest.")
    lease_wait_s: float = Field(
        0.0,
        ge=0,
        le=24 * 3600,
        description="Wait this long for another run writing the same outputs, then refuse.",
    )

    def engine(self) -> SegmentParams:
        """The engine's parameters (every field of :class:`SegmentParams`, nothing else)."""
        return SegmentParams.model_validate(
            self.model_dump(include=set(SegmentParams.model_fields))
        )


class SegmentVolumeParams(SegmentOptions):
    """One volume: where it is, which model, where the outputs go, and how."""

    source: str = Field(
        ...,
        min_length=1,
        title="Source",
        description="TIFF file, folder of TIFF slices or OME-Zarr image (local path or s3://).",
        examples=["/data/inbox/brain-01.tif"],
    )
    model: str = Field(
        ...,
        min_length=1,
        title="Model",
        description="U-Net checkpoint file (.ckpt) written by segflow train.",
        examples=["/models/unet-2d.ckpt"],
    )
    output: str | None = Field(
        None,
        title="Output store",
        description="OME-Zarr store for the outputs. Empty: the image itself, or, for a "
        "TIFF, a store named after it with .ome.zarr beside it.",
    )
    regions: list[int] | None = Field(
        None,
        title="Only these regions",
        description="Recompute only these region ids (from a failed run's report).",
        examples=[[0, 3]],
    )
    force: bool = Field(False, title="Force", description="Recompute everything.")

    def flow_parameters(self) -> dict[str, Any]:
        """The flow's keyword parameters: ``segment_volume(**p.flow_parameters())``."""
        return self.model_dump()


#: Prefect's own run names (two random words), replaced by volume + time.
_GENERATED_NAME = re.compile(r"[a-z]+-[a-z]+")
#: Seconds between updates of a run's progress artifact (one API call each; a 2,000-region
#: run would otherwise make 2,000 of them).
PROGRESS_EVERY_S = 1.0


def _run_name() -> str:
    """The volume and a short time stamp; a name typed in the run form (or set by an
    earlier attempt of this run) is kept."""
    from prefect.runtime import flow_run

    current = str(flow_run.name or "")
    if current and not _GENERATED_NAME.fullmatch(current):
        return current
    source = str(flow_run.parameters.get("source", "volume"))
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", volume_name(source))[:60]
    return f"{slug}-{datetime.now():%y%m%d-%H%M%S}"


# -------------------------------------------------------------------------- tasks


def _permanent(exc: BaseException) -> bool:
    """A bad input (corrupt chunk, unreadable file, wrong parameter): retrying won't help."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    return any(
        isinstance(e, (InvalidVolumeError, ConfigError, CheckpointError, IncompleteError))
        for e in (exc, cause)
        if e is not None
    )


def _retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Regions: retried unless their input is bad (a lost worker, an outage: retried)."""
    try:
        state.result()
    except Exception as exc:
        return not _permanent(exc)
    return True


class RegionsFailedError(SegflowError, RuntimeError):
    """Some regions of a run failed after their retries (the report says where)."""


@task(name="ingest", retries=1, retry_condition_fn=retry_transient)
def ingest_step(source: str, dst: str, levels: int, dask_address: str) -> str:
    from tasks.ingest import ingest_volume

    # A store this flow made from the same source is ingested again if the source changed.
    info = ingest_volume(
        source, dst, levels=levels, dask_client_or_scheduler=dask_address, refresh=True
    )
    return info.url


@task(name="plan")
def plan_step(image: str, model: str, output: str | None, options: SegmentOptions) -> SegmentPlan:
    return plan_segmentation(image, model, output, options.engine())


@task(name="segment-region", task_run_name="region-{region}", cache_policy=NO_CACHE)
def segment_region(
    plan: SegmentPlan, region: int, per_region: int, dask_address: str, timeout_s: float
) -> dict[str, Any]:
    from prefect.runtime import task_run

    return run_region(
        plan, region, per_region, dask_address, timeout_s, attempt=int(task_run.run_count or 1)
    )


@task(name="stitch")
def stitch_step(
    out: str, labels: str, options: SegmentOptions, dask_address: str
) -> dict[str, Any]:
    from tasks.stitch import stitch

    res = stitch(
        out,
        labels=labels,
        min_size=options.min_size,
        connectivity=options.connectivity,
        dask_address=dask_address,
        method=None if options.instance_method == "auto" else options.instance_method,
        link_iou=options.link_iou,
    )
    return {
        "instances": f"{res.store}/{res.labels_path}",
        "method": res.method,
        "objects": res.objects,
        "table_csv": res.table_csv,
        "table_parquet": res.table_parquet,
        "seconds": res.seconds,
        "reused": res.reused,
        "top": res.table.nlargest(10, "voxels").to_dict(orient="records") if len(res.table) else [],
        "size_histogram": size_histogram(res.table["voxels"].to_numpy()) if len(res.table) else [],
    }


@task(name="report")
def report_step(
    summary: dict[str, Any], image: str, out: str, labels: str | None
) -> dict[str, Any]:
    """Publish the run's report (one per volume key; a retried run replaces its own)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", summary["volume"].lower()).strip("-")[:40] or "volume"
    if labels is not None:
        try:
            picture = preview_picture(image, out, labels)
            summary["preview"] = write_preview(image, out, labels, picture=picture)
            summary["preview_uri"] = png_data_uri(picture)
        except Exception as exc:  # a missing preview must not fail a finished run
            get_run_logger().warning("no preview: %s", exc)
    shown = {k: v for k, v in summary.items() if k != "preview_uri"}
    publish_markdown(
        f"segflow-report-{slug}", markdown_report(summary), description="segflow run report"
    )
    if summary.get("top_objects"):
        create_table_artifact(
            summary["top_objects"], key=f"segflow-objects-{slug}", description="largest objects"
        )
    elif summary.get("class_voxels"):
        rows = [{"class": k, "voxels": v} for k, v in summary["class_voxels"].items()]
        create_table_artifact(rows, key=f"segflow-classes-{slug}", description="voxels per class")
    return shown


# --------------------------------------------------------------------------- flow


@flow(name="segment-volume", flow_run_name=_run_name, log_prints=True)
@flat_parameters(
    SegmentVolumeParams,
    first=("source", "model", "output"),
    examples={"chunks": [[64, 256, 256]], "tile": [[1, 572, 572]]},
)
def segment_volume(params: SegmentVolumeParams) -> dict[str, Any]:
    """Segment one volume: ingest (TIFF), segment regions on Dask, stitch, report."""
    configure()
    core_logs_to_prefect()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logger = get_run_logger()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    name = volume_name(params.source)
    add_run_tags("segflow", name)
    complete = False
    tiff = is_tiff_source(params.source)
    check_segment_inputs(  # every input, before the cluster starts or anything is written
        params.source,
        params.model,
        params.output,
        params.engine(),
        params.lease_wait_s,
        (params.output or store_beside(params.source)) if tiff else None,
        local=params.dask_address is None and params.cluster.kind == "local",
    )
    with dask_client(
        address=params.dask_address, cluster=params.cluster, device=params.device
    ) as client:
        address = params.dask_address or client.scheduler.address
        image = params.source
        output = params.output
        if tiff:
            dst = params.output or store_beside(params.source)
            image = ingest_step(params.source, dst, params.ingest_levels, address)
            output = None  # labels go into the ingested image store
            timings["ingest"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        plan = plan_step(image, params.model, output, params)
        add_run_tags(f"model-{plan.model_digest[:8]}")
        with Lease(plan.out_url, "segment-volume", wait_s=params.lease_wait_s) as lease:
            summary, failed = _segment_regions(plan, params, address, name, logger)
            timings["segment"] = time.perf_counter() - t1
            lease.check()
            complete = finalize_outputs(plan, Runner(client))
            summary["complete"] = complete
            if complete and params.instances:
                t2 = time.perf_counter()
                st = stitch_step(plan.out_url, params.labels_name, params, address)
                timings["stitch"] = time.perf_counter() - t2
                summary.update(
                    instances=st["instances"],
                    objects=st["objects"],
                    instance_method=st["method"],
                    objects_table=st["table_csv"],
                    top_objects=st["top"],
                    size_histogram=st["size_histogram"],
                    stitch_reused=st["reused"],
                )
    summary["seconds"] = time.perf_counter() - t0
    summary["voxels_per_second"] = plan.voxels / max(timings.get("segment", 0.0), 1e-9)
    summary["timings"] = timings
    shown = "instances" if summary.get("instances") else params.labels_name
    summary = report_step(summary, plan.image.url, plan.out_url, shown if complete else None)
    if failed:
        first = summary["failed_regions"][0]
        raise RegionsFailedError(
            f"{name}: regions {sorted(failed)} failed (first: region {first['region']}, voxels "
            f"{first['voxel_box']}: {first['error']}); the run report lists each one and the "
            "parameters to re-run exactly those; retrying this run recomputes only them"
        )
    return summary


def _segment_regions(
    plan: SegmentPlan,
    params: SegmentVolumeParams,
    address: str,
    name: str,
    logger: Any,
) -> tuple[dict[str, Any], list[int]]:
    """Run the unfinished regions, at most ``regions_in_flight`` Prefect tasks at a time."""
    previous_key = _labels_key(plan)
    if params.regions and previous_key not in (None, plan.key):
        raise ConfigError(
            f"{plan.out_url}: regions {params.regions} belong to labels made with other "
            "parameters, model or image; re-running only those regions with these parameters "
            "would mix two results (run without regions to recompute everything)"
        )
    prepare_outputs(plan, force=params.force)
    regions = Regions(plan.grid, blocks_per_region(plan.n_blocks, params.max_regions))
    count = regions.count
    step = plan.step()
    if params.regions:
        forget_regions(plan, regions, list(params.regions))
    done = regions.done(step)
    todo = [r for r in range(count) if not done[r]]
    logger.info(
        "%s: %d blocks in %d regions of %d; %d to compute, %d already done",
        name,
        plan.n_blocks,
        count,
        regions.per_region,
        len(todo),
        count - len(todo),
    )
    progress_id = cast(
        UUID,
        create_progress_artifact(
            100.0 * (count - len(todo)) / count, description=f"regions of {name} done"
        ),
    )
    region_task = segment_region.with_options(
        retries=params.region_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=params.retry_delay_s)
        if params.retry_delay_s > 0
        else 0,
        retry_condition_fn=_retry_unless_permanent,
    )
    results: list[dict[str, Any]] = []
    errors: dict[int, str] = {}
    done_now = count - len(todo)
    waiting = list(reversed(todo))
    running: dict[Any, int] = {}
    shown_at = time.monotonic()  # the progress artifact: at most one API call a second
    # A bounded window of region tasks: a 2,000-region run must not start 2,000 threads.
    while waiting or running:
        while waiting and len(running) < params.regions_in_flight:
            r = waiting.pop()
            fut = region_task.submit(plan, r, regions.per_region, address, params.region_timeout_s)
            running[fut] = r
        for fut in as_completed(list(running)):
            region = running.pop(fut)
            try:
                results.append(fut.result())
                done_now += 1
            except Exception as exc:  # logged with its traceback by the task run already
                errors[region] = str(exc) or type(exc).__name__
            break  # refill the window
        if time.monotonic() - shown_at >= PROGRESS_EVERY_S or not (waiting or running):
            update_progress_artifact(progress_id, 100.0 * done_now / count)
            shown_at = time.monotonic()
    failed = sorted(errors)
    summary: dict[str, Any] = {
        "volume": name,
        "source": params.source,
        "image": plan.image.url,
        "model": params.model,
        "model_digest": plan.model_digest[:16],
        "run_key": plan.key,
        "outputs": plan.out_url,
        "labels": f"{plan.out_url}/{plan.labels_path}/0",
        "regions": count,
        "blocks_per_region": regions.per_region,
        "regions_computed": len(results),
        "regions_skipped": count - len(todo),
        "regions_failed": failed or None,
        "blocks": plan.n_blocks,
        "blocks_computed": sum(r["computed"] for r in results),
        "blocks_reused": plan.n_blocks
        - sum(r["computed"] for r in results)
        - sum(len(regions.blocks(r)) for r in failed),
        "voxels": plan.voxels,
        "region_seconds": sum(r["seconds"] for r in results),
        "block_seconds": sum(r["block_seconds"] for r in results),
        "class_voxels": _class_voxels(plan, results) if len(results) == count else None,
        "parameters": params.model_dump(),
    }
    if failed:
        summary["failed_regions"] = [_where_region(plan, regions, r, errors[r]) for r in failed]
        rerun = params.model_dump(exclude_defaults=True, exclude={"force", "regions"})
        summary["rerun_parameters"] = {**rerun, "regions": failed}
    logger.info(
        "%s: %d blocks computed, %d reused from earlier runs under the same key",
        name,
        summary["blocks_computed"],
        summary["blocks_reused"],
    )
    return summary, failed


def _where_region(plan: SegmentPlan, regions: Regions, region: int, error: str) -> dict[str, Any]:
    """A failed region located: its blocks, their voxel and physical boxes, first error."""
    blocks = regions.blocks(region)
    axes = plan.image.spatial_axes
    scale = plan.image.spatial_scale
    unit = plan.image.unit or "units"
    shown = blocks if len(blocks) <= 4 else [blocks[0], blocks[-1]]
    sep = "; " if len(blocks) <= 4 else " .. "
    voxel, physical = [], []
    for index in shown:
        box = plan.write_box(index)
        spans = list(zip(axes, box.begin, box.end, scale, strict=True))
        voxel.append(", ".join(f"{a} {b}:{e}" for a, b, e, _ in spans))
        physical.append(", ".join(f"{a} {b * s:g}-{e * s:g}" for a, b, e, s in spans))
    return {
        "region": region,
        "blocks": sep.join(str(tuple(int(i) for i in b)) for b in shown),
        "voxel_box": sep.join(voxel),
        "physical_box": sep.join(physical) + f" ({unit})",
        "error": error.splitlines()[0] if error else "",
    }


def _labels_key(plan: SegmentPlan) -> str | None:
    """The run key of the labels already in the output store, if any."""
    try:
        group = open_group(plan.out_url, "r")[plan.labels_path]
    except (KeyError, SegflowError):
        return None
    key = attributes(group).get("segflow", {}).get("key")
    return str(key) if key else None


def _class_voxels(plan: SegmentPlan, results: list[dict[str, Any]]) -> dict[str, int]:
    totals = [0] * plan.config.n_classes
    for r in results:
        for i, c in enumerate(r["counts"]):
            totals[i] += int(c)
    return dict(zip(plan.class_names, totals, strict=True))


__all__ = ["SegmentOptions", "SegmentVolumeParams", "segment_volume"]
