"""segflow on a real SLURM: workers are batch jobs; outputs equal a local run bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from segflow_cli import INGEST, SEGMENT, last_json, segflow

pytestmark = pytest.mark.slow

JOBS = ("--cluster", "slurm", "--workers", "2", "--worker-memory", "2GB", "--walltime", "10:00")
ARRAYS = ("0", "labels/semantic/0", "labels/instances/0")


def assert_same_outputs(store: Path, reference: Path, arrays=ARRAYS) -> None:
    for name in arrays:
        got = zarr.open_array(str(store / name), mode="r")[...]
        want = zarr.open_array(str(reference / name), mode="r")[...]
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)


def new_jobs(slurm, before: set[str]) -> list[dict[str, str]]:
    return [j for j in slurm.jobs() if j["id"] not in before]


def test_ingest_segment_stitch_on_slurm_equal_a_local_run(slurm, inputs, reference, tmp_path):
    before = {j["id"] for j in slurm.jobs()}
    img = tmp_path / "volume.ome.zarr"
    env = slurm.env
    segflow("ingest", inputs["tif"], img, *INGEST, *JOBS, "-q", env=env)
    seg = last_json(
        segflow("segment", img, "-m", inputs["model"], *SEGMENT, *JOBS, "--json", env=env)
    )
    stitched = last_json(segflow("stitch", img, *JOBS, "--json", env=env))

    assert seg["blocks_computed"] == seg["blocks_total"] == 64
    assert_same_outputs(img, reference)
    assert stitched["objects"] > 1
    table = Path(stitched["table_csv"])
    assert table.read_text() == (reference.parent / "volume.instances.csv").read_text()

    # SLURM's own records: every command ran its blocks in segflow-worker batch jobs, which
    # were all ended (cancelled) when the command finished.
    jobs = new_jobs(slurm, before)
    assert len(jobs) >= 3, jobs
    assert {j["name"] for j in jobs} == {"segflow-worker"}
    assert {j["state"] for j in jobs} <= {"CANCELLED", "COMPLETED"}, jobs
    assert not slurm.queue()
    controller = (slurm.logs / "slurmctld.log").read_text()
    daemon = (slurm.logs / "slurmd.log").read_text()
    joined = 0
    for job in jobs:
        assert f"JobId={job['id']}" in controller
        assert f"job {job['id']}" in daemon or f"JobId={job['id']}" in daemon
        log = (slurm.worker_logs / f"segflow-worker-{job['id']}.err").read_text()
        joined += "Registered to:" in log  # its Dask worker joined (else: released early)
    assert joined >= 3


def test_a_worker_job_cancelled_mid_run_does_not_fail_it(slurm, inputs, reference, tmp_path):
    """``scancel`` of a worker job once the first block is written: its blocks run again
    on the other worker (and on the replacement job); the result is the same."""
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "segflow",
            "segment",
            str(reference),
            "-m",
            str(inputs["model"]),
            "--out",
            str(out),
            *SEGMENT,
            *JOBS,
            "-q",
            "--json",
        ],
        env=slurm.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    chunks = out / "labels" / "semantic" / "0"
    deadline = time.monotonic() + 240
    try:
        while not any(p.is_file() for p in chunks.glob("c/**/*")):
            assert proc.poll() is None, f"the run ended before its first block: {proc.stderr}"
            assert time.monotonic() < deadline, "no block was written within 240 s"
            time.sleep(0.05)
        written = sum(p.is_file() for p in chunks.glob("c/**/*"))
        running = [j for j in slurm.queue() if j["state"] == "RUNNING"]
        victim = running[0]["id"]
        slurm.run("scancel", victim)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert written < summary["blocks_total"] == summary["blocks_computed"] == 64
    assert_same_outputs(out, reference, arrays=("labels/semantic/0",))
    states = {j["id"]: j["state"] for j in slurm.jobs()}
    assert states[victim] == "CANCELLED"
    log = (slurm.worker_logs / f"segflow-worker-{victim}.err").read_text()
    assert f"JOB {victim} ON" in log
    assert "CANCELLED" in log


def test_no_worker_within_the_start_timeout_is_one_sentence(slurm, inputs, tmp_path):
    before = {j["id"] for j in slurm.jobs()}
    cmd = [sys.executable, "-m", "segflow", "ingest", str(inputs["tif"]), str(tmp_path / "a")]
    pending = subprocess.run(
        [*cmd, "--cluster", "slurm", "--partition", "down", "--start-timeout", "3", "-q"],
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pending.returncode == 1
    lines = pending.stderr.strip().splitlines()
    assert len(lines) == 1, pending.stderr
    (job,) = new_jobs(slurm, before)
    assert lines[0] == (
        f"segflow: error: no SLURM worker started within 3 s (job {job['id']} cancelled; "
        f"logs in {slurm.worker_logs}): check the partition/account and that the queue runs jobs"
    )
    assert job["state"] == "CANCELLED"

    rejected = subprocess.run(
        [*cmd, "--cluster", "slurm", "--partition", "nosuch", "-q"],
        env=slurm.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rejected.returncode == 1
    assert rejected.stderr.count("\n") == 1
    assert "Traceback" not in rejected.stderr
    assert "the SLURM worker job was not submitted" in rejected.stderr
    assert "invalid partition" in rejected.stderr.lower()
