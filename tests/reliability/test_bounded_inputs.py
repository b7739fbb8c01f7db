"""Inputs taken as they are, within bounds, and refusals that need a closer look than the
bad-input corpus (``bad_input_corpus.py``, one sentence, the exit status, nothing written)
gives them: the warning a run prints, the labels it computes, the memory a refusal takes.
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
import zarr
from bad_input_corpus import bomb_checkpoint, several_series
from harness import cli
from typer.testing import CliRunner

from unet_core.normalize import CLIP, NORMALIZE_REVISION, apply_affine
from unet_core.synthetic import blobs

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: object) -> tuple[int, str, str]:
    """``segflow ARGV`` in this process (the CLI's own error boundary and log handler)."""
    from segflow.cli import _register, app

    _register()
    result = CliRunner().invoke(app, [str(a) for a in argv])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"escaped the error boundary: {result.exception!r}")
    return result.exit_code, result.stdout, result.stderr


# -------------------------------------------------------- voxel sizes from metadata


def _ome(path: Path, size_x: str) -> None:
    """An OME-TIFF whose PhysicalSizeX attribute reads ``size_x`` (3 characters)."""
    stack = np.zeros((3, 16, 16), np.uint16)
    stack[:, 4:8, 4:8] = 100
    sizes = {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0}
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "ZYX", **sizes})
    data = path.read_bytes()
    assert data.count(b'PhysicalSizeX="0.5"') == 1
    path.write_bytes(data.replace(b'PhysicalSizeX="0.5"', f'PhysicalSizeX="{size_x}"'.encode()))


def _imagej(path: Path, spacing: float) -> None:
    stack = np.zeros((3, 16, 16), np.uint16)
    stack[:, 4:8, 4:8] = 100
    tifffile.imwrite(
        path, stack, imagej=True, resolution=(2, 2), metadata={"spacing": spacing, "unit": "um"}
    )


def _resolution(path: Path, x: tuple[int, int]) -> None:
    plane = np.zeros((16, 16), np.uint16)
    plane[4:8, 4:8] = 100
    tifffile.imwrite(path, plane, resolution=(x, (4, 1)), resolutionunit="MICROMETER")


@pytest.mark.parametrize(
    ("make", "axis", "value", "scale"),
    [
        (lambda p: _ome(p, "INF"), "x", "inf", [2.0, 0.5, 1.0]),
        (lambda p: _ome(p, "0.0"), "x", "0.0", [2.0, 0.5, 1.0]),
        (lambda p: _ome(p, "-1."), "x", "-1.0", [2.0, 0.5, 1.0]),
        (lambda p: _ome(p, "NaN"), "x", "nan", [2.0, 0.5, 1.0]),
        (lambda p: _imagej(p, 0.0), "z", "0.0", [1.0, 0.5, 0.5]),
        (lambda p: _imagej(p, -3.0), "z", "-3.0", [1.0, 0.5, 0.5]),
        (lambda p: _imagej(p, float("nan")), "z", "nan", [1.0, 0.5, 0.5]),
        (lambda p: _resolution(p, (0, 1)), "x", "inf", [0.25, 1.0]),
    ],
    ids=[
        "ome-inf",
        "ome-zero",
        "ome-negative",
        "ome-nan",
        "imagej-zero",
        "imagej-negative",
        "imagej-nan",
        "resolution-zero",
    ],
)
def test_a_voxel_size_in_the_metadata_that_is_not_finite_and_positive_warns(
    tmp_path, make, axis, value, scale
):
    src = tmp_path / "v.tif"
    make(src)
    code, out, err = run("ingest", src, tmp_path / "v.zarr", "--json")
    assert code == 0, err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("segflow: warning: ")]
    assert len(warnings) == 1, err
    assert f"{src}: the metadata gives voxel size {value} for axis {axis}" in warnings[0]
    assert "using 1.0 µm" in warnings[0]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["scale"] == scale
    ome = zarr.open_group(tmp_path / "v.zarr", mode="r").attrs["ome"]["multiscales"][0]
    assert ome["datasets"][0]["coordinateTransformations"][0]["scale"] == scale


