"""The segment-volume and nightly-inbox flows under a real Prefect API and Dask cluster."""

from __future__ import annotations

import base64
import io
import os
import re

import numpy as np
import pytest
import tifffile
import torch
import zarr
from PIL import Image

from flows.nightly import NightlyParams, nightly_inbox
from flows.segment import SegmentVolumeParams, segment_volume
from tasks.blockwise import Markers
from tasks.regions import FAULT_ENV
from tasks.store import write_image
from unet_core import UNet, UNetConfig, save_checkpoint

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "m.ckpt"
    save_checkpoint(path, UNet(UNetConfig(ndim=2, depth=2, base_channels=4)))
    return str(path)


def volume(seed=0, shape=(6, 64, 64)):
    return (np.random.default_rng(seed).random(shape) * 255).astype(np.uint8)


def params(source, model, dask_client, **kw):
    base = {
        "source": str(source),
        "model": model,
        "tile": [1, 60, 60],
        "chunks": [2, 32, 32],
        "max_regions": 4,
        "retry_delay_s": 0,
        "cluster": {"kind": dask_client.scheduler.address},
        "instances": True,
    }
    base.update(kw)
    return SegmentVolumeParams(**base).flow_parameters()


def task_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def run_logs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        return [
            log.message
            for log in client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
            )
        ]


def test_flow_end_to_end_from_tiff(tmp_path, model, dask_client):
    tif = tmp_path / "sample.tif"
    tifffile.imwrite(tif, volume(), metadata={"axes": "ZYX"})
    state = segment_volume(**params(tif, model, dask_client), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    out = str(tmp_path / "sample.ome.zarr")
    assert summary["outputs"] == out
    assert summary["regions_computed"] == summary["regions"] == 4
    root = zarr.open_group(out, mode="r")
    sem = root["labels/semantic/0"][...]
    inst = root["labels/instances/0"][...]
    assert sem.shape == inst.shape == (6, 64, 64)
    assert summary["objects"] == len(np.unique(inst[inst > 0]))
    assert summary["instance_method"] == "slices"  # a 2D model on a stack
    assert os.path.exists(summary["preview"])
    assert os.path.exists(summary["objects_table"])
    # The flow run is named after the volume, and core logs reached the run logs.
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts()
    assert re.fullmatch(r"sample-\d{6}-\d{6}", run.name), run.name
    assert {"segflow", "sample", f"model-{summary['model_digest'][:8]}"} <= set(run.tags)
    reports = [a for a in artifacts if a.key == "segflow-report-sample"]
    assert len(reports) == 1
    assert "](data:image/png;base64," in str(reports[0].data)  # the preview, embedded
    embedded = str(reports[0].data).split("](data:image/png;base64,")[1].split(")")[0]
    with Image.open(io.BytesIO(base64.b64decode(embedded))) as png:
        assert min(png.size) >= 512, png.size  # as drawn, not a thumbnail
        assert png.size == Image.open(summary["preview"]).size
    assert "*no voxel size: z drawn 1:1, scale bar in image pixels; scale bar 10 px*" in str(
        reports[0].data
    )
    assert "## Object sizes" in str(reports[0].data)
    assert any(a.type == "progress" for a in artifacts)
    logs = run_logs(state.state_details.flow_run_id)
    assert any("region 0:" in m and "blocks computed" in m for m in logs)


def _report(state, key):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    assert len(found) == 1, found
    return str(found[0].data)


def test_region_fails_then_succeeds_on_retry(tmp_path, model, dask_client, monkeypatch):
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, volume(1), "zyx", chunks=(2, 32, 32))
    monkeypatch.setenv(FAULT_ENV, "1:2")
    state = segment_volume(
        **params(src, model, dask_client, region_retries=2, instances=False), return_state=True
    )
    assert state.is_completed()
    runs = {t.name: t for t in task_runs(state.state_details.flow_run_id)}
    assert runs["region-1"].run_count == 3
    assert runs["region-0"].run_count == 1
    assert Markers.open(str(src), "segment-semantic").done_mask().all()


def test_failed_region_then_rerun_recomputes_only_it(tmp_path, model, dask_client, monkeypatch):
    src = str(tmp_path / "img.ome.zarr")
    clean = str(tmp_path / "clean.ome.zarr")
    write_image(src, volume(2), "zyx", chunks=(2, 32, 32))
    write_image(clean, volume(2), "zyx", chunks=(2, 32, 32))
    monkeypatch.setenv(FAULT_ENV, "2:always")
    state = segment_volume(
        **params(src, model, dask_client, region_retries=1, instances=False), return_state=True
    )
    assert state.is_failed()
    assert "regions [2] failed" in str(state.message)
    assert "injected fault in region 2" in str(state.message)
    report = _report(state, "segflow-failed-img")  # the failure record, kept on retries
    assert "## Failed regions (1)" in report
    # region 2 = blocks 6-8 of the (3, 2, 2) grid, each named with its voxel box
    assert "| 2 | (1, 1, 0); (1, 1, 1); (2, 0, 0) | z 2:4, y 32:64, x 0:32; " in report
    assert "- region 2: injected fault in region 2" in report.split("## Failed regions")[1]
    command = report.split("### Re-run exactly these regions")[1].split("```")[1]
    assert "  --param regions='[2]'" in command
    assert "  --param max_regions=4" in command
    # the failure's traceback is logged once (by its task run), not again by the flow
    logs = run_logs(state.state_details.flow_run_id)
    assert sum("in _inject_fault" in m for m in logs) == 1, logs
    done = Markers.open(str(src), "segment-semantic").done_mask()
    assert done.sum() == done.size - 3  # region 2 = 3 blocks of 12
    assert zarr.open_group(src)["labels/semantic"].attrs["segflow"]["complete"] is False
    monkeypatch.delenv(FAULT_ENV)
    again = segment_volume(**params(src, model, dask_client, instances=False))
    assert again["regions_computed"] == 1
    assert again["regions_skipped"] == 3
    assert again["blocks_computed"] == 3
    reference = segment_volume(**params(clean, model, dask_client, instances=False))
    assert reference["regions_computed"] == 4
    a = zarr.open_group(src, mode="r")["labels/semantic/0"][...]
    b = zarr.open_group(clean, mode="r")["labels/semantic/0"][...]
    assert np.array_equal(a, b)
    # Choosing regions re-runs just those; force re-runs everything.
    chosen = segment_volume(**params(src, model, dask_client, instances=False, regions=[0, 3]))
    assert chosen["regions_computed"] == 2
    forced = segment_volume(**params(src, model, dask_client, instances=False, force=True))
    assert forced["regions_computed"] == 4


