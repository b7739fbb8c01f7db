"""Shared test settings: a project-local Prefect home and Dask scratch, deterministic torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unet_core.runtime import configure

configure()  # the CPU settings segflow's entry points apply, before any test loads PyTorch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect" / "test"))
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: one Prefect home per worker process
    os.environ["PREFECT_HOME"] = os.path.join(
        os.environ["PREFECT_HOME"], os.environ["PYTEST_XDIST_WORKER"]
    )
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(ROOT / ".dask-scratch"))
for _folder in (os.environ["PREFECT_HOME"], os.environ["DASK_TEMPORARY_DIRECTORY"]):
    os.makedirs(_folder, exist_ok=True)


@pytest.fixture(autouse=True)
def _torch_threads():
    import torch

    torch.set_num_threads(2)
    return


@pytest.fixture
def failing_blocks(monkeypatch):
    """``failing_blocks(predicate)``: blocks of a segmentation whose :class:`Block` the
    predicate is true for fail (in this process: thread workers), the others run."""
    import tasks.segment.driver as segment_driver  # where segmentation_step takes it from

    real = segment_driver.segment_block

    def fail(predicate):
        def segment_block(plan, index):
            if predicate(plan.block(index)):
                raise RuntimeError("injected failure")
            return real(plan, index)

        monkeypatch.setattr(segment_driver, "segment_block", segment_block)
        return lambda: monkeypatch.setattr(segment_driver, "segment_block", real)

    return fail


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API (moto's server) on 127.0.0.1; credentials and endpoint via env vars."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_bucket(s3_endpoint, request):
    """A fresh, empty bucket on the moto server; yields its name."""
    import re
    import uuid

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{name}-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def prefect_api():
    """A real temporary Prefect server (Prefect's test harness), shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_client():
    """A real Dask cluster (in-process LocalCluster, threads) shared by the session."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=1, threads_per_worker=3, processes=False, dashboard_address=None
    )
    client = Client(cluster)
    yield client
    from tasks.cluster import release_client

    release_client(cluster.scheduler_address)  # the clients flows' tasks opened to it
    client.close()
    cluster.close()


@pytest.fixture
def s3_with_auth(monkeypatch):
    """A second S3 server (moto, its own process) that checks credentials; none are valid on
    it. The environment points at it, with wrong credentials, for this test only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        yield endpoint
    finally:
        proc.terminate()
        proc.wait()
