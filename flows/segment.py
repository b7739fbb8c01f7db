"""The ``segment-volume`` flow: a door over :mod:`tasks.pipeline` (ingest (TIFF) -> segment
regions -> stitch -> report), its steps wrapped as Prefect tasks.

Prefect sees regions (groups of blocks), Dask computes the blocks inside a region: each
region task is a Dask client that submits its blocks to the run's cluster (a local cluster
the flow starts, or the scheduler address given as the cluster). The pipeline's one
segmentation sequence (lease, prepare, run, finalize) runs the regions as its blocks
(:class:`RegionRun`). Done markers in the output store make every run, retried run and
retried task skip finished work.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State
from prefect.exceptions import TerminationSignal
from prefect.futures import as_completed, wait
from prefect.states import Cancelled
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from flows import (
    RunProgress,
    add_run_tags,
    core_logs_to_prefect,
    crash_earlier_attempts,
    failed_state,
    field_title,
    flat_parameters,
    in_form_words,
    publish_markdown,
    run_form,
    volume_run_name,
)
from tasks import pipeline
from tasks.blockwise import (
    BlocksStoppedError,
    Runner,
    Step,
    StepResult,
    allow_blocks,
    stop_blocks,
)
from tasks.cluster import ClusterSpec, client_for, dask_client
from tasks.options import GROUPS, PipelineOptions
from tasks.paths import volume_name
from tasks.pipeline import INSTANCES, Request
from tasks.preview import (
    PREVIEW_NOTE,
    png_data_uri,
    preview_picture,
    size_histogram,
    write_preview,
)
from tasks.records import OutputRecord
from tasks.regions import Regions, blocks_per_region, forget_regions, run_region
from tasks.report import markdown_report
from tasks.segment import SegmentPlan
from tasks.storage_errors import retry_transient
from tasks.store import open_group
from unet_core.errors import (
    CheckpointError,
    ConfigError,
    IncompleteError,
    InvalidVolumeError,
    LeaseLostError,
    SegflowError,
)
from unet_core.runtime import configure


class SegmentOptions(PipelineOptions):
    """How to segment: the pipeline's options (:class:`tasks.options.PipelineOptions`, the
    same fields the CLI has) plus what only a flow run decides (where Dask runs, regions,
    retries)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    cluster: ClusterSpec = Field(
        default_factory=ClusterSpec,
        description="Where the Dask workers run: local, slurm/pbs/sge/lsf jobs, or the "
        "address of a running scheduler (tcp://host:8786).",
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

    def pipeline_options(self) -> PipelineOptions:
        """The pipeline's options (every field of :class:`PipelineOptions`, nothing else)."""
        return PipelineOptions.model_validate(
            self.model_dump(include=set(PipelineOptions.model_fields))
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

    def flow_parameters(self) -> dict[str, Any]:
        """The flow's keyword parameters: ``segment_volume(**p.flow_parameters())``."""
        return self.model_dump()

    def request(self) -> Request:
        """The pipeline request of this run."""
        return Request(self.source, self.model, self.output, self.pipeline_options())


#: The run form's first fields: what to segment, with what, where to, and the everyday
#: choices; the others follow in groups (:func:`flows.form_order`).
FORM_FIRST = ("source", "model", "output", "instances", "device", "batch_size", "chunks", "tile")
#: The run form's groups: the pipeline's concepts, then how the flow runs regions.
FORM_GROUPS: dict[type[BaseModel], str] = {
    **GROUPS,
    SegmentOptions: "Where and how regions run",
    SegmentVolumeParams: "Where and how regions run",
}

#: Fields of the pipeline's messages that the form calls otherwise.
FORM_FIELDS = {"out": "output"}


def form_words(field: str) -> str:
    """How the run form names a field: its title (a cluster field as "Cluster: Workers")."""
    name = FORM_FIELDS.get(field, field)
    fields = SegmentVolumeParams.model_fields
    if name in fields:
        return f'"{field_title(name, fields[name])}"'
    if name in ClusterSpec.model_fields:
        return f'"Cluster: {field_title(name, ClusterSpec.model_fields[name])}"'
    return f"'{field}'"


#: Seconds between updates of a run's progress artifact (one API call each; a 2,000-region
#: run would otherwise make 2,000 of them).
PROGRESS_EVERY_S = 1.0


def _run_name() -> str:
    """The volume and the facility's local time; a name typed in the run form (or set by
    an earlier attempt of this run) is kept (:func:`flows.volume_run_name`)."""
    from prefect.runtime import flow_run

    source = str(flow_run.parameters.get("source", "volume"))
    return volume_run_name(str(flow_run.name or ""), volume_name(source))


# -------------------------------------------------------------------------- tasks


def _permanent(exc: BaseException) -> bool:
    """A bad input (corrupt chunk, unreadable file, wrong parameter): retrying won't help."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    return any(
        isinstance(
            e,
            (InvalidVolumeError, ConfigError, CheckpointError, IncompleteError, LeaseLostError),
        )
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
def ingest_step(request: Request, address: str, levels: int) -> str:
    # A store this flow made from the same source is ingested again if the source changed.
    return pipeline.ingest(request, scheduler=address, levels=levels)


@task(name="plan")
def plan_step(request: Request, image: str) -> SegmentPlan:
    return pipeline.plan(request, image)


@task(name="segment-region", task_run_name="region-{region}", cache_policy=NO_CACHE)
def segment_region(
    plan: SegmentPlan, region: int, per_region: int, address: str, timeout_s: float
) -> Any:
    """A region's blocks on Dask: its counts, or Cancelled when the run was cancelled before
    all its blocks started (those that ran are kept)."""
    from prefect.runtime import task_run

    try:
        return run_region(
            plan, region, per_region, address, timeout_s, attempt=int(task_run.run_count or 1)
        )
    except BlocksStoppedError as exc:
        return Cancelled(message=str(exc))


@task(name="stitch")
def stitch_step(out: str, labels: str, options: PipelineOptions, address: str) -> dict[str, Any]:
    found = pipeline.instances(
        out,
        labels,
        options,
        client=client_for(address),
        lease_wait_s=options.lease_wait_s,
    )
    table = found.pop("table")
    found["top"] = table.nlargest(10, "voxels").to_dict(orient="records") if len(table) else []
    found["size_histogram"] = size_histogram(table["voxels"].to_numpy()) if len(table) else []
    return found


@task(name="report")
def report_step(
    summary: dict[str, Any], request: Request, image: str, complete: bool
) -> dict[str, Any]:
    """Publish the run's report: ``segflow-report-VOLUME`` (a retried run replaces its
    own), or, for an attempt with failed regions, ``segflow-failed-VOLUME``: that failure
    record is kept, one per failed attempt, when a retry succeeds."""
    from prefect.runtime import flow_run

    slug = _slug(summary["volume"])
    labels = INSTANCES if summary.get("instances") else request.options.labels_name
    if complete and request.options.preview:
        try:  # the picture is the pipeline's preview, embedded in the report too
            out = request.out_store
            picture = preview_picture(image, out, labels)
            summary["preview"] = write_preview(image, out, labels, picture=picture)
            summary["preview_uri"] = png_data_uri(picture)  # as drawn: 512+ pixels across
            summary["preview_note"] = picture.info.get(PREVIEW_NOTE)
        except Exception as exc:  # a missing preview must not fail a finished run
            get_run_logger().warning("no preview: %s", exc)
    shown = {k: v for k, v in summary.items() if k != "preview_uri"}
    if summary.get("failed_regions"):
        attempt = int(flow_run.run_count or 1)
        publish_markdown(
            f"segflow-failed-{slug}",
            markdown_report(summary),
            description=f"failure record of attempt {attempt}: regions "
            f"{summary['regions_failed']} failed (kept when a retry succeeds)",
            replace=False,
        )
    else:
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


@run_form
@flow(name="segment-volume", flow_run_name=_run_name, log_prints=True)
@flat_parameters(SegmentVolumeParams, first=FORM_FIRST, groups=FORM_GROUPS)
def segment_volume(params: SegmentVolumeParams) -> dict[str, Any] | State:
    """Segment one volume: ingest (TIFF), segment regions on Dask, stitch, report."""
    configure()
    core_logs_to_prefect(form_words)
    crash_earlier_attempts()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    try:
        return _segment_volume(params)
    except SegflowError as exc:
        shown = in_form_words(exc, form_words)
        shown.__cause__ = exc
        return failed_state(shown)  # one sentence, no traceback (an unexpected error raises)


def _segment_volume(params: SegmentVolumeParams) -> dict[str, Any]:
    logger = get_run_logger()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    name = volume_name(params.source)
    add_run_tags("segflow", name)
    request = params.request()
    # every input and target, before the cluster starts or anything is written
    pipeline.check(request, local=params.cluster.kind == "local")
    with dask_client(cluster=params.cluster, device=params.device) as client:
        address = client.scheduler.address
        image = request.image_store
        if request.tiff:
            image = ingest_step(request, address, params.ingest_levels)
            timings["ingest"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        plan = plan_step(request, image)
        add_run_tags(f"model-{plan.model_digest[:8]}")
        if params.regions and _labels_key(plan) not in (None, plan.key):
            raise ConfigError(
                f"{plan.out_url}: regions {params.regions} belong to labels made with other "
                "parameters, model or image; re-running only those regions with these "
                "parameters would mix two results (run without regions to recompute "
                "everything)"
            )
        regions = RegionRun(plan, params, address, name, logger)
        result = pipeline.segment(
            plan,
            regions.run,
            force=params.force,
            lease_wait_s=params.lease_wait_s,
            runner=Runner(client),
            what="segment-volume",
        )
        timings["segment"] = time.perf_counter() - t1
        summary = regions.summary
        summary["complete"] = result.complete
        if result.complete and params.instances:
            t2 = time.perf_counter()
            st = stitch_step(plan.out_url, params.labels_name, params.pipeline_options(), address)
            timings["stitch"] = time.perf_counter() - t2
            summary.update(
                instances=st["instances"],
                objects=st["objects"],
                instance_method=st["method"],
                min_size=st["min_size"],
                min_size_unit=st["min_size_unit"],
                small_objects_removed=st["removed"],
                objects_table=st["table_csv"],
                top_objects=st["top"],
                size_histogram=st["size_histogram"],
                stitch_reused=st["reused"],
            )
    summary["seconds"] = time.perf_counter() - t0
    summary["voxels_per_second"] = plan.voxels / max(timings.get("segment", 0.0), 1e-9)
    summary["timings"] = timings
    summary = report_step(summary, request, plan.image.url, result.complete)
    if regions.failed:
        first = summary["failed_regions"][0]
        raise RegionsFailedError(
            f"{name}: regions {sorted(regions.failed)} failed (first: region {first['region']}, "
            f"voxels {first['voxel_box']}: {first['error']}); the run report lists each one "
            "and the parameters to re-run exactly those; retrying this run recomputes only them"
        )
    pipeline.ensure_complete(result)  # never Completed with incomplete labels
    return summary


class RegionRun:
    """How the flow runs a segmentation's blocks: as region tasks (groups of blocks in C
    order), at most ``regions_in_flight`` at a time, each a Dask client of the run's
    cluster; a failed region is recorded (the others go on) for the report."""

    def __init__(
        self, plan: SegmentPlan, params: SegmentVolumeParams, address: str, name: str, logger: Any
    ) -> None:
        self.plan, self.params, self.address, self.name, self.logger = (
            plan,
            params,
            address,
            name,
            logger,
        )
        self.summary: dict[str, Any] = {}
        self.failed: list[int] = []

    def run(self, step: Step) -> StepResult:
        """Run the unfinished regions of ``step`` (the outputs are prepared already)."""
        plan, params, name, logger = self.plan, self.params, self.name, self.logger
        t0 = time.perf_counter()
        regions = Regions(plan.grid, blocks_per_region(plan.n_blocks, params.max_regions))
        count = regions.count
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
        progress = RunProgress(
            f"segflow-progress-{_slug(name)}", "of regions", count, PROGRESS_EVERY_S
        )
        progress.show(count - len(todo), last=True)
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
        allow_blocks()
        # A bounded window of region tasks: a 2,000-region run must not start 2,000 threads.
        try:
            while waiting or running:
                while waiting and len(running) < params.regions_in_flight:
                    r = waiting.pop()
                    fut = region_task.submit(
                        plan, r, regions.per_region, self.address, params.region_timeout_s
                    )
                    running[fut] = r
                for fut in as_completed(list(running)):
                    region = running.pop(fut)
                    try:
                        results.append(fut.result())
                        done_now += 1
                    except LeaseLostError:
                        raise  # superseded: this run writes nothing more
                    except Exception as exc:  # logged with its traceback by the task run
                        errors[region] = str(exc) or type(exc).__name__
                    break  # refill the window
                progress.show(done_now, last=not (waiting or running))
        except TerminationSignal:  # cancelled (or serve stopped): finish what runs, then go
            self.stop(running, done_now, count)
            raise
        self.failed = sorted(errors)
        computed = sum(r["computed"] for r in results)
        failed_blocks = sum(len(regions.blocks(r)) for r in self.failed)
        self.summary = {
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
            "regions_failed": self.failed or None,
            "blocks": plan.n_blocks,
            "blocks_computed": computed,
            "blocks_reused": plan.n_blocks - computed - failed_blocks,
            "voxels": plan.voxels,
            "region_seconds": sum(r["seconds"] for r in results),
            "block_seconds": sum(r["block_seconds"] for r in results),
            "class_voxels": _class_voxels(plan, results) if len(results) == count else None,
            "parameters": params.model_dump(),
        }
        if self.failed:
            self.summary["failed_regions"] = [
                _where_region(plan, regions, r, errors[r]) for r in self.failed
            ]
            rerun = params.model_dump(  # as the run form takes them: chunks as "64,256,256"
                mode="json", exclude_defaults=True, exclude={"force", "regions"}
            )
            self.summary["rerun_parameters"] = {**rerun, "regions": self.failed}
        logger.info(
            "%s: %d blocks computed, %d reused from earlier runs under the same key",
            name,
            self.summary["blocks_computed"],
            self.summary["blocks_reused"],
        )
        return StepResult(
            step.name,
            plan.n_blocks,
            computed,
            plan.n_blocks - computed - failed_blocks,
            time.perf_counter() - t0,
            results,
        )

    def stop(self, running: dict[Any, int], done: int, count: int) -> None:
        """The run was asked to stop: start no more blocks, let the running ones finish (at
        most :data:`STOP_WAIT_S`, within the grace Prefect gives a cancelled run before it
        kills it), so finished regions end Completed, and say how far the run got."""
        stop_blocks()
        t0 = time.monotonic()
        finished = wait(list(running), timeout=STOP_WAIT_S).done
        ended = [r for fut, r in running.items() if fut in finished and fut.state.is_completed()]
        self.logger.info(
            "%s: stopped on request after %.0f s: no block started since; %d of %d running "
            "region(s) finished their blocks; %d of %d regions done. Retrying or re-running "
            "the run computes only the rest.",
            self.name,
            time.monotonic() - t0,
            len(ended),
            len(running),
            done + len(ended),
            count,
        )


#: Seconds a stopping run waits for its running blocks (Prefect kills a cancelled run's
#: process 30 s after asking it to stop).
STOP_WAIT_S = 20.0


def _slug(volume: str) -> str:
    """A volume's name as an artifact key's part (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", volume.lower()).strip("-")[:40] or "volume"


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
    return OutputRecord.of(group).key


def _class_voxels(plan: SegmentPlan, results: list[dict[str, Any]]) -> dict[str, int]:
    totals = [0] * plan.config.n_classes
    for r in results:
        for i, c in enumerate(r["counts"]):
            totals[i] += int(c)
    return dict(zip(plan.class_names, totals, strict=True))


__all__ = ["SegmentOptions", "SegmentVolumeParams", "segment_volume"]
