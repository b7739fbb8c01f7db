"""The ``segment-volume`` flow: ingest (TIFF) -> segment regions -> stitch -> report.

Prefect sees regions (groups of blocks), Dask computes the blocks inside a region: each
region task is a Dask client that submits its blocks to the run's cluster (a local cluster
the flow starts, or ``dask_address``). Done markers in the output store make every run,
retried run and retried task skip finished work.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from flows import core_logs_to_prefect
from tasks.cluster import ClusterSpec
from tasks.regions import (
    blocks_per_region,
    forget_regions,
    n_regions,
    region_blocks,
    region_status,
    run_region,
)
from tasks.report import markdown_report, write_preview
from tasks.segment import (
    SegmentParams,
    SegmentPlan,
    dask_client,
    finalize_outputs,
    plan_segmentation,
    prepare_outputs,
)
from tasks.store import DoneTracker, is_remote

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")


class SegmentOptions(BaseModel):
    """How to segment (the same knobs as ``segflow segment``)."""

    model_config = ConfigDict(extra="forbid")

    chunks: list[int] | None = Field(
        None, description="Output chunk shape, e.g. [64, 128, 128] (default: the image's)."
    )
    tile: list[int] | None = Field(
        None, description="Largest tile input shape (default: per model)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs.")
    batch_size: int = Field(4, ge=1, le=256, description="Tiles per forward pass.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on CUDA, fp32 on CPU."
    )
    exact: bool = Field(True, description="CPU: bitwise equal to a whole-volume pass.")
    probabilities: bool = Field(False, description="Also write class probabilities.")
    instances: bool = Field(True, description="Label objects across chunks (stitch).")
    min_size: int | None = Field(
        None, ge=0, description="Drop smaller objects (voxels; default: from the model)."
    )
    connectivity: int = Field(1, ge=1, le=3, description="1 faces, 2 +edges, 3 +corners.")
    labels_name: str = Field("semantic", pattern=r"^[A-Za-z0-9_.-]+$", max_length=64)
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
    region_retries: int = Field(2, ge=0, le=10, description="Retries of a failed region.")
    retry_delay_s: float = Field(
        10.0, ge=0, le=3600, description="First retry delay; doubles on each retry."
    )
    region_timeout_s: float = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="A region taking longer fails (hung worker)."
    )
    ingest_levels: int = Field(0, ge=0, le=10, description="Pyramid levels made at ingest.")

    def engine(self) -> SegmentParams:
        return SegmentParams(
            chunks=tuple(self.chunks) if self.chunks else None,
            tile=tuple(self.tile) if self.tile else None,
            device=self.device,
            batch_size=self.batch_size,
            precision=self.precision,
            exact=self.exact,
            probabilities=self.probabilities,
            labels_name=self.labels_name,
        )


class SegmentVolumeParams(SegmentOptions):
    """One volume: where it is, which model, where the outputs go, and how."""

    source: str = Field(
        ..., min_length=1, description="TIFF file, slice folder or OME-Zarr image (or s3://)."
    )
    model: str = Field(..., min_length=1, description="Checkpoint file (.ckpt).")
    output: str | None = Field(
        None,
        description="OME-Zarr store for the outputs (default: the image itself, or "
        "<source>.ome.zarr beside a TIFF).",
    )
    regions: list[int] | None = Field(
        None, description="Recompute only these regions (ids from an earlier run's report)."
    )
    force: bool = Field(False, description="Recompute everything.")


def volume_name(source: str) -> str:
    base = str(source).rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".ome.zarr", ".zarr", ".ome.tiff", ".ome.tif", *TIFF_SUFFIXES):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def is_tiff_source(source: str) -> bool:
    """TIFF file, slice folder or glob (ingest first) rather than a zarr group."""
    s = str(source).rstrip("/")
    if s.lower().endswith(".zarr"):
        return False
    if "*" in s or s.lower().endswith(TIFF_SUFFIXES):
        return True
    from tasks.store import filesystem

    return not filesystem(s).exists(f"{s}/zarr.json")


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters.get("params", {})
    source = params.get("source", "volume") if isinstance(params, dict) else params.source
    return "segment-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", volume_name(str(source)))[:60]


# -------------------------------------------------------------------------- tasks


@task(name="ingest", retries=1)
def ingest_step(source: str, dst: str, levels: int, dask_address: str) -> str:
    from tasks.ingest import ingest_volume

    return ingest_volume(source, dst, levels=levels, dask_client_or_scheduler=dask_address).url


@task(name="plan")
def plan_step(image: str, model: str, output: str | None, options: SegmentOptions) -> SegmentPlan:
    return plan_segmentation(image, model, output, options.engine())


@task(name="segment-region", task_run_name="region-{region}")
def segment_region(
    plan: SegmentPlan, region: int, per_region: int, dask_address: str, timeout_s: float
) -> dict[str, Any]:
    from prefect.runtime import task_run

    return run_region(
        plan, region, per_region, dask_address, timeout_s, attempt=int(task_run.run_count or 1)
    )


@task(name="stitch")
def stitch_step(
    out: str, labels: str, min_size: int | None, connectivity: int, dask_address: str
) -> dict[str, Any]:
    from tasks.stitch import stitch

    res = stitch(
        out, labels=labels, min_size=min_size, connectivity=connectivity, dask_address=dask_address
    )
    return {
        "instances": f"{res.store}/{res.labels_path}",
        "objects": res.objects,
        "table_csv": res.table_csv,
        "table_parquet": res.table_parquet,
        "seconds": res.seconds,
        "top": res.table.nlargest(10, "voxels").to_dict(orient="records"),
    }


@task(name="report")
def report_step(summary: dict[str, Any], image: str, out: str, labels: str) -> dict[str, Any]:
    slug = re.sub(r"[^a-z0-9-]+", "-", summary["volume"].lower()).strip("-")[:40] or "volume"
    try:
        summary["preview"] = write_preview(image, out, labels)
        link = summary["preview"]
        link = link if "://" in link else "file://" + os.path.abspath(link)
        create_link_artifact(
            link, link_text="preview (middle slice)", key=f"segflow-preview-{slug}"
        )
    except Exception as exc:  # a missing preview must not fail a finished run
        get_run_logger().warning("no preview: %s", exc)
    create_markdown_artifact(
        markdown_report(summary), key=f"segflow-report-{slug}", description="segflow run report"
    )
    if summary.get("top_objects"):
        create_table_artifact(
            summary["top_objects"], key=f"segflow-objects-{slug}", description="largest objects"
        )
    elif summary.get("class_voxels"):
        rows = [{"class": k, "voxels": v} for k, v in summary["class_voxels"].items()]
        create_table_artifact(rows, key=f"segflow-classes-{slug}", description="voxels per class")
    return summary


# --------------------------------------------------------------------------- flow


@flow(name="segment-volume", flow_run_name=_run_name, log_prints=True)
def segment_volume(params: SegmentVolumeParams) -> dict[str, Any]:
    """Segment one volume: ingest (TIFF), segment regions on Dask, stitch, report."""
    core_logs_to_prefect()
    logging.getLogger("distributed").setLevel(logging.WARNING)
    logger = get_run_logger()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    name = volume_name(params.source)
    with dask_client(
        address=params.dask_address, cluster=params.cluster, device=params.device
    ) as client:
        address = params.dask_address or client.scheduler.address
        image = params.source
        output = params.output
        if is_tiff_source(params.source):
            dst = params.output or _beside(params.source, f"{name}.ome.zarr")
            image = ingest_step(params.source, dst, params.ingest_levels, address)
            output = None  # labels go into the ingested image store
            timings["ingest"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        plan = plan_step(image, params.model, output, params)
        tracker = prepare_outputs(plan, force=params.force)
        per_region = blocks_per_region(plan.n_blocks, params.max_regions)
        count = n_regions(plan, per_region)
        if params.regions:
            forget_regions(plan, list(params.regions), per_region)
        done = region_status(plan, per_region)
        todo = [r for r in range(count) if not done[r]]
        logger.info(
            "%s: %d blocks in %d regions of %d; %d to compute, %d already done",
            name,
            plan.n_blocks,
            count,
            per_region,
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
        )
        # The region timeout is enforced on the region's Dask futures (run_region), which
        # cancels them; Prefect's own timeout cannot interrupt a task in a worker thread.
        futures = [
            region_task.submit(plan, r, per_region, address, params.region_timeout_s) for r in todo
        ]
        results: list[dict[str, Any]] = []
        failed: list[int] = []
        finished = count - len(todo)
        for fut in as_completed(futures):
            try:
                results.append(fut.result())
            except Exception as exc:
                region = todo[futures.index(fut)]
                failed.append(region)
                logger.error("region %d failed for good: %s", region, exc)
            finished += 1
            update_progress_artifact(progress_id, 100.0 * finished / count)
        timings["segment"] = time.perf_counter() - t1
        finalize_outputs(plan, DoneTracker(plan.out_url, plan.done_step, plan.grid, plan.key))
        del tracker
        summary: dict[str, Any] = {
            "volume": name,
            "source": params.source,
            "image": image,
            "model": params.model,
            "model_digest": plan.model_digest[:16],
            "outputs": plan.out_url,
            "labels": f"{plan.out_url}/{plan.labels_path}/0",
            "regions": count,
            "blocks_per_region": per_region,
            "regions_computed": len(results),
            "regions_skipped": count - len(todo),
            "regions_failed": sorted(failed) or None,
            "blocks": plan.n_blocks,
            "blocks_computed": sum(r["computed"] for r in results),
            "voxels": plan.voxels,
            "region_seconds": sum(r["seconds"] for r in results),
            "block_seconds": sum(r["block_seconds"] for r in results),
            "class_voxels": _class_voxels(plan, results) if len(results) == count else None,
            "parameters": params.model_dump(),
        }
        if not failed and params.instances:
            t2 = time.perf_counter()
            st = stitch_step(
                plan.out_url, params.labels_name, params.min_size, params.connectivity, address
            )
            timings["stitch"] = time.perf_counter() - t2
            summary.update(
                instances=st["instances"],
                objects=st["objects"],
                objects_table=st["table_csv"],
                top_objects=st["top"],
            )
    summary["seconds"] = time.perf_counter() - t0
    summary["voxels_per_second"] = plan.voxels / max(timings.get("segment", 0.0), 1e-9)
    summary["timings"] = timings
    shown = "instances" if summary.get("instances") else params.labels_name
    report_step(summary, plan.image.url, plan.out_url, shown)
    if failed:
        raise RuntimeError(
            f"{name}: regions {sorted(failed)} failed after retries; re-run (or retry this flow "
            "run) to recompute only them"
        )
    return summary


def _class_voxels(plan: SegmentPlan, results: list[dict[str, Any]]) -> dict[str, int]:
    totals = [0] * plan.config.n_classes
    for r in results:
        for i, c in enumerate(r["counts"]):
            totals[i] += int(c)
    return dict(zip(plan.class_names, totals, strict=True))


def _beside(path: str, name: str) -> str:
    parent = str(path).rstrip("/").rsplit("/", 1)[0] if "/" in str(path) else "."
    if is_remote(path) or parent:
        return f"{parent}/{name}"
    return name


__all__ = ["SegmentOptions", "SegmentVolumeParams", "region_blocks", "segment_volume"]
