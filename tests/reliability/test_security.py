"""Secrets stay secret and servers stay local.

A planted secret in the S3 credentials (``AWS_SECRET_ACCESS_KEY``) must never appear in
what segflow prints (stdout and stderr, with ``--debug`` too, on success and on failure) or
in what it stores in Prefect (flow-run parameters, task-run inputs, logs, artifacts and
reports, states). The Dask cluster segflow starts by itself listens on loopback only.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import tifffile
from harness import blobs, cli, make_model

from tasks.cluster import dask_client

SEGMENT = ["--chunks", "2,32,32", "--tile", "1,64,64", "--device", "cpu"]


@pytest.fixture
def planted_secret(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A unique secret key in the S3 credentials (moto's server accepts any)."""
    secret = f"planted-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    return secret


@pytest.mark.slow
def test_the_s3_secret_never_reaches_the_output(
    tmp_path: Path, s3_bucket: str, planted_secret: str
) -> None:
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, blobs((4, 64, 64), 1), metadata={"axes": "ZYX"}, photometric="minisblack")
    model = make_model(tmp_path / "m.ckpt")
    store = f"s3://{s3_bucket}/v.ome.zarr"
    runs = [
        cli("--debug", "ingest", tif, store),
        cli("--debug", "segment", store, "-m", model, *SEGMENT, "--instances", "--json"),
        cli("--debug", "export", store, "--to", tmp_path / "v.out.tif"),
        # failures, with the traceback: a missing store, a missing bucket
        cli("--debug", "segment", f"s3://{s3_bucket}/absent.zarr", "-m", model, *SEGMENT),
        cli("--debug", "stitch", f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/v.ome.zarr"),
    ]
    assert [r.returncode == 0 for r in runs] == [True, True, True, False, False], [
        r.stderr[-2000:] for r in runs
    ]
    assert "Traceback" in runs[3].stderr  # --debug printed everything it had
    for r in runs:
        assert planted_secret not in r.stdout
        assert planted_secret not in r.stderr


@pytest.mark.slow
def test_the_s3_secret_never_reaches_prefect(
    tmp_path: Path, s3_bucket: str, planted_secret: str, dask_client, prefect_api
) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.segment import SegmentVolumeParams, segment_volume
    from tasks.ingest import ingest_volume

    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, blobs((4, 64, 64), 2), metadata={"axes": "ZYX"}, photometric="minisblack")
    store = f"s3://{s3_bucket}/v.ome.zarr"
    ingest_volume(str(tif), store, chunks=(2, 32, 32))
    params = SegmentVolumeParams(
        source=store,
        model=make_model(tmp_path / "m.ckpt"),
        tile=[1, 64, 64],
        chunks=[2, 32, 32],
        max_regions=2,
        retry_delay_s=0,
        cluster={"kind": dask_client.scheduler.address},
    ).flow_parameters()
    state = segment_volume(**params, return_state=True)
    assert state.is_completed(), state
    flow_run_id = state.state_details.flow_run_id
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        stored = [
            client.read_flow_run(flow_run_id),
            client.read_task_runs(flow_run_filter=run_filter),
            client.read_logs(),
            client.read_artifacts(),
            client.read_flow_run_states(flow_run_id),
        ]
    text = "".join(repr(part) for part in stored)
    assert store in text  # what was scanned is what the run stored
    assert "segflow-report" in text
    assert planted_secret not in text
    assert planted_secret not in repr(state.result())


def listening(server: object) -> list[str]:
    """Host parts of the addresses a Dask server's HTTP server listens on."""
    http = getattr(server, "http_server", None)
    return [sock.getsockname()[0] for sock in http._sockets.values()] if http else []


def test_the_local_dask_cluster_listens_on_loopback_only() -> None:
    """Its comms are in-process; its HTTP servers (scheduler and worker: health, metrics,
    dashboard) bind 127.0.0.1, never every interface."""
    with dask_client() as client:
        assert client.scheduler.address.startswith("inproc://")
        servers = [client.cluster.scheduler, *client.cluster.workers.values()]
        hosts = [host for server in servers for host in listening(server)]
        assert hosts, "no HTTP server found to check"
        assert set(hosts) == {"127.0.0.1"}, hosts
