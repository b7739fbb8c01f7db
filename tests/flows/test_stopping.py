"""Stopping work, as an operator does it on a real `prefect server` with `segflow serve`:
cancelling a run (it starts no more blocks, its running blocks finish, finished regions
stay Completed, no retry noise), and switching the nightly schedule off in the UI, then
stopping and restarting serve (the schedule stays off; while nothing serves, the
deployments and the runs that wait say so).

Every block sleeps ``SEGFLOW_TEST_BLOCK_DELAY`` seconds so a run can be caught mid-way."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from served_stack import api_call, serve_stack, task_runs, wait_ok, wait_state
from test_browser import CHROMIUM, _ensure_chromium, _ensure_playwright, _shot

from deployments.serve import NOT_SERVED
from tasks.blockwise import DELAY_ENV, Markers
from tasks.store import write_image

pytestmark = pytest.mark.slow
STEP = "segment-semantic"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    env = {
        DELAY_ENV: "2",
        # a run nothing serves is Late after 2 s (not 15): the test need not wait
        "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "2",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with serve_stack(tmp_path_factory.mktemp("stopping")) as stack:
            yield stack


def _volume(path: str, shape: tuple[int, ...]) -> str:
    image = (np.random.default_rng(0).random(shape) * 255).astype(np.uint8)
    write_image(path, image, "zyx", chunks=(1, 32, 32))
    return path


def _submit(api: str, deployment: str, params: dict) -> str:
    dep = api_call("GET", f"{api}/deployments/name/{deployment}").json()
    r = api_call(
        "POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _done(src: str) -> np.ndarray:
    markers = Markers.open(src, STEP)
    return np.zeros(0, bool) if markers is None else markers.done_mask().reshape(-1)


def _logs(api: str, run_id: str) -> list[str]:
    logs = api_call(
        "POST",
        f"{api}/logs/filter",
        json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200},
    ).json()
    return [entry["message"] for entry in logs]


def test_a_cancelled_run_finishes_its_running_blocks_and_starts_no_more(served):
    api, tmp = served["api"], served["tmp"]
    # 32 blocks of 2 s in 4 regions of 8, two regions at once on three worker threads
    src = _volume(str(tmp / "slow.ome.zarr"), (8, 64, 64))
    params = {"source": src, "model": served["model"], "tile": "1,60,60", "device": "cpu"}
    params |= {"max_regions": 4, "regions_in_flight": 2}
    run_id = _submit(api, "segment-volume/on-demand", params)
    wait_state(api, run_id, {"RUNNING"}, 120)
    deadline = time.time() + 120
    while _done(src).sum() < 2 and time.time() < deadline:
        time.sleep(0.2)
    at_cancel = int(_done(src).sum())
    r = api_call(  # what the UI's Cancel does
        "POST", f"{api}/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING"}}
    )
    assert r.status_code in (200, 201), r.text
    run = wait_state(api, run_id, FINAL, 60)
    at_ack = int(_done(src).sum())
    assert run["state"]["type"] == "CANCELLED", run["state"]
    time.sleep(6)  # three blocks' time: nothing more is written once the run is Cancelled
    done = _done(src)
    assert int(done.sum()) == at_ack < 32
    # only the blocks running at the cancel finished: at most one per worker thread (3)
    # and one the scheduler had handed out ahead
    assert at_ack - at_cancel <= 4, (at_cancel, at_ack)

    states = {t["name"]: t["state"]["type"] for t in task_runs(api, run_id)}
    assert "RUNNING" not in states.values(), states
    by_region = done.reshape(4, 8).all(axis=1)
    for r, finished in enumerate(by_region):
        if finished:  # a region whose blocks all finished is Completed, not Cancelled
            assert states.get(f"region-{r}") == "COMPLETED", (r, states)
        elif f"region-{r}" in states:  # started, stopped part-way: says so
            assert states[f"region-{r}"] == "CANCELLED", (r, states)
    logs = _logs(api, run_id)
    assert any("stopped on request" in m and "regions done" in m for m in logs), logs
    serve_log = (tmp / "serve.log").read_text()
    for noise in ("IOLoop is closed", "No clients found", "Retry 1/"):
        assert not any(noise in m for m in logs), (noise, logs)
        assert noise not in serve_log, noise


def test_a_schedule_switched_off_in_the_ui_stays_off_and_a_stopped_serve_says_so(served):
    """Nightly schedule switched off in the UI (and the deployment paused), serve stopped
    (SIGTERM, as Ctrl-C) and started again: both are still off. Meanwhile the deployments
    say nothing serves them, and a run submitted then says why it waits and runs once serve
    is back."""
    _ensure_chromium()
    sync_api = _ensure_playwright()
    api, tmp, ui = served["api"], served["tmp"], f"http://127.0.0.1:{served['port']}"
    shots = tmp / "screenshots"
    shots.mkdir(exist_ok=True)
    nightly = wait_ok(f"{api}/deployments/name/nightly-inbox/nightly").json()
    assert nightly["schedules"][0]["active"] is True
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        page.goto(f"{ui}/deployments/deployment/{nightly['id']}")
        toggle = page.locator("[role=switch]").first
        toggle.wait_for()
        assert toggle.get_attribute("aria-checked") == "true"
        toggle.click()  # the schedule's switch, beside "At 02:00 AM every day"
        deadline = time.time() + 30
        while time.time() < deadline:
            dep = api_call("GET", f"{api}/deployments/{nightly['id']}").json()
            if not dep["schedules"][0]["active"]:
                break
            time.sleep(0.5)
        assert dep["schedules"][0]["active"] is False
        _shot(page, shots, "pause-1-schedule-off")
        # and the deployment itself paused
        r = api_call("PATCH", f"{api}/deployments/{nightly['id']}", json={"paused": True})
        assert r.status_code < 300, r.text

        serve = served["serve"]
        os.killpg(serve.pid, signal.SIGTERM)  # what Ctrl-C does
        serve.wait(timeout=60)
        for name in ("nightly-inbox/nightly", "segment-volume/on-demand"):
            dep = api_call("GET", f"{api}/deployments/name/{name}").json()
            assert dep["description"].startswith("NOT SERVED since"), (name, dep["description"])
        src = _volume(str(tmp / "small.ome.zarr"), (1, 32, 32))
        params = {"source": src, "model": served["model"], "tile": "1,60,60", "device": "cpu"}
        waiting = _submit(api, "segment-volume/on-demand", params)
        deadline = time.time() + 60
        while time.time() < deadline:
            run = api_call("GET", f"{api}/flow_runs/{waiting}").json()
            if run["state"]["name"] == NOT_SERVED:
                break
            time.sleep(0.5)
        assert run["state"]["name"] == NOT_SERVED, run["state"]
        assert run["state"]["message"].startswith("segflow serve stopped at")
        page.goto(f"{ui}/runs/flow-run/{waiting}")
        badge = page.get_by_text(NOT_SERVED, exact=True).first
        badge.wait_for()
        page.get_by_text("Details", exact=True).first.click()  # its "State Message"
        page.get_by_text("segflow serve stopped at", exact=False).first.wait_for()
        _shot(page, shots, "pause-2-run-not-served")
        page.goto(f"{ui}/deployments/deployment/{nightly['id']}")
        page.get_by_text("Description", exact=True).first.click()
        page.get_by_text("NOT SERVED since", exact=False).first.wait_for()
        _shot(page, shots, "pause-3-deployment-not-served")

        served["start_serve"]()
        deadline = time.time() + 120
        while time.time() < deadline:
            dep = api_call("GET", f"{api}/deployments/{nightly['id']}").json()
            if not dep["description"].startswith("NOT SERVED"):
                break
            time.sleep(1)
        assert not dep["description"].startswith("NOT SERVED"), dep["description"]
        assert dep["schedules"][0]["active"] is False  # still off after the restart
        assert dep["paused"] is True
        page.goto(f"{ui}/deployments/deployment/{nightly['id']}")
        toggle = page.locator("[role=switch]").first
        toggle.wait_for()
        assert toggle.get_attribute("aria-checked") == "false"
        _shot(page, shots, "pause-4-still-off-after-restart")
        browser.close()
    upcoming = api_call(
        "POST",
        f"{api}/flow_runs/filter",
        json={
            "flow_runs": {"deployment_id": {"any_": [nightly["id"]]}},
            "sort": "EXPECTED_START_TIME_DESC",
        },
    ).json()
    assert not [r for r in upcoming if r["auto_scheduled"] and r["state"]["type"] == "SCHEDULED"]
    run = wait_state(api, waiting, FINAL, 120)  # the waiting run runs once serve is back
    assert run["state"]["type"] == "COMPLETED", (tmp / "serve.log").read_text()[-3000:]