def test_sound_voxel_sizes_in_the_metadata_warn_nothing(tmp_path):
    _ome(tmp_path / "v.tif", "0.5")
    code, out, err = run("ingest", tmp_path / "v.tif", tmp_path / "v.zarr", "--json")
    assert code == 0, err
    assert "warning" not in err
    assert json.loads(out.strip().splitlines()[-1])["scale"] == [2.0, 0.5, 0.5]


# --------------------------------------------------------------- one series or none


def test_equal_pages_that_tifffile_shapes_as_one_series_ingest(tmp_path):
    pages = [np.full((16, 20), i, np.uint16) for i in range(4)]
    with tifffile.TiffWriter(tmp_path / "one.tif") as tif:
        for page in pages:
            tif.write(page, contiguous=True)  # appended to the series of the first page
    assert len(tifffile.TiffFile(tmp_path / "one.tif").series) == 1
    code, _, err = run("ingest", tmp_path / "one.tif", tmp_path / "one.zarr", "-q", "--axes", "zyx")
    assert code == 0, err
    stored = zarr.open_group(tmp_path / "one.zarr", mode="r")["0"][...]
    assert np.array_equal(stored, np.stack(pages))
    # the same pages as four series: refused, naming the file
    several_series(tmp_path / "four.tif", pages)
    code, _, err = run("ingest", tmp_path / "four.tif", tmp_path / "four.zarr", "-q")
    assert code == 3, err
    assert f"{tmp_path / 'four.tif'}: holds 4 series" in err
    assert not (tmp_path / "four.zarr").exists()


# ----------------------------------------------------------------- training pairs


def test_training_takes_pairs_that_each_hold_an_object(tmp_path):
    """Every pair has foreground somewhere (one only in a corner): training runs."""
    args = []
    for i, (y, x) in enumerate(((20, 20), (2, 50))):
        image, _ = blobs((64, 64), i)
        labels = np.zeros((64, 64), np.uint8)
        labels[y : y + 10, x : x + 10] = 1
        tifffile.imwrite(tmp_path / f"img{i}.tif", image)
        tifffile.imwrite(tmp_path / f"lab{i}.tif", labels)
        args += ["--image", tmp_path / f"img{i}.tif", "--labels", tmp_path / f"lab{i}.tif"]
    code, _, err = run(
        "train", *args, "--out", tmp_path / "m.ckpt", "--depth", "1", "--base-channels", "2",
        "--steps", "2", "--patch", "28,28", "--batch-size", "1", "--json", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "m.ckpt").is_file()


# ------------------------------------------------------------- decompression bomb


