"""The segment-volume and nightly-inbox flows under a real Prefect API and Dask cluster."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
import torch
import zarr

from flows.nightly import NightlyParams, nightly_inbox
from flows.segment import SegmentVolumeParams, segment_volume
from tasks.regions import FAULT_ENV
from tasks.store import DoneTracker, write_image
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
        "dask_address": dask_client.scheduler.address,
    }
    base.update(kw)
    return SegmentVolumeParams(**base)


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
    state = segment_volume(params(tif, model, dask_client), return_state=True)
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
    assert run.name == "segment-sample"
    keys = {a.key for a in artifacts}
    assert {"segflow-report-sample", "segflow-preview-sample"} <= keys
    assert any(a.type == "progress" for a in artifacts)
    logs = run_logs(state.state_details.flow_run_id)
    assert any("region 0:" in m and "blocks computed" in m for m in logs)


def test_region_fails_then_succeeds_on_retry(tmp_path, model, dask_client, monkeypatch):
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, volume(1), "zyx", chunks=(2, 32, 32))
    monkeypatch.setenv(FAULT_ENV, "1:2")
    state = segment_volume(
        params(src, model, dask_client, region_retries=2, instances=False), return_state=True
    )
    assert state.is_completed()
    runs = {t.name: t for t in task_runs(state.state_details.flow_run_id)}
    assert runs["region-1"].run_count == 3
    assert runs["region-0"].run_count == 1
    assert DoneTracker.open(src, "segment-semantic").all_done()


def test_failed_region_then_rerun_recomputes_only_it(tmp_path, model, dask_client, monkeypatch):
    src = str(tmp_path / "img.ome.zarr")
    clean = str(tmp_path / "clean.ome.zarr")
    write_image(src, volume(2), "zyx", chunks=(2, 32, 32))
    write_image(clean, volume(2), "zyx", chunks=(2, 32, 32))
    monkeypatch.setenv(FAULT_ENV, "2:always")
    state = segment_volume(
        params(src, model, dask_client, region_retries=1, instances=False), return_state=True
    )
    assert state.is_failed()
    assert "regions [2] failed" in str(state.message) or "[2]" in repr(
        state.result(raise_on_failure=False)
    )
    done = DoneTracker.open(src, "segment-semantic").done_mask()
    assert done.sum() == done.size - 3  # region 2 = 3 blocks of 12
    assert zarr.open_group(src)["labels/semantic"].attrs["segflow"]["complete"] is False
    monkeypatch.delenv(FAULT_ENV)
    again = segment_volume(params(src, model, dask_client, instances=False))
    assert again["regions_computed"] == 1
    assert again["regions_skipped"] == 3
    assert again["blocks_computed"] == 3
    reference = segment_volume(params(clean, model, dask_client, instances=False))
    assert reference["regions_computed"] == 4
    a = zarr.open_group(src, mode="r")["labels/semantic/0"][...]
    b = zarr.open_group(clean, mode="r")["labels/semantic/0"][...]
    assert np.array_equal(a, b)
    # Choosing regions re-runs just those; force re-runs everything.
    chosen = segment_volume(params(src, model, dask_client, instances=False, regions=[0, 3]))
    assert chosen["regions_computed"] == 2
    forced = segment_volume(params(src, model, dask_client, instances=False, force=True))
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
        "dask_address": dask_client.scheduler.address,
    }
    p = NightlyParams(inbox=str(inbox), output=str(out), model=model, settle_s=0, options=options)
    first = nightly_inbox(p)
    status = {os.path.basename(r["volume"]): r["status"] for r in first["volumes"]}
    assert status == {"a.tif": "processed", "b.tif": "processed", "c.tif": "failed"}
    failed = next(r for r in first["volumes"] if r["status"] == "failed")
    assert "c.tif" in failed["detail"]
    assert zarr.open_group(str(out / "a.ome.zarr"), mode="r")["labels/instances/0"].shape == (
        6,
        64,
        64,
    )
    second = nightly_inbox(p)
    assert second["counts"]["processed"] == 0
    assert second["counts"]["failed"] == 0
    assert second["counts"]["already_done"] == 2
    # A volume still being copied (too recent) waits for the next night.
    tifffile.imwrite(inbox / "d.tif", volume(5), metadata={"axes": "ZYX"})
    third = nightly_inbox(p.model_copy(update={"settle_s": 3600}))
    status = {os.path.basename(r["volume"]): r["status"] for r in third["volumes"]}
    assert status["d.tif"] == "skipped"
    assert third["counts"]["processed"] == 0
