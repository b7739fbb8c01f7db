"""The kill harness: SIGKILL of the real CLI at seeded points of every phase, then re-runs.

One pipeline (ingest with a pyramid level -> segment, with label levels -> stitch, with
instance levels -> export) runs twice on the same tiny volume with many tiny blocks: once
cleanly, once with every phase killed at seeded moments and re-run until it finishes. Kill
moments are chosen by polling what the run stores (its done markers, the export's partial
file), with every block slowed down by the test hook ``SEGFLOW_TEST_BLOCK_DELAY``.

After every kill:
  * nothing of the killed phase is marked complete, and a killed export leaves no file;
  * no block done before the kill is recomputed later: every done marker that existed at
    a kill (one file per block) is never rewritten, so each re-run recomputes at most the
    blocks that were unfinished.
At the end every output (arrays, attributes, object tables, the exported TIFF) is bitwise
equal to the clean run's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from harness import (
    ROOT,
    assert_same_store,
    blobs,
    cli,
    complete_flag,
    file_digest,
    make_model,
    segflow_argv,
)

from tasks.blockwise import DELAY_ENV
from tasks.paths import beside_store

SEED = 13
SHAPE = (8, 64, 64)  # zyx; chunks 2x16x16 -> 64 blocks at level 0, 8 at level 1
CHUNKS = "2,16,16"
DELAY_S = "0.1"
SEGMENT_ARGS = "--tile 1,64,64 --device cpu --fast -q"


def commands(tif: Path, store: Path, model: str, exported: Path) -> dict[str, list[object]]:
    return {
        "ingest": [
            "ingest",
            tif,
            store,
            *f"--chunks {CHUNKS} --levels 1 --unit-mib 0.001 -q".split(),
        ],
        "segment": ["segment", store, "-m", model, *f"--chunks {CHUNKS} {SEGMENT_ARGS}".split()],
        "stitch": ["stitch", store],
        "export": ["export", store, "--to", exported, "--overwrite"],
    }


@dataclass(frozen=True)
class KillPoint:
    phase: str
    step: str  # the marker step polled, or "export" (the partial file)
    at: int  # kill once this many blocks are marked (export: extra ms after the file appears)

    def __str__(self) -> str:
        return f"{self.phase}:{self.step}@{self.at}"


def kill_points(seed: int) -> list[KillPoint]:
    """Seeded points spread over every phase (ascending within a step)."""
    rng = random.Random(seed)

    def some(phase: str, step: str, blocks: int, n: int) -> list[KillPoint]:
        return [KillPoint(phase, step, a) for a in sorted(rng.sample(range(1, blocks - 1), n))]

    return [
        *some("ingest", "ingest", 64, 2),
        *some("ingest", "ingest-level1", 8, 1),
        *some("segment", "segment-semantic", 64, 2),
        *some("segment", "semantic-level1", 8, 1),
        *some("stitch", "stitch-instances-relabel", 64, 2),
        *some("stitch", "instances-level1", 8, 1),
        *[KillPoint("export", "export", rng.randrange(0, 300)) for _ in range(2)],
    ]


def marked(store: Path, step: str) -> int:
    """Blocks of ``step`` marked so far (one chunk file per marked block; read while the
    run writes, so files are counted, not decoded)."""
    folder = store / "segflow-done" / step / "c"
    return sum(len(files) for _, _, files in os.walk(folder))


#: Per-unit side arrays of the ingest under segflow-done: a unit in flight at a kill has
#: written its row but is not marked, so its row is rightly written again.
PARTIALS = ("ingest-moments", "ingest-digest", "ingest-hist", "ingest-fine")


def bookkeeping(store: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every done marker (one chunk file per marked block)."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, _, files in os.walk(store / "segflow-done"):
        step = Path(dirpath).relative_to(store / "segflow-done").parts[:1]
        for name in files:
            if name != "zarr.json" and step and step[0] not in PARTIALS:
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_ino, st.st_mtime_ns)
    return out


def assert_not_recomputed(before: dict[str, tuple[int, int]], store: Path, what: str) -> None:
    now = bookkeeping(store)
    rewritten = [p for p, stamp in before.items() if now.get(p) != stamp]
    assert not rewritten, f"{what}: work done before the kill was redone: {rewritten[:5]}"


def assert_same_tiff(path: Path, reference: Path) -> None:
    """The same pixels, tags and OME metadata; only the OME UUID (one per file, by the
    OME specification) may differ."""
    uuid = re.compile(r'UUID="urn:uuid:[0-9a-f-]+"')
    with tifffile.TiffFile(path) as got, tifffile.TiffFile(reference) as want:
        assert got.is_bigtiff
        assert want.is_bigtiff
        assert len(got.pages) == len(want.pages)
        assert np.array_equal(got.asarray(), want.asarray())
        assert got.asarray().dtype == want.asarray().dtype
        a, b = got.pages.first, want.pages.first
        tags_a = {t.name: t.value for t in a.tags if t.name != "ImageDescription"}
        tags_b = {t.name: t.value for t in b.tags if t.name != "ImageDescription"}
        assert tags_a == tags_b
        assert uuid.sub("", a.description) == uuid.sub("", b.description)
        for fa, fb in zip(got.pages, want.pages, strict=True):
            assert fa.dataoffsets == fb.dataoffsets
            assert fa.databytecounts == fb.databytecounts


def after_marked(store: Path, step: str, blocks: int) -> Callable[[], bool]:
    return lambda: marked(store, step) >= blocks


def after_file(path: Path, wait_s: float) -> Callable[[], bool]:
    """True ``wait_s`` after ``path`` (or a temporary file named after it,
    ``<path>-<suffix>``) first appeared."""
    appeared: list[float] = []

    def when() -> bool:
        if not appeared and (path.exists() or any(path.parent.glob(f"{path.name}-*"))):
            appeared.append(time.monotonic())
        return bool(appeared) and time.monotonic() >= appeared[0] + wait_s

    return when


def run_and_kill(argv: list[str], when: Callable[[], bool], log: Path) -> None:
    """Start ``argv`` and SIGKILL it as soon as ``when()`` holds; it must not end first."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, DELAY_ENV: DELAY_S},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        try:
            deadline = time.monotonic() + 240
            while not when():
                assert proc.poll() is None, f"ended before the kill point: {log.read_text()}"
                assert time.monotonic() < deadline, "the kill point was never reached"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_rerun_is_bitwise_equal(tmp_path: Path) -> None:
    tif = tmp_path / "vol.tif"
    tifffile.imwrite(tif, blobs(SHAPE, 7), metadata={"axes": "ZYX"})
    model = make_model(tmp_path / "m.ckpt", 3)

    clean = commands(tif, tmp_path / "clean.ome.zarr", model, tmp_path / "clean.tif")
    for phase, args in clean.items():
        done = cli(*args)
        assert done.returncode == 0, f"{phase}: {done.stderr}"

    store = tmp_path / "vol.ome.zarr"
    exported = tmp_path / "vol.tif.out.tif"
    killed = commands(tif, store, model, exported)
    points = kill_points(SEED)
    assert len(points) >= 10
    assert {p.phase for p in points} == set(killed)
    survived: list[str] = []
    for phase, args in killed.items():
        argv = segflow_argv(*args)
        before: dict[str, tuple[int, int]] = {}
        for point in [p for p in points if p.phase == phase]:
            if point.step == "export":
                partial = Path(f"{exported}.partial")
                for left in tmp_path.glob(f"{partial.name}*"):
                    left.unlink()
                when = after_file(partial, point.at / 1000)
            else:
                # at least one block beyond what is already marked: a kill inside the run
                when = after_marked(store, point.step, max(point.at, marked(store, point.step) + 1))
            run_and_kill(argv, when, tmp_path / f"{point}.log")
            assert_not_recomputed(before, store, str(point))
            before = bookkeeping(store)
            if phase == "ingest":
                assert not complete_flag(str(store), "")
            elif phase == "segment":
                assert not complete_flag(str(store), "labels/semantic")
            elif phase == "stitch":
                assert not complete_flag(str(store), "labels/instances")
            else:
                assert not exported.exists(), "a killed export left a final file"
            survived.append(str(point))
        done = cli(*args)
        assert done.returncode == 0, f"{phase} re-run: {done.stderr}"
        assert_not_recomputed(before, store, f"{phase} re-run")

    assert survived == [str(p) for p in points]
    assert_same_store(str(store), str(tmp_path / "clean.ome.zarr"))
    for name in ("instances.csv", "instances.parquet"):
        assert file_digest(beside_store(str(store), name)) == file_digest(
            beside_store(str(tmp_path / "clean.ome.zarr"), name)
        )
    assert_same_tiff(exported, tmp_path / "clean.tif")
    print("kill points survived:", ", ".join(survived))
