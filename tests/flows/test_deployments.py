"""Deployments served by `segflow serve` against a real `prefect server` on 127.0.0.1."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import numpy as np
import pytest
import zarr
from served_stack import (
    BIN,
    api_call,
    retry_run,
    run_artifacts,
    run_logs,
    serve_stack,
    task_runs,
    wait_ok,
    wait_state,
)

from tasks.blockwise import Markers
from tasks.store import write_image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serve_stack(tmp_path_factory.mktemp("served")) as stack:
        yield stack


def test_deployments_schema_and_nightly_schedule(served):
    api = served["api"]
    dep = api_call("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    schema = dep["parameter_openapi_schema"]
    assert dep["enforce_parameter_schema"] is True
    props = schema["properties"]
    assert list(props)[:3] == ["source", "model", "output"]
    assert props["batch_size"]["minimum"] == 1
    assert props["batch_size"]["maximum"] == 256
    assert props["connectivity"]["maximum"] == 3
    assert set(props["device"]["enum"]) == {"auto", "cpu", "cuda"}
    assert "description" in props["source"]
    nightly = wait_ok(f"{api}/deployments/name/nightly-inbox/nightly").json()
    sched = nightly["schedules"][0]["schedule"]
    assert sched["cron"] == "0 2 * * *"
    assert sched["timezone"] == "Europe/Berlin"
    assert nightly["parameters"]["inbox"].endswith("inbox")
    assert nightly["parameters"]["settle_s"] == 600.0
    names = [a["name"] for a in api_call("POST", f"{api}/automations/filter", json={}).json()]
    assert names.count("segflow: mark runs without heartbeats Crashed") == 1
    train = wait_ok(f"{api}/deployments/name/train-model/train-on-demand").json()
    assert list(train["parameter_openapi_schema"]["properties"])[:3] == ["images", "labels", "out"]


def test_deployments_have_distinct_names_and_say_when_and_in_which_zone(served):
    api = served["api"]
    deployments = api_call("POST", f"{api}/deployments/filter", json={}).json()
    names = [d["name"] for d in deployments]
    assert len(names) == len(set(names)) == 3, names
    nightly = next(d for d in deployments if d["name"] == "nightly")
    assert "every day at 02:00 Europe/Berlin time" in nightly["description"]
    for d in deployments:  # the served schema is the run form: no union toggles
        for name, prop in d["parameter_openapi_schema"]["properties"].items():
            assert "anyOf" not in prop, (d["name"], name)


def test_runs_created_as_the_ui_creates_them_are_named_as_promised(served):
    """The UI's form posts the name it pre-filled (or one typed over it): a made-up name
    becomes the volume and the facility's time (serve --timezone Europe/Berlin), a typed
    one is kept, and so is the volume + time for a run the server named."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    api = served["api"]
    dep = api_call("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    # no such file: each run fails at its first check, after it was named
    source = str(served["tmp"] / "missing" / "brain-01.tif")
    ids = {}
    for name in ("iota12-praxis-manifold", "psi-pauling-g", "cancel-drill", None):
        body: dict = {"parameters": {"source": source, "model": served["model"]}}
        if name:
            body["name"] = name
        r = api_call("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json=body)
        assert r.status_code == 201, r.text
        ids[name] = r.json()["id"]
    for name, run_id in ids.items():
        run = wait_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"}, 240)
        berlin = datetime.now(ZoneInfo("Europe/Berlin")).replace(tzinfo=None)
        if name == "cancel-drill":
            assert run["name"] == "cancel-drill"
            continue
        stamp = re.fullmatch(r"brain-01-(\d{6}-\d{6})", run["name"])
        assert stamp, (name, run["name"])
        named_at = datetime.strptime(stamp[1], "%y%m%d-%H%M%S")
        assert abs((berlin - named_at).total_seconds()) < 600, (run["name"], berlin)


def test_out_of_bounds_parameter_is_rejected_by_the_server(served):
    api = served["api"]
    dep = api_call("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    bad = {"source": "x.ome.zarr", "model": "m.ckpt", "batch_size": 0}
    r = api_call("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": bad})
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
    dep = api_call("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
    params = {
        "source": src,
        "model": served["model"],
        "tile": "1,60,60",
        "device": "cpu",
        "instances": True,
    }
    r = api_call(
        "POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}
    )
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    deadline = time.time() + 300
    state = None
    while time.time() < deadline:
        run = api_call("GET", f"{api}/flow_runs/{run_id}").json()
        state = run["state"]["type"]
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(2)
    assert state == "COMPLETED", (state, (tmp / "serve.log").read_text()[-3000:])
    assert run["name"].startswith("vol-")
    assert {"segflow", "vol"} <= set(run["tags"])
    root = zarr.open_group(src, mode="r")
    assert root["labels/semantic/0"].shape == (4, 64, 64)
    assert root["labels/instances"].attrs["segflow"]["complete"] is True


def _start(api: str, deployment: str, params: dict) -> str:
    dep = wait_ok(f"{api}/deployments/name/{deployment}").json()
    r = api_call(
        "POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_a_failed_run_retried_after_the_fix_keeps_its_failure_record_and_one_progress_card(
    served,
):
    """A damaged chunk fails its region (one sentence in the logs, no traceback); retried
    after the chunk is repaired (what the UI's Retry does), the run completes, and its
    artifacts hold the failure record of the first attempt, the report of the second and
    one progress card saying 100%. The logs (what the UI shows) hold the run's summary
    lines and Prefect's lifecycle lines."""
    api, tmp = served["api"], served["tmp"]
    src = tmp / "damaged.ome.zarr"
    data = (np.random.default_rng(3).random((4, 64, 64)) * 255).astype(np.uint8)
    write_image(str(src), data, "zyx", chunks=(2, 32, 32))
    chunk = next(p for p in (src / "0").rglob("*") if p.is_file() and "c" in p.parts)
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    params = {
        "source": str(src),
        "model": served["model"],
        "tile": "1,60,60",
        "device": "cpu",
        "max_regions": 4,
        "region_retries": 0,
    }
    run_id = _start(api, "segment-volume/on-demand", params)
    failed = wait_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
    assert failed["state"]["type"] == "FAILED", (tmp / "serve.log").read_text()[-3000:]
    assert "failed" in failed["state"]["message"]
    logs = run_logs(api, run_id, until="Finished in state")
    text = "\n".join(logs)
    assert "Traceback" not in text, text[-3000:]
    assert any("to compute, 0 already done" in m for m in logs), text[-3000:]
    chunk.write_bytes(good)
    done = retry_run(api, run_id, 300)
    assert done["state"]["type"] == "COMPLETED", (tmp / "serve.log").read_text()[-3000:]
    artifacts = run_artifacts(api, run_id)
    keys = sorted(a["key"] for a in artifacts if a["type"] == "markdown")
    assert keys == ["segflow-failed-damaged", "segflow-report-damaged"], keys
    record = next(a for a in artifacts if a["key"] == "segflow-failed-damaged")
    assert "## Failed regions (" in record["data"]
    assert "could not be decoded" in record["data"] or "chunk" in record["data"]
    assert "attempt 1" in record["description"]
    progress = [a for a in artifacts if a["type"] == "progress"]
    assert len(progress) == 1, progress
    assert progress[0]["data"] == 100.0
    assert progress[0]["description"].startswith("**100%** of regions done: 4 of 4")
    logs = run_logs(api, run_id, until="Finished in state Completed")
    assert any("blocks computed," in m and "reused" in m for m in logs), logs[-20:]
    assert any(m.startswith("Finished in state Completed") for m in logs), logs[-20:]


def test_a_nightly_run_with_a_corrupt_volume_fails_with_one_message_and_no_traceback(served):
    api, tmp = served["api"], served["tmp"]
    inbox = tmp / "inbox-corrupt"
    inbox.mkdir()
    (inbox / "c.tif").write_bytes(b"II*\x00" + b"\x00" * 20)  # a truncated TIFF
    run_id = _start(
        api,
        "nightly-inbox/nightly",
        {"inbox": str(inbox), "output": str(tmp / "results-corrupt"), "settle_s": 0},
    )
    run = wait_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED"}, 300)
    assert run["state"]["type"] == "FAILED", (tmp / "serve.log").read_text()[-3000:]
    assert run["state"]["message"] == f"1 of 1 volumes failed: {inbox / 'c.tif'}"
    logs = run_logs(api, run_id, until="Finished in state")
    text = "\n".join(logs)
    assert "Traceback" not in text, text
    assert "Unexpected result" not in text, text
    assert any(m.startswith("Finished in state Failed") for m in logs), text


def test_one_field_of_the_nightly_run_is_set_from_the_command_line(served):
    """`prefect deployment run ... --param settle_s=0` changes one field, keeps the rest."""
    env = {**os.environ, "PREFECT_API_URL": served["api"]}
    out = subprocess.run(
        [
            str(BIN / "prefect"),
            "deployment",
            "run",
            "nightly-inbox/nightly",
            "--param",
            "settle_s=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = out.stdout.split("UUID:")[1].split()[0]
    run = api_call("GET", f"{served['api']}/flow_runs/{run_id}").json()
    assert run["parameters"]["settle_s"] == 0
    assert run["parameters"]["inbox"].endswith("inbox")


def test_killed_serve_process_leaves_a_crashed_run_that_retries_only_unfinished_work(
    tmp_path,
):
    """SIGKILL of `segflow serve` mid-run: the run is Crashed within crash_after_s (+ the
    server's evaluation delay); retried (what the UI's Retry does) after serve restarts, it
    computes only the blocks that had no marker."""
    with serve_stack(tmp_path, "--crash-after", "45") as stack:
        api = stack["api"]
        src = str(tmp_path / "big.ome.zarr")
        rng = np.random.default_rng(1)
        write_image(
            src, (rng.random((24, 128, 128)) * 255).astype(np.uint8), "zyx", chunks=(1, 64, 64)
        )
        dep = api_call("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
        params = {
            "source": src,
            "model": stack["model"],
            "tile": "1,60,60",
            "device": "cpu",
            "instances": False,
            "max_regions": 48,
            "regions_in_flight": 1,
        }
        r = api_call(
            "POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}
        )
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        wait_state(api, run_id, {"RUNNING"}, 180)
        markers = tmp_path / "big.ome.zarr"
        deadline = time.time() + 180
        while time.time() < deadline:  # let a few regions finish, then kill
            m = Markers.open(src, "segment-semantic")
            if m is not None and int(m.done_mask().sum()) >= 4:
                break
            time.sleep(0.5)
        os.killpg(stack["serve"].pid, signal.SIGKILL)
        killed = time.time()
        done_before = int(Markers.open(src, "segment-semantic").done_mask().sum())
        assert done_before < 96, "the run finished before it was killed"
        crashed = wait_state(api, run_id, {"CRASHED"}, 300)
        to_crashed = time.time() - killed
        print(f"kill to Crashed: {to_crashed:.0f} s")
        assert "heartbeat" in crashed["state"]["message"]
        (tmp_path / "kill_to_crashed_s.txt").write_text(f"{to_crashed:.1f}\n")
        stack["start_serve"]()
        wait_ok(f"{api}/deployments/name/segment-volume/on-demand")
        done = retry_run(api, run_id, 400)
        assert done["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        report = api_call(
            "POST",
            f"{api}/artifacts/filter",
            json={"artifacts": {"key": {"any_": ["segflow-report-big"]}}},
        ).json()
        assert len([a for a in report if a["flow_run_id"] == run_id]) == 1
        text = report[0]["data"]
        computed = int(text.split("| regions computed | ")[1].split(" ")[0])
        assert computed < 48  # finished regions were not recomputed
        assert markers.exists()
        # what the killed attempt left running is Crashed, not Running beside the retry's
        states = {(t["flow_run_run_count"], t["state"]["type"]) for t in task_runs(api, run_id)}
        assert not {s for _, s in states} & {"RUNNING", "PENDING"}, states
        assert {s for n, s in states if n > 1} == {"COMPLETED"}, states
        for t in task_runs(api, run_id):
            if t["state"]["type"] == "CRASHED":
                assert t["flow_run_run_count"] == 1
                assert "its process died" in t["state"]["message"]
