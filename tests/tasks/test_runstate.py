"""Run state: leases between real processes, image identity, ownership, completeness and
missing data — each a case where an earlier segflow exited 0 with wrong or lost results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr

from tasks.blockwise import DELAY_ENV, Markers, Runner, Step
from tasks.ingest import ingest_volume
from tasks.instances import stitch
from tasks.lease import LEASE_FILE, Lease
from tasks.outputs import write_file
from tasks.reads import ChunkCache, StrictArray
from tasks.segment import SegmentParams, segment_image
from tasks.store import every_chunk, write_image
from unet_core import CheckpointMeta, Normalization, UNet, UNetConfig, save_checkpoint
from unet_core.errors import (
    BlockError,
    IncompleteError,
    MissingDataError,
)

ROOT = Path(__file__).resolve().parents[2]


def make_model(path, seed=0):
    torch.manual_seed(seed)
    model = UNet(UNetConfig(ndim=2, base_channels=4, depth=2, n_classes=2))
    save_checkpoint(path, model, CheckpointMeta(normalization=Normalization(kind="zscore")))
    return str(path)


def blobs(shape, seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 2)
    return (smooth * 60000).astype(np.uint16)


def cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "segflow", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        **kw,
    )


def labels(store, name="semantic"):
    return zarr.open_group(str(store), mode="r")[f"labels/{name}/0"][...]


def params(**kw):
    # fast mode: blocks are the chunks asked for (the invariant mode may widen them)
    base = {"device": "cpu", "chunks": (4, 32, 32), "tile": (1, 64, 64), "mode": "fast"}
    return SegmentParams(**{**base, **kw})


@pytest.fixture
def volume(tmp_path):
    data = blobs((8, 64, 64), 1)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, data, "zyx", chunks=(4, 32, 32))
    return src, data


# ------------------------------------------------------------------------------- leases


def test_a_second_run_on_the_same_outputs_refuses_naming_the_holder(tmp_path, volume):
    src, _ = volume
    a, b = make_model(tmp_path / "a.ckpt", 1), make_model(tmp_path / "b.ckpt", 2)
    out = tmp_path / "out.zarr"
    args = ["--chunks", "8,64,32", "--tile", "1,64,64", "--device", "cpu", "--fast", "-q"]
    first = subprocess.Popen(
        [sys.executable, "-m", "segflow", "segment", src, "-m", a, "--out", out, *args],
        cwd=ROOT,
        env={**os.environ, DELAY_ENV: "20"},  # two blocks, running for 20 s
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "segflow-lease.json").exists():
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = cli("segment", src, "-m", b, "--out", out, *args)
        assert first.poll() is None, "the first run ended before the second one asked"
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert second.returncode != 0
    message = second.stderr.strip()
    assert "another segflow run is writing these outputs" in message
    assert f"pid {first.pid}" in message
    assert "Traceback" not in second.stderr
    # The outputs are model a's alone, all marked under a's key.
    reference = tmp_path / "ref.zarr"
    assert cli("segment", src, "-m", a, "--out", reference, *args).returncode == 0
    assert np.array_equal(labels(out), labels(reference))
    assert Lease(str(out)).read().released  # released by its holder, generations kept


def test_the_lease_of_a_killed_run_is_taken_over_and_the_work_resumes(tmp_path, volume):
    src, _ = volume
    model = make_model(tmp_path / "m.ckpt", 3)
    out = tmp_path / "out.zarr"
    args = ["--chunks", "4,32,32", "--tile", "1,64,64", "--device", "cpu", "--fast", "-q"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "segflow", "segment", src, "-m", model, "--out", out, *args],
        cwd=ROOT,
        env={**os.environ, DELAY_ENV: "0.5"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            markers = Markers.open(str(out), "segment-semantic")
            if markers is not None and markers.count() >= 2:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    done_at_kill = Markers.open(str(out), "segment-semantic").count()
    assert (out / "segflow-lease.json").exists()  # left behind by the dead run
    again = cli("segment", src, "-m", model, "--out", out, *args, "--json")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["blocks_skipped"] == done_at_kill
    assert summary["blocks_computed"] == summary["blocks_total"] - done_at_kill
    reference = tmp_path / "ref.zarr"
    assert cli("segment", src, "-m", model, "--out", reference, *args).returncode == 0
    assert np.array_equal(labels(out), labels(reference))


def test_lease_is_exclusive_between_processes_and_expires(tmp_path, s3_bucket):
    take = (
        "import sys; from tasks.lease import Lease; from unet_core.errors import SegflowError\n"
        "try:\n    Lease(sys.argv[1], 'second').acquire()\n"
        "except SegflowError as e:\n    print(e); sys.exit(3)\n"
    )
    for store in (str(tmp_path / "s.zarr"), f"s3://{s3_bucket}/s.zarr"):
        with Lease(store, "first", ttl_s=5.0) as lease:
            info = lease.read()
            assert info is not None
            assert info.pid == os.getpid()
            other = subprocess.run(
                [sys.executable, "-c", take, store],
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=120,
            )
            assert other.returncode == 3, other.stderr
            assert f"first run {lease.holder[:8]}" in other.stdout
            assert f"pid {os.getpid()}" in other.stdout
        released = Lease(store).read()
        assert released.released
        assert released.generation == 1
        # a lease whose heartbeat stopped (unchanged for its ttl, as this process watches
        # it) is taken over, one generation up
        stale = Lease(store, "stale", ttl_s=0.5)
        stale.holder = "dead-run"
        stale._put(stale._info(7, 0))
        time.sleep(0.7)
        with Lease(store, "taker", ttl_s=5.0) as taker:
            assert taker.read().holder == taker.holder
            assert taker.read().generation == 8


def test_runs_racing_for_a_new_lease_get_exactly_one_holder(tmp_path):
    """Four processes take the lease of a store that has none at the same instant (the
    local fast path: an atomic create, no write-and-verify pause): one wins, three are
    refused naming it. A torn lease file is no lease: it is taken over."""
    store = str(tmp_path / "race.zarr")
    # the create step itself never replaces a lease that is there
    first, second = Lease(store, "first"), Lease(store, "second")
    second.holder = "another-run"
    assert first._create(first._info(1, 0)) is True
    assert second._create(second._info(1, 0)) is False
    assert Lease(store).read().holder == first.holder
    os.unlink(os.path.join(store, LEASE_FILE))
    release = tmp_path / "release"
    race = (
        "import os, sys, time; from tasks.lease import Lease\n"
        "from unet_core.errors import SegflowError\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "try:\n    lease = Lease(sys.argv[1], 'racer').acquire()\n"
        "except SegflowError:\n    print('refused'); sys.exit(0)\n"
        "print('won', flush=True)\n"
        "deadline = time.time() + 120\n"
        "while not os.path.exists(sys.argv[3]) and time.time() < deadline:\n"
        "    time.sleep(0.1)\n"
        "lease.release()\n"
    )
    start = f"{time.time() + 6:.3f}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", race, store, start, str(release)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(4)
    ]
    # the winner holds the lease until the others have answered (however slowly they start)
    deadline = time.time() + 120
    while sum(p.poll() is not None for p in procs) < 3 and time.time() < deadline:
        time.sleep(0.1)
    release.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert sorted(out.strip() for out, _ in outs) == ["refused"] * 3 + ["won"], outs
    assert Lease(store).read().released


# -------------------------------------------------------------------------- run identity


def test_a_changed_image_with_the_same_statistics_is_recomputed(tmp_path):
    data = blobs((6, 64, 64), 4)
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, data, metadata={"axes": "ZYX"})
    store = str(tmp_path / "v.ome.zarr")
    model = make_model(tmp_path / "m.ckpt", 5)
    ingest_volume(str(tif), store, chunks=(2, 32, 32))
    first = segment_image(store, model, params=params(chunks=(2, 32, 32)))
    assert first.blocks_computed == first.blocks_total
    # the same stack flipped: the same histogram, so the same statistics
    tifffile.imwrite(tif, data[:, ::-1].copy(), metadata={"axes": "ZYX"})
    ingest_volume(str(tif), store, chunks=(2, 32, 32), refresh=True)
    second = segment_image(store, model, params=params(chunks=(2, 32, 32)))
    assert second.blocks_computed == second.blocks_total
    fresh = str(tmp_path / "fresh.ome.zarr")
    ingest_volume(str(tif), fresh, chunks=(2, 32, 32))
    segment_image(fresh, model, params=params(chunks=(2, 32, 32)))
    assert np.array_equal(labels(store), labels(fresh))
    # unchanged content written anew (a new mtime): re-ingested, and the labels reused
    tifffile.imwrite(tif, data[:, ::-1].copy(), metadata={"axes": "ZYX"})
    ingest_volume(str(tif), store, chunks=(2, 32, 32), refresh=True)
    third = segment_image(store, model, params=params(chunks=(2, 32, 32)))
    assert third.blocks_computed == 0


def test_equivalent_parameters_share_a_key(tmp_path, volume):
    src, _ = volume
    model = make_model(tmp_path / "m.ckpt", 6)
    out = str(tmp_path / "o.zarr")
    implicit = SegmentParams(device="cpu", tile=(1, 64, 64), mode="fast")
    explicit = SegmentParams(
        device="cpu", tile=(1, 64, 64), chunks=(4, 32, 32), channel=0, mode="fast"
    )
    assert segment_image(src, model, out, implicit).blocks_computed > 0
    assert segment_image(src, model, out, explicit).blocks_computed == 0
    other = SegmentParams(device="cpu", tile=(1, 64, 64), chunks=(4, 16, 16), mode="fast")
    assert segment_image(src, model, out, other).blocks_computed > 0


def test_a_run_resumed_by_a_version_that_computes_tiles_differently_recomputes(
    tmp_path, volume, monkeypatch
):
    """The default mode's bits depend on how segflow computes a tile (memory layout, slabs);
    its revision is part of the run key, so a run resumed after such a change recomputes
    its blocks instead of mixing two versions' bits. The reference mode's key stays."""
    import tasks.segment.plan as segment_plan
    from tasks.segment import plan_segmentation

    src, _ = volume
    model = make_model(tmp_path / "m.ckpt", 8)
    out = str(tmp_path / "o.zarr")
    default = SegmentParams(device="cpu", tile=(1, 64, 64))
    reference = SegmentParams(device="cpu", tile=(1, 64, 64), mode="reference")
    keys = [plan_segmentation(src, model, out, p).key for p in (default, reference)]
    assert segment_image(src, model, out, default).blocks_computed > 0
    assert segment_image(src, model, out, default).blocks_computed == 0
    monkeypatch.setattr(segment_plan, "INVARIANT_REVISION", segment_plan.INVARIANT_REVISION + 1)
    later = [plan_segmentation(src, model, out, p).key for p in (default, reference)]
    assert later[0] != keys[0]
    assert later[1] == keys[1]
    assert segment_image(src, model, out, default).blocks_computed > 0
    # Another PyTorch (its oneDNN and cuDNN) is another run too.
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert plan_segmentation(src, model, out, default).key not in (keys[0], later[0])


# ------------------------------------------------------------------------------ ownership


def test_outputs_never_go_into_foreign_folders_and_overwrite_never_deletes_them(tmp_path, volume):
    src, _ = volume
    model = make_model(tmp_path / "m.ckpt", 7)
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.txt").write_text("precious")
    res = cli("segment", src, "-m", model, "--out", folder, "--device", "cpu", "-q")
    assert res.returncode != 0
    assert "segflow writes only into stores it made" in res.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["chapter1.txt"]
    tif = tmp_path / "a.tif"
    tifffile.imwrite(tif, blobs((2, 16, 16), 1), metadata={"axes": "ZYX"})
    res = cli("ingest", tif, folder, "--overwrite", "-q")
    assert res.returncode != 0
    assert "never replaced" in res.stderr
    assert (folder / "chapter1.txt").read_text() == "precious"
    # the labels of an OME-Zarr segflow did not make go to --out, never into it
    foreign = tmp_path / "foreign.ome.zarr"
    write_image(str(foreign), blobs((4, 32, 32), 2), "zyx")
    attrs = zarr.open_group(str(foreign), mode="r").attrs.asdict()
    del attrs["segflow"]
    zarr.open_group(str(foreign), mode="r+").attrs.put(attrs)
    res = cli("segment", foreign, "-m", model, "--device", "cpu", "-q")
    assert res.returncode != 0
    assert "pass --out" in res.stderr
    assert not (foreign / "labels").exists()


# --------------------------------------------------------------------------- completeness


def test_incomplete_labels_are_refused_and_stale_outputs_removed(tmp_path, volume, failing_blocks):
    src, _ = volume
    a, b = make_model(tmp_path / "a.ckpt", 8), make_model(tmp_path / "b.ckpt", 9)
    out = str(tmp_path / "o.zarr")

    healed = failing_blocks(lambda block: block.index == (1, 1, 1))
    try:
        with pytest.raises(BlockError, match=r"segment-semantic block \[1, 1, 1\] voxels 4:8"):
            segment_image(src, a, out, params())
    finally:
        healed()
    with pytest.raises(IncompleteError, match="incomplete"):
        stitch(out)
    from tasks.export import export_tiff

    with pytest.raises(IncompleteError, match="incomplete"):
        export_tiff(out, str(tmp_path / "x.tif"), labels="semantic")
    assert not (tmp_path / "x.tif").exists()
    # finish it, with probabilities and instances
    segment_image(src, a, out, params(probabilities=True))
    stitch(out)
    root = zarr.open_group(out, mode="r")
    assert root["labels/instances"].attrs["segflow"]["complete"] is True
    # another model, without probabilities or instances: nothing of model a stays
    segment_image(src, b, out, params())
    root = zarr.open_group(out, mode="r")
    assert "instances" not in root["labels"]
    assert "probabilities" not in root
    assert not Path(str(out).removesuffix(".zarr") + ".instances.csv").exists()
    assert root["labels"].attrs["ome"]["labels"] == ["semantic"]
    assert root["labels/semantic"].attrs["segflow"]["complete"] is True


def test_files_beside_a_store_are_never_left_truncated(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old,complete\n1,2\n")

    def dies_halfway(f):
        f.write("new,")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_file(str(target), dies_halfway)
    assert target.read_text() == "old,complete\n1,2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


# ---------------------------------------------------------------------------- missing data


def test_missing_or_garbage_chunks_are_errors_not_zeros(tmp_path, volume):
    src, _ = volume
    model = make_model(tmp_path / "m.ckpt", 10)
    chunk = Path(src) / "0" / "c" / "1" / "0" / "1"
    assert chunk.exists()
    saved = chunk.read_bytes()
    chunk.unlink()
    out = str(tmp_path / "o.zarr")
    with pytest.raises(BlockError, match=r"img\.ome\.zarr: chunk 0/1/0/1 is missing"):
        segment_image(src, model, out, params())
    chunk.write_bytes(b"garbage" * 10)
    with pytest.raises(
        BlockError, match=r"img\.ome\.zarr/0/c/1/0/1: stored data cannot be decoded"
    ):
        segment_image(src, model, out, params())
    chunk.write_bytes(saved)
    segment_image(src, model, out, params())
    # a deleted label chunk: the stitch says which, instead of fewer objects
    label_chunk = Path(out) / "labels" / "semantic" / "0" / "c" / "0" / "1" / "1"
    label_chunk.unlink()
    with pytest.raises(BlockError, match=r"chunk labels/semantic/0/0/1/1 is missing"):
        stitch(out)


def test_strict_array_reads_every_selection_form(tmp_path):
    arr = zarr.create_array(
        str(tmp_path / "a.zarr"), shape=(5, 7), chunks=(2, 3), dtype="uint8", fill_value=0
    )
    every_chunk(arr)[...] = np.arange(35, dtype=np.uint8).reshape(5, 7)
    strict = StrictArray(arr, str(tmp_path / "a.zarr"))
    assert np.array_equal(strict[...], arr[...])
    assert np.array_equal(strict[1:4], arr[1:4])
    assert np.array_equal(strict[2, 1:6], arr[2, 1:6])
    assert np.array_equal(strict[4:5, 6:7], arr[4:5, 6:7])


def test_reads_through_a_chunk_cache_equal_direct_reads_and_stay_in_budget(tmp_path):
    """Cached reads assemble whole chunks: any box (channel axis, array edges, sharded
    arrays) equals zarr's own read; each chunk is decoded once while it fits the budget;
    the budget bounds what is kept; a chunk missing from the store is still named."""
    rng = np.random.default_rng(5)
    data = rng.integers(0, 60000, size=(2, 13, 22, 19), dtype=np.uint16)
    for name, shards in (("plain", None), ("sharded", (2, 8, 8, 8))):
        url = str(tmp_path / f"{name}.zarr")
        arr = zarr.create_array(
            url, shape=data.shape, chunks=(2, 4, 4, 4), shards=shards, dtype="uint16"
        )
        every_chunk(arr)[...] = data
        direct = StrictArray(arr, url)
        cache = ChunkCache(10**9)
        cached = StrictArray(arr, url, cache=cache, tag="run-1")
        for _ in range(60):
            lo = [int(rng.integers(0, n)) for n in data.shape]
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, data.shape, strict=True)]
            box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            assert np.array_equal(cached[box], data[box]), (name, box)
            assert np.array_equal(direct[box], data[box])
        assert np.array_equal(cached[1, 3:9, 5], data[1, 3:9, 5])  # integers drop axes
        chunks_in_array = 1 * 4 * 6 * 5
        assert cache.misses <= chunks_in_array < cache.hits  # every chunk read at most once
        # A budget of three chunks keeps at most three.
        small = ChunkCache(3 * 2 * 4 * 4 * 4 * 2)
        tight = StrictArray(arr, url, cache=small, tag="run-1")
        assert np.array_equal(tight[:, 2:11, 3:17, 0:19], data[:, 2:11, 3:17, 0:19])
        assert small.nbytes <= small.max_bytes
        assert len(small._chunks) == 3
    # A chunk deleted before it was ever read is named, as without the cache.
    (tmp_path / "plain.zarr" / "c" / "0" / "3" / "5" / "4").unlink()
    plain = zarr.open_array(str(tmp_path / "plain.zarr"))
    fresh = StrictArray(plain, "plain", "0", ChunkCache(10**9), "k")
    with pytest.raises(MissingDataError, match=r"plain: chunk 0/0/3/5/4 is missing"):
        fresh[:, 10:13, 18:22, 16:19]
    # A sized budget holds the chunks of one read anywhere in the array.
    assert direct.chunk_set_bytes((2, 6, 6, 6)) == 1 * 3 * 3 * 3 * (2 * 4 * 4 * 4) * 2
    assert direct.chunk_set_bytes((2, 5, 5, 30)) == 1 * 2 * 2 * 5 * (2 * 4 * 4 * 4) * 2


# ----------------------------------------------------------------------------------- runner


_attempts: dict[int, int] = {}


def _flaky(plan, index):
    _attempts[index[0]] = _attempts.get(index[0], 0) + 1
    if _attempts[index[0]] < 3:
        raise ConnectionResetError(104, "Connection reset by peer")
    return index[0]


def _bad_input(plan, index):
    _attempts[-1] = _attempts.get(-1, 0) + 1
    raise ValueError("not a volume")


def test_runner_retries_transient_errors_only_and_marks_after_success(tmp_path, dask_client):
    store = str(tmp_path / "r.zarr")
    zarr.open_group(store, mode="w")
    for client in (None, dask_client):
        _attempts.clear()
        events = []
        runner = Runner(client, progress=events.append, backoff_s=0.01)
        step = Step("flaky", store, (4,), f"k{id(client)}", _flaky, None)
        result = runner.run(step)
        assert sorted(result.results) == [0, 1, 2, 3]
        if client is None:  # same process: the attempts are visible here
            assert all(n == 3 for n in _attempts.values())
        assert Markers.open(store, "flaky").all_done(step.key)
        assert [e.done for e in events] == [0, 1, 2, 3, 4]
        assert runner.run(step).computed == 0  # all marked: nothing recomputed
        _attempts.clear()
        bad = Step("bad", store, (1,), "k", _bad_input, None)
        with pytest.raises(BlockError, match=r"bad block \[0\] of .*r\.zarr failed: ValueError"):
            runner.run(bad)
        if client is None:
            assert _attempts[-1] == 1  # a permanent error is never retried
        assert not Markers.open(store, "bad").done_mask("k").any()


def test_a_block_written_by_a_superseded_run_is_recomputed_whoever_marked_it(tmp_path):
    """A late write by a run that lost its lease taints its block: the block counts as not
    done under any key (even after the new holder marked it) until it is computed again."""
    store = str(tmp_path / "s.zarr")
    calls: list[tuple[int, ...]] = []

    def process(plan, index):
        calls.append(index)
        return index

    step = Step("demo", store, (2, 2), "key-1", process, None)
    Runner(None, threads=1).run(step)
    assert len(calls) == 4
    markers = Markers.open(store, "demo")
    assert markers.all_done("key-1")
    Markers.taint(step, (1, 0))  # what run_block's take-back does after a late write
    assert not markers.all_done("key-1")
    assert markers.done_of([(1, 0), (0, 0)], "key-1").tolist() == [False, True]
    calls.clear()
    Runner(None, threads=1).run(step)
    assert calls == [(1, 0)]  # only the tainted block, computed again and untainted
    assert Markers.open(store, "demo").all_done("key-1")
