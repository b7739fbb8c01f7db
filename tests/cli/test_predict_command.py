"""``segflow predict`` as a user runs it: a folder of TIFFs in, label TIFFs out.

The labels must equal those of ingest -> segment -> export run by hand (the same engine),
one corrupt TIFF must fail alone with a sentence naming it, and a re-run computes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segflow.demo import write_stack
from segflow.errors import ExitCode
from tasks.preview import PREVIEW_GAP, PREVIEW_NOTE, caption_height, histogram_height

ROOT = Path(__file__).resolve().parents[2]


def segflow(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "segflow", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """in/a.tif, in/b.tif (8x64x64 stacks, voxels 0.75x0.25x0.25) and in/bad.tif, a model."""
    root = tmp_path_factory.mktemp("predict")
    for i, name in enumerate(("a", "b")):
        write_stack(root / "in" / f"{name}.tif", (8, 64, 64), rng=3 + i)
    (root / "in" / "bad.tif").write_bytes(b"II*\x00" + b"not a TIFF at all" * 8)
    ok(
        segflow(
            "model", "create", "m.ckpt", "--depth", "2", "--base-channels", "4",
            "--padding", "same", cwd=root,
        )
    )  # fmt: skip
    return root


def test_predict_a_folder_equals_the_steps_by_hand_and_fails_only_the_bad_file(batch):
    res = segflow("predict", "in", "--model", "m.ckpt", "--out", "out", "--instances", "--json",
                  cwd=batch)  # fmt: skip
    assert res.returncode == ExitCode.BAD_INPUT, res.stderr
    assert "Traceback" not in res.stderr
    summary = json.loads(res.stdout)
    rows = {Path(r["input"]).name: r for r in summary["inputs"]}
    assert (summary["ok"], summary["failed"]) == (2, 1)
    assert rows["bad.tif"]["status"] == "failed"
    assert "bad.tif" in rows["bad.tif"]["error"]
    assert "\n" not in rows["bad.tif"]["error"]
    for name in ("a", "b"):
        row = rows[f"{name}.tif"]
        assert row["status"] == "ok", row
        assert row["labels_tiff"] == f"out/{name}.tif.labels.ome.tif"
        assert row["blocks_computed"] > 0
        assert not row["reused"]

    # the same steps by hand: ingest -> segment --instances -> export
    for name in ("a", "b"):
        store = f"hand/{name}.ome.zarr"
        ok(segflow("ingest", f"in/{name}.tif", store, cwd=batch))
        ok(segflow("segment", store, "-m", "m.ckpt", "--instances", "--no-preview", "-q",
                   cwd=batch))  # fmt: skip
        ok(segflow("export", store, "--labels", "instances", "--to", f"hand/{name}.tif",
                   cwd=batch))  # fmt: skip
        by_hand = tifffile.imread(batch / "hand" / f"{name}.tif")
        predicted = tifffile.imread(batch / "out" / f"{name}.tif.labels.ome.tif")
        assert predicted.shape == (8, 64, 64)
        assert predicted.max() > 0, "no objects: the comparison would prove little"
        np.testing.assert_array_equal(predicted, by_hand)

    # the preview: three orthogonal slices over a line saying the voxel size and the
    # object-size histogram. 8x64x64 with z voxels 3x the y/x ones: z panels 24 voxels
    # thick, 64+24 voxels + 4 pixels enlarged until at least 512 pixels: 6 times -> 384 +
    # 4 + 144 = 532 wide
    preview = batch / "out" / "a.tif.preview.png"
    assert rows["a.tif"]["preview"] == "out/a.tif.preview.png"
    with Image.open(preview) as png:
        assert png.format == "PNG"
        width = 64 * 6 + PREVIEW_GAP + 24 * 6
        assert png.size == (width, width + caption_height(width) + histogram_height(width))
        assert png.text[PREVIEW_NOTE] == (
            "z stretched ×3.0 (voxel 0.75 × 0.25 × 0.25 µm); scale bar 2 µm"
        )
        png.load()

    # a re-run computes nothing new: every block reused, the TIFFs untouched
    tiffs = {p: p.stat().st_mtime_ns for p in (batch / "out").glob("*.labels.ome.tif")}
    again = segflow("predict", "in", "--model", "m.ckpt", "--out", "out", "--instances",
                    "--json", cwd=batch)  # fmt: skip
    assert again.returncode == ExitCode.BAD_INPUT
    rows = {Path(r["input"]).name: r for r in json.loads(again.stdout)["inputs"]}
    for name in ("a", "b"):
        assert rows[f"{name}.tif"]["blocks_computed"] == 0
        assert rows[f"{name}.tif"]["reused"], rows[f"{name}.tif"]
    assert {p: p.stat().st_mtime_ns for p in tiffs} == tiffs


def test_predict_says_which_inputs_name_nothing(batch):
    res = segflow("predict", "in/a.tif", "nothing/*.tif", "missing.tif", "--model", "m.ckpt",
                  "--out", "out2", cwd=batch)  # fmt: skip
    assert res.returncode == ExitCode.BAD_INPUT, res.stderr
    assert "Traceback" not in res.stderr
    lines = res.stdout.splitlines()
    assert "predict: 1 ok, 2 failed (out2)" in lines
    assert any("ok      in/a.tif -> out2/a.tif.labels.ome.tif" in line for line in lines)
    assert "nothing/*.tif: no TIFF file matches this pattern" in res.stdout
    assert "missing.tif: no such file or folder" in res.stdout


def test_predict_checks_the_device_and_each_input_before_writing(batch):
    gpu = segflow("predict", "in/a.tif", "--model", "m.ckpt", "--out", "out3", "--device", "gpu",
                  cwd=batch)  # fmt: skip
    assert gpu.returncode == ExitCode.USAGE, gpu.stderr
    assert "'--device': 'gpu' is not one of 'auto', 'cpu', 'cuda'" in gpu.stderr
    assert not (batch / "out3").exists()
    # an output store that segflow did not make is refused before its input is ingested
    foreign = batch / "out4" / "a.tif.ome.zarr"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    res = segflow("predict", "in/a.tif", "--model", "m.ckpt", "--out", "out4", cwd=batch)
    assert res.returncode == ExitCode.CONFLICT, res.stderr
    assert "segflow did not make" in res.stdout
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