def test_a_decompression_bomb_is_refused_before_anything_is_inflated(tmp_path):
    """958 KB declaring 250 M float32 zeros: PyTorch would allocate the GB first."""
    bomb = tmp_path / "bomb.ckpt"
    bomb_checkpoint(bomb, 250_000_000)
    size = bomb.stat().st_size
    assert size < 2**20
    script = (
        "import resource, sys\n"
        "from unet_core.checkpoint import read_checkpoint_header\n"
        "from unet_core.errors import CheckpointError\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    read_checkpoint_header(sys.argv[1])\n"
        "    print('accepted')\n"
        "except CheckpointError as exc:\n"
        "    print('refused:', exc)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(bomb)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    verdict, grown_kib = done.stdout.strip().splitlines()
    assert verdict.startswith(f"refused: {bomb} is not a segflow checkpoint"), verdict
    assert "declare 953.7 MiB uncompressed" in verdict, verdict
    assert int(grown_kib) * 1024 <= 2 * size + 100 * 2**20, f"peak RSS grew {grown_kib} KiB"


# ------------------------------------------------------------------ one hot voxel


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2D U-Net trained for a few seconds on synthetic nuclei (percentile-normalised):
    decisive enough that a change of its labels means something."""
    root = tmp_path_factory.mktemp("trained")
    image, labels = blobs((128, 128), 11)
    tifffile.imwrite(root / "img.tif", image)
    tifffile.imwrite(root / "lab.tif", labels)
    done = cli("train", "--image", root / "img.tif", "--labels", root / "lab.tif",
               "--out", root / "m.ckpt", "--depth", "2", "--base-channels", "8",
               "--steps", "100", "--patch", "60,60", "--lr", "3e-3", "--device", "cpu",
               "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return root / "m.ckpt"


#: Where the hot voxel goes: places of the test volume beside objects, where it flipped
#: 167 to 440 labels before it was clipped (and 25 to 42 since).
HOT = ((1, 32, 64), (2, 64, 64), (1, 96, 64))


def test_one_hot_voxel_changes_at_most_a_thousandth_of_the_labels(tmp_path, trained_model):
    """One float32 voxel of 3e38 used to reach the network as ~1e38 and flip the labels of
    its receptive field (up to 0.7% of this volume); clipped to ±CLIP, it is a bright voxel."""
    image, _ = blobs((4, 128, 128), 4)
    clean = image.astype(np.float32) / np.float32(1200)  # normalised, 3e38 stays finite
    (tmp_path / "in").mkdir()
    tifffile.imwrite(
        tmp_path / "in" / "clean.tif", clean, photometric="minisblack", metadata={"axes": "ZYX"}
    )
    for i, place in enumerate(HOT):
        hot = clean.copy()
        hot[place] = np.float32(3e38)
        tifffile.imwrite(
            tmp_path / "in" / f"hot{i}.tif", hot, photometric="minisblack", metadata={"axes": "ZYX"}
        )
    done = cli("predict", tmp_path / "in", "--model", trained_model,
               "--out", tmp_path / "out", "--no-preview", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    a = tifffile.imread(tmp_path / "out" / "clean.tif.labels.ome.tif")
    assert a.shape == clean.shape
    assert 0.05 < float(np.mean(a == 1)) < 0.5, "one class only: the comparison proves little"
    changed = []
    for i, place in enumerate(HOT):
        b = tifffile.imread(tmp_path / "out" / f"hot{i}.tif.labels.ome.tif")
        changed.append(int(np.count_nonzero(a != b)))
        assert not np.any(np.delete(a != b, place[0], axis=0)), "a 2D model changed other slices"
    assert max(changed) <= 0.001 * a.size, f"one hot voxel changed {changed} of {a.size} labels"


def test_the_normalised_intensity_is_bounded_and_the_same_in_any_chunks():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, (6, 40, 40)).astype(np.float32)
    x[1, 2, 3], x[2, 3, 4], x[3, 4, 5], x[4, 5, 6] = 3e38, -3e38, np.inf, np.nan
    whole = apply_affine(x, 90.0, 0.05)
    assert np.abs(whole).max() == CLIP
    assert whole[1, 2, 3] == CLIP
    assert whole[2, 3, 4] == -CLIP
    assert whole[3, 4, 5] == 0.0  # Inf and NaN: 0, as before
    assert whole[4, 5, 6] == 0.0
    parts = np.concatenate(
        [apply_affine(x[:, :, i : i + 7], 90.0, 0.05) for i in range(0, 40, 7)], 2
    )
    assert parts.tobytes() == whole.tobytes()
    # integers whose range maps inside the bounds are not clipped; others are
    assert apply_affine(np.array([0, 255], np.uint8), 10.0, 1 / 240).max() < CLIP
    assert apply_affine(np.array([0, 65535], np.uint16), 10.0, 1 / 240).tolist() == [
        pytest.approx(-10 / 240),
        CLIP,
    ]
    assert isinstance(NORMALIZE_REVISION, int)
    assert NORMALIZE_REVISION >= 2


# ------------------------------------------------------------------------- chunks


def test_ingest_chunks_larger_than_the_volume_are_capped_at_it(tmp_path):
    stack = np.arange(6 * 32 * 40, dtype=np.uint16).reshape(6, 32, 40)
    tifffile.imwrite(tmp_path / "v.tif", stack, metadata={"axes": "ZYX"})
    done = cli("ingest", tmp_path / "v.tif", tmp_path / "v.zarr", "--chunks", "9999,9999,9999",
               "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1])["chunks"] == [6, 32, 40]
    level = zarr.open_group(tmp_path / "v.zarr", mode="r")["0"]
    assert level.chunks == (6, 32, 40)
    assert np.array_equal(level[...], stack)
