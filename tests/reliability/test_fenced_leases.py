"""Nothing mixed: fenced leases between real processes.

Each case once ended with two runs writing the same labels and both exiting 0: a run
suspended past its lease's time to live, a holder whose clock is minutes behind, a torn
lease file read as "no lease", a finished run's release that let the loser's heartbeat
write its lease back. Leases are tested on a local store and on S3 (moto's server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from harness import ROOT, blobs, cli, make_model, segflow_argv

from segflow.errors import ExitCode
from tasks.blockwise import DELAY_ENV, Markers
from tasks.lease import LEASE_FILE, Lease, read_raw
from tasks.store import filesystem, join, write_image
from unet_core.errors import LeaseHeldError

ARGS = ("--tile", "1,64,64", "--chunks", "2,32,32", "--device", "cpu", "--mode", "fast", "-q")
TTL = {"SEGFLOW_LEASE_TTL_S": "2"}


def child(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A Python process running ``code`` (argv[1:] = ``args``) in this checkout."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stores(tmp_path: Path, bucket: str) -> list[str]:
    return [str(tmp_path / "lease.zarr"), f"s3://{bucket}/lease.zarr"]


def test_a_run_suspended_past_its_lease_stops_and_never_mixes_labels(tmp_path):
    """Run A (model a) is stopped mid-run for longer than its lease lives; run B (model b)
    takes the store over and finishes; A, continued, finds its lease superseded: it writes
    nothing more, exits non-zero, and the labels are B's (or, had A's write raced the
    takeover, marked incomplete) — never a mix marked complete."""
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, blobs((8, 64, 64), 1), "zyx", chunks=(2, 32, 32))
    a, b = make_model(tmp_path / "a.ckpt", 1), make_model(tmp_path / "b.ckpt", 2)
    out = tmp_path / "out.zarr"
    first = subprocess.Popen(
        segflow_argv("segment", src, "-m", a, "--out", out, *ARGS),
        cwd=ROOT,
        env={**os.environ, **TTL, DELAY_ENV: "0.7"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def started() -> bool:
            m = Markers.open(str(out), "segment-semantic")
            return m is not None and m.count() >= 2

        wait_for(started, what="run A's first blocks")
        os.kill(first.pid, signal.SIGSTOP)
        second = cli("segment", src, "-m", b, "--out", out, *ARGS, "--lease-wait-s", "60", env=TTL)
        assert second.returncode == 0, second.stderr
        assert "taking over the lease" in second.stderr or second.stderr == ""
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert first.returncode == ExitCode.CONFLICT, err
    assert "lost its lease" in err
    assert "Traceback" not in err
    reference = tmp_path / "ref.zarr"
    assert cli("segment", src, "-m", b, "--out", reference, *ARGS).returncode == 0
    group = zarr.open_group(str(out), mode="r")["labels/semantic"]
    if group.attrs["segflow"]["complete"]:
        expected = zarr.open_group(str(reference), mode="r")["labels/semantic/0"][...]
        assert np.array_equal(group["0"][...], expected)
    # the lease stays B's released generation: A's heartbeat never wrote it back
    info = Lease(str(out)).read()
    assert info is not None
    assert info.released
    assert info.generation == 2


SKEWED = """
import sys, time
real = time.time
time.time = lambda: real() - 120  # this machine's clock is two minutes behind
from tasks.lease import Lease
lease = Lease(sys.argv[1], "skewed", ttl_s=2.0).acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lease.release()
"""


def test_a_live_holder_with_a_clock_behind_keeps_its_lease(tmp_path, s3_bucket):
    """Expiry is judged by watching the heartbeat move, never by comparing the holder's
    written times with the reader's clock."""
    for store in stores(tmp_path, s3_bucket):
        holder = child(SKEWED, store, "12")
        try:
            assert holder.stdout.readline().strip() == "held", holder.stderr.read()
            t0 = time.monotonic()
            with pytest.raises(LeaseHeldError, match="skewed run"):
                Lease(store, "second", ttl_s=2.0, wait_s=5.0).acquire()
            assert time.monotonic() - t0 >= 4.5  # it watched, the beat moved
        finally:
            holder.kill()
            holder.wait()


def test_an_abandoned_lease_with_a_clock_ahead_is_taken_over_after_its_ttl(tmp_path, s3_bucket):
    for store in stores(tmp_path, s3_bucket):
        gone = Lease(store, "gone", ttl_s=1.5)
        gone.holder = "a-run-on-another-machine"
        info = gone._info(3, 7)
        # written by a machine whose clock is an hour ahead, which then died
        from dataclasses import replace

        gone._put(replace(info, host="elsewhere", heartbeat=time.time() + 3600))
        t0 = time.monotonic()
        with Lease(store, "taker", ttl_s=1.5, wait_s=10.0) as taker:
            assert time.monotonic() - t0 >= 1.4
            assert taker.read().holder == taker.holder
            assert taker.read().generation == 4


TORN = """
import os, sys, time
path = sys.argv[1]
for i in range(400):
    with open(path, "w") as f:
        f.write('{"holder": "torn %d' % i)
    time.sleep(0.1)
"""


def test_a_torn_lease_counts_as_held_until_it_stays_unchanged_for_the_ttl(tmp_path, s3_bucket):
    for store in stores(tmp_path, s3_bucket):
        fs = filesystem(store)
        fs.makedirs(store, exist_ok=True)
        fs.pipe(join(store, LEASE_FILE), b'{"holder": "tor')
        t0 = time.monotonic()
        with Lease(store, "after a torn file", ttl_s=1.5) as lease:
            assert time.monotonic() - t0 >= 1.4, "a torn lease was taken at once"
            assert lease.read().holder == lease.holder
    # a torn file that keeps changing (a writer is there) is never taken
    store = str(tmp_path / "busy.zarr")
    os.makedirs(store)
    writer = child(TORN, os.path.join(store, LEASE_FILE))
    try:
        wait_for(lambda: read_raw(store) is not None, what="the torn writer")
        with pytest.raises(LeaseHeldError, match="unreadable lease"):
            Lease(store, "second", ttl_s=1.0, wait_s=4.0).acquire()
    finally:
        writer.kill()
        writer.wait()


HOLD = """
import os, sys, time
from tasks.lease import Lease
lease = Lease(sys.argv[1], "first", ttl_s=1.0).acquire()
print(lease.generation, flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
time.sleep(1.5)  # a few heartbeats after being continued
lease.release()
print("released", flush=True)
"""


def test_a_superseded_holder_neither_renews_nor_releases_the_new_generation(tmp_path):
    store = str(tmp_path / "s.zarr")
    go = tmp_path / "go"
    first = child(HOLD, store, str(go))
    try:
        assert first.stdout.readline().strip() == "1", first.stderr.read()
        os.kill(first.pid, signal.SIGSTOP)
        with Lease(store, "second", ttl_s=1.0, wait_s=10.0) as second:
            assert second.generation == 2
            os.kill(first.pid, signal.SIGCONT)
            go.touch()
            assert first.stdout.readline().strip() == "released"
            now = second.read()
            assert (now.holder, now.generation, now.released) == (second.holder, 2, False)
        # the finisher released its own generation; the loser's heartbeat wrote nothing back
        time.sleep(1.0)
        final = Lease(store).read()
        assert final.released
        assert final.generation == 2
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.kill()
        first.wait()