def test_nightly_inbox_with_a_corrupt_volume(tmp_path, model, dask_client):
    inbox = tmp_path / "inbox"
    out = tmp_path / "results"
    inbox.mkdir()
    tifffile.imwrite(inbox / "a.tif", volume(3), metadata={"axes": "ZYX"})
    tifffile.imwrite(inbox / "b.tif", volume(4), metadata={"axes": "ZYX"})
    (inbox / "c.tif").write_bytes(b"II*\x00" + b"\x00" * 20)  # a truncated TIFF
    options = {
        "tile": [1, 60, 60],
        "chunks": [2, 32, 32],
        "max_regions": 2,
        "retry_delay_s": 0,
        "region_retries": 0,
        "cluster": {"kind": dask_client.scheduler.address},
        "instances": True,
    }
    p = NightlyParams(inbox=str(inbox), output=str(out), model=model, settle_s=0, **options)
    state = nightly_inbox(**p.model_dump(), return_state=True)
    assert state.is_failed()  # after processing all the others
    assert "c.tif" in str(state.message)
    first = state.result(raise_on_failure=False).result  # the night's result, on its error
    status = {os.path.basename(r["volume"]): r["status"] for r in first["volumes"]}
    assert status == {"a.tif": "processed", "b.tif": "processed", "c.tif": "failed"}
    failed = next(r for r in first["volumes"] if r["status"] == "failed")
    assert "c.tif" in failed["detail"]
    assert zarr.open_group(str(out / "a.tif.ome.zarr"), mode="r")["labels/instances/0"].shape == (
        6,
        64,
        64,
    )
    second = nightly_inbox(**p.model_dump())
    assert second["counts"]["processed"] == 0
    assert second["counts"]["failed"] == 0
    assert second["counts"]["already_done"] == 2
    # A volume still being copied (too recent) waits for the next night.
    tifffile.imwrite(inbox / "d.tif", volume(5), metadata={"axes": "ZYX"})
    third = nightly_inbox(**{**p.model_dump(), "settle_s": 3600})
    status = {os.path.basename(r["volume"]): r["status"] for r in third["volumes"]}
    assert status["d.tif"] == "skipped"
    detail = next(r["detail"] for r in third["volumes"] if r["volume"].endswith("d.tif"))
    assert "eligible from" in detail
    # subflows carry the tags to filter them by
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        subs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(
                    any_=[state.state_details.flow_run_id]
                )
            )
        )
    assert {"segflow", "nightly", "a"} <= set(next(r for r in subs if "a" in r.tags).tags)
    assert third["counts"]["processed"] == 0


def test_a_rewritten_tiff_is_ingested_again_and_unchanged_results_are_reused(
    tmp_path, model, dask_client
):
    """What `make demo` does twice in a row: the TIFF is written anew (same content)."""
    data = volume(11)
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, data, metadata={"axes": "ZYX"})
    out = str(tmp_path / "v.ome.zarr")
    first = segment_volume(**params(tif, model, dask_client, output=out))
    assert first["blocks_computed"] == first["blocks"]
    os.utime(tif, (1, 1))  # "changed" on disk: re-ingested, same content
    tifffile.imwrite(tif, data, metadata={"axes": "ZYX"})
    second = segment_volume(**params(tif, model, dask_client, output=out))
    assert second["blocks_computed"] == 0
    assert second["blocks_reused"] == second["blocks"]
    assert second["stitch_reused"] is True
    # other content: everything is recomputed
    tifffile.imwrite(tif, data[:, ::-1].copy(), metadata={"axes": "ZYX"})
    third = segment_volume(**params(tif, model, dask_client, output=out))
    assert third["blocks_computed"] == third["blocks"]
    assert third["stitch_reused"] is False


def test_regions_rerun_with_other_parameters_is_refused(tmp_path, model, dask_client):
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, volume(12), "zyx", chunks=(2, 32, 32))
    segment_volume(**params(src, model, dask_client, instances=False, chunks=None))
    # the same parameters written differently: only region 0 is recomputed
    same = segment_volume(
        **params(src, model, dask_client, instances=False, chunks=[2, 32, 32], regions=[0])
    )
    assert same["regions_computed"] == 1
    assert same["blocks_computed"] == same["blocks_per_region"]
    # other parameters would change every region's key: refused, nothing recomputed
    state = segment_volume(
        **params(src, model, dask_client, instances=False, probabilities=True, regions=[0]),
        return_state=True,
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="would mix two results"):
        state.result()
