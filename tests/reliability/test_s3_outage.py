"""An S3 outage mid-run: the server goes away for a few seconds and comes back.

How the outage is made: the test runs its own moto server (``ThreadedMotoServer``) in this
process on a fixed port. Stopping it and closing its listening socket makes the endpoint
refuse connections (``ThreadedMotoServer.stop`` alone leaves the socket bound, so clients
would hang in the backlog instead); a new server on the same port then serves the *same*
buckets and objects, because moto keeps its state in process-wide backends, not in the
server object. So the outage is real (connection refused for the run) and nothing stored
before it is lost, which is what a real S3 outage looks like.

The run is ``segflow segment`` of an image on S3 into an output store on S3, with its
blocks slowed down (``SEGFLOW_TEST_BLOCK_DELAY``); the outage starts once a few blocks are
marked. The run either completes by itself, bitwise equal to a clean run, or fails with
one sentence (exit status 4, storage) and a re-run completes it, bitwise equal.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import tifffile
from harness import ROOT, assert_same_store, blobs, cli, make_model, one_sentence, segflow_argv
from moto.server import ThreadedMotoServer

from segflow.errors import ExitCode
from tasks.blockwise import DELAY_ENV, Markers
from tasks.ingest import ingest_volume

OUTAGE_S = 4.0
SEGMENT = ["--chunks", "2,16,16", "--tile", "1,64,64", "--device", "cpu", "-q"]


@dataclass
class RestartableS3:
    port: int
    server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # type: ignore[union-attr]  # refuse connections
            self.server = None


@pytest.fixture
def restartable_s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[RestartableS3]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    s3 = RestartableS3(port)
    s3.start()
    for name, value in {
        "AWS_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    try:
        yield s3
    finally:
        s3.stop()


def marked(bucket: str, prefix: str) -> int:
    """Marker objects (one per marked block) under ``prefix``; 0 while S3 is down."""
    client = boto3.client("s3", region_name="us-east-1")
    try:
        listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)
    except Exception:
        return 0
    return int(listing.get("KeyCount", 0))


@pytest.mark.slow
def test_s3_outage_mid_run(tmp_path: Path, restartable_s3: RestartableS3) -> None:
    bucket = "outage"
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=bucket)
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, blobs((8, 32, 32), 5), metadata={"axes": "ZYX"})
    image = f"s3://{bucket}/v.ome.zarr"
    ingest_volume(str(tif), image, chunks=(2, 16, 16))
    model = make_model(tmp_path / "m.ckpt", 1)
    reference = tmp_path / "ref.zarr"
    clean = cli("segment", image, "-m", model, "--out", reference, *SEGMENT)
    assert clean.returncode == 0, clean.stderr

    out = f"s3://{bucket}/out.zarr"
    log = tmp_path / "outage.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            segflow_argv("segment", image, "-m", model, "--out", out, *SEGMENT),
            cwd=ROOT,
            env={**os.environ, DELAY_ENV: "0.3"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 240
            while marked(bucket, "out.zarr/segflow-done/segment-semantic/c/") < 2:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.02)
            restartable_s3.stop()
            down = time.monotonic()
            time.sleep(OUTAGE_S)
            still_running = proc.poll() is None
            restartable_s3.start()
            print(f"outage of {time.monotonic() - down:.1f} s; run alive: {still_running}")
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = log.read_text()
    if proc.returncode == 0:
        outcome = "completed by itself"
    else:
        sentence = one_sentence(stderr)
        assert proc.returncode == ExitCode.STORAGE, stderr
        assert out in sentence or image in sentence, sentence
        again = cli("segment", image, "-m", model, "--out", out, *SEGMENT)
        assert again.returncode == 0, again.stderr
        outcome = f"failed with {sentence!r}, re-run completed"
    print("S3 outage:", outcome)
    markers = Markers.open(out, "segment-semantic")
    assert markers is not None
    assert markers.all_done()
    assert_same_store(out, str(reference))
