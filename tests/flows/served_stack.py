"""A real `prefect server` and `segflow serve` on 127.0.0.1 for the deployment and browser
tests (imported by test modules in this folder)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from unet_core import UNet, UNetConfig, save_checkpoint

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ok(url: str, timeout: float = 150.0) -> httpx.Response:
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


def api_call(method: str, url: str, **kw) -> httpx.Response:
    """One API call, retried on 503 like Prefect's own client does: the server answers 503
    when its SQLite database is briefly locked by its background services."""
    for attempt in range(6):
        r = httpx.request(method, url, timeout=30, **kw)
        if r.status_code != 503:
            return r
        time.sleep(0.5 * 2**attempt)
    return r


@contextlib.contextmanager
def serve_stack(tmp: Path, *serve_args: str, env: dict[str, str] | None = None):
    """A prefect server and a `segflow serve` process, both real, on loopback, with
    `segflow serve`'s own logging defaults (``env``: more variables for both)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_LOGGING_")},
        "PREFECT_HOME": str(tmp / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_UI_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        **(env or {}),
    }
    torch.manual_seed(0)
    model = tmp / "m.ckpt"
    save_checkpoint(model, UNet(UNetConfig(ndim=2, depth=2, base_channels=4)))
    (tmp / "inbox").mkdir(exist_ok=True)
    logs = open(tmp / "server.log", "w")  # noqa: SIM115 - closed at teardown
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=logs,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs = [server]
    serve_cmd = [
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
        *serve_args,
    ]

    def start_serve() -> subprocess.Popen:
        serve_log = open(tmp / "serve.log", "a")  # noqa: SIM115
        proc = subprocess.Popen(
            serve_cmd, env=env, stdout=serve_log, stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        return proc

    try:
        wait_ok(f"{api}/health")
        serve = start_serve()
        wait_ok(f"{api}/deployments/name/segment-volume/on-demand")
        yield {
            "api": api,
            "tmp": tmp,
            "model": str(model),
            "serve": serve,
            "start_serve": start_serve,
            "port": port,
        }
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        logs.close()


def run_logs(api: str, run_id: str, until: str = "", timeout: float = 30.0) -> list[str]:
    """The messages of a flow run's logs (what the UI's Logs tab shows), oldest first;
    ``until``: once a message starts with it (a run sends its logs every few seconds)."""
    deadline = time.time() + timeout
    while True:
        r = api_call(
            "POST",
            f"{api}/logs/filter",
            json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC"},
        )
        logs = [log["message"] for log in r.json()]
        if any(m.startswith(until) for m in logs) or time.time() > deadline:
            return logs
        time.sleep(1)


def run_artifacts(api: str, run_id: str) -> list[dict]:
    """A flow run's artifacts (every version)."""
    r = api_call(
        "POST", f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )
    return r.json()


def retry_run(api: str, run_id: str, timeout: float) -> dict:
    """Retry a finished flow run as the UI's Retry does (AwaitingRetry), then wait for it
    to end; returns the run."""
    r = api_call(
        "POST",
        f"{api}/flow_runs/{run_id}/set_state",
        json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True},
    )
    assert r.status_code in (200, 201), r.text
    return wait_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"}, timeout)


def wait_state(api: str, run_id: str, states: set[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    run: dict = {}
    while time.time() < deadline:
        run = api_call("GET", f"{api}/flow_runs/{run_id}").json()
        if run["state"]["type"] in states:
            return run
        time.sleep(1)
    raise TimeoutError(f"run {run_id} still {run.get('state', {}).get('type')}")


def task_runs(api: str, flow_run_id: str) -> list[dict]:
    """The task runs of a flow run (all its attempts)."""
    return api_call(
        "POST",
        f"{api}/task_runs/filter",
        json={"task_runs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200},
    ).json()
