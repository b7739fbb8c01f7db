"""Deployments served by `segflow serve` against a real `prefect server` on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import zarr

from tasks.store import write_image
from unet_core import UNet, UNetConfig, save_checkpoint

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, timeout: float = 150.0) -> httpx.Response:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            r = httpx.get(url, timeout=5)
            if r.status_code == 200:
                return r
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1)
    raise TimeoutError(f"{url} not ready: {last}")


def _api(method: str, url: str, **kw) -> httpx.Response:
    """One API call, retried on 503 like Prefect's own client does: the server answers 503
    when its SQLite database is briefly locked by its background services."""
    for attempt in range(6):
        r = httpx.request(method, url, timeout=30, **kw)
        if r.status_code != 503:
            return r
        time.sleep(0.5 * 2**attempt)
    return r


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A prefect server and a `segflow serve` process, both real, on loopback."""
    tmp = tmp_path_factory.mktemp("served")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    torch.manual_seed(0)
    model = tmp / "m.ckpt"
    save_checkpoint(model, UNet(UNetConfig(ndim=2, depth=2, base_channels=4)))
    (tmp / "inbox").mkdir()
    logs = open(tmp / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=logs,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [server]
    try:
        _wait(f"{api}/health")
        serve_log = open(tmp / "serve.log", "w")  # noqa: SIM115
        serve = subprocess.Popen(
            [
                str(BIN / "segflow"),
                "serve",
                "--inbox",
                str(tmp / "inbox"),
                "--output",
                str(tmp / "results"),
                "--model",
                str(model),
                "--timezone",
                "Europe/Berlin",
            ],
            env=env,
            stdout=serve_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(serve)
        _wait(f"{api}/deployments/name/segment-volume/on-demand")
        yield {"api": api, "tmp": tmp, "model": str(model)}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        logs.close()


def test_deployments_schema_and_nightly_schedule(served):
    api = served["api"]
    dep = _api("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    schema = dep["parameter_openapi_schema"]
    assert dep["enforce_parameter_schema"] is True
    props = schema["definitions"]["SegmentVolumeParams"]["properties"]
    assert props["batch_size"]["minimum"] == 1
    assert props["batch_size"]["maximum"] == 256
    assert props["connectivity"]["maximum"] == 3
    assert set(props["device"]["enum"]) == {"auto", "cpu", "cuda"}
    assert "description" in props["source"]
    nightly = _wait(f"{api}/deployments/name/nightly-inbox/nightly").json()
    sched = nightly["schedules"][0]["schedule"]
    assert sched["cron"] == "0 2 * * *"
    assert sched["timezone"] == "Europe/Berlin"
    assert nightly["parameters"]["params"]["inbox"].endswith("inbox")
    train = _wait(f"{api}/deployments/name/train-model/on-demand").json()
    assert "TrainParams" in train["parameter_openapi_schema"]["definitions"]


def test_out_of_bounds_parameter_is_rejected_by_the_server(served):
    api = served["api"]
    dep = _api("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    bad = {"params": {"source": "x.ome.zarr", "model": "m.ckpt", "batch_size": 0}}
    r = _api("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": bad})
    assert r.status_code == 409, r.text
    assert "batch_size" in r.text


def test_triggered_run_completes(served):
    api, tmp = served["api"], served["tmp"]
    src = str(tmp / "vol.ome.zarr")
    write_image(
        src,
        (np.random.default_rng(0).random((4, 64, 64)) * 255).astype(np.uint8),
        "zyx",
        chunks=(2, 32, 32),
    )
    dep = _api("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    params = {
        "params": {"source": src, "model": served["model"], "tile": [1, 60, 60], "device": "cpu"}
    }
    r = _api("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params})
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    deadline = time.time() + 300
    state = None
    while time.time() < deadline:
        run = _api("GET", f"{api}/flow_runs/{run_id}").json()
        state = run["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    assert state == "COMPLETED", (state, (tmp / "serve.log").read_text()[-3000:])
    assert run["name"] == "segment-vol"
    root = zarr.open_group(src, mode="r")
    assert root["labels/semantic/0"].shape == (4, 64, 64)
    assert root["labels/instances"].attrs["segflow"]["complete"] is True
