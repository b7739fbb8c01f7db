"""Inputs that used to give silently wrong results or refusals: non-finite and extreme
values, tiny volumes, glob characters in real paths, hostile checkpoints, sparse TIFFs."""

from __future__ import annotations

import json
import math
import resource
import time

import numpy as np
import pytest
import tifffile
import torch
import zarr
from bad_input_corpus import _checkpoint, _sparse_tiff

from tasks.ingest import ingest_volume
from tasks.store import read_image_info, write_image
from unet_core.checkpoint import read_checkpoint_header, save_checkpoint
from unet_core.config import UNetConfig
from unet_core.errors import CheckpointError, InvalidVolumeError
from unet_core.model import UNet
from unet_core.normalize import (
    CLIP,
    RECORDED_PERCENTILES,
    Normalization,
    apply_affine,
    compute_stats,
)


def _higher(values: np.ndarray, q: float) -> float:
    """The percentile definition segflow records: order statistic ceil(q/100 (n-1))."""
    return float(np.percentile(values.astype(np.float64), q, method="higher"))


# ------------------------------------------------------------- non-finite, extremes


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32", "uint32"])
def test_percentiles_are_exact_order_statistics(dtype):
    rng = np.random.default_rng(1)
    a = rng.normal(1000, 300, size=50_000).astype(dtype)
    stats = compute_stats(a)
    for q in RECORDED_PERCENTILES:
        want = _higher(a, q)
        if dtype == "float64":  # exact to float32 precision
            assert stats.percentile(q) == pytest.approx(want, rel=1e-7)
        else:
            assert stats.percentile(q) == want


def test_a_few_extreme_voxels_do_not_move_the_percentiles():
    rng = np.random.default_rng(2)
    a = rng.random((20, 64, 64), dtype=np.float32)
    clean = compute_stats(a)
    a.reshape(-1)[[5, 5000, 70000]] = [3e38, -3e38, 1e30]
    stats = compute_stats(a)
    assert stats.max == pytest.approx(3e38, rel=1e-6)
    for q in (1.0, 2.0, 50.0, 98.0, 99.8):
        # three more voxels shift a rank by at most 3 of 81920 values
        assert stats.percentile(q) == pytest.approx(clean.percentile(q), abs=1e-3)
    lo, scale = Normalization().affine(stats)
    assert 0.0 <= lo < 0.02
    assert 0.9 < 1 / scale < 1.0


def test_nonfinite_voxels_are_counted_and_normalised_to_zero():
    a = np.linspace(0, 1, 1000, dtype=np.float32)
    a[[3, 4, 5]] = [np.nan, np.inf, -np.inf]
    stats = compute_stats(a)
    assert stats.nonfinite == 3
    assert stats.count == 997
    out = apply_affine(a, 0.5, 2.0)
    assert np.isfinite(out).all()
    assert out[[3, 4, 5]].tolist() == [0.0, 0.0, 0.0]
    assert out[0] == pytest.approx(-1.0)
    # A finite extreme, even one that overflows float32 (6e38), ends at the bound.
    big = apply_affine(np.float32([3e38, 1.0, -3e38]), -3e38, 1.0)
    assert big.tolist() == [CLIP, CLIP, 0.0]
    # Integer images skip the clip only where their whole range maps inside the bounds.
    ints = np.array([0, 65535], dtype=np.uint16)
    assert apply_affine(ints, 0.0, 1e35).tolist() == [0.0, CLIP]  # 65535e35 overflows
    assert apply_affine(ints.astype(np.float32), 0, 1e35, source_dtype=np.uint16)[1] == CLIP
    assert apply_affine(ints, 1.0, 2.0).tolist() == [-2.0, CLIP]
    assert apply_affine(ints, 0.0, 1 / 65535).tolist() == [0.0, 1.0]
    mine = ints.astype(np.float32)
    assert apply_affine(mine, 1.0, 2.0, in_place=True) is mine


def test_ingest_counts_nonfinite_and_keeps_exact_percentiles(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.random((12, 40, 48), dtype=np.float32) * 100
    a[0, 0, :7] = np.nan
    a[5, 3, 3] = np.inf
    a[6, 4, 4] = -np.inf
    a[7, 5, 5] = 3e38
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="minisblack", metadata={"axes": "ZYX"})
    info = ingest_volume(str(tmp_path / "f.tif"), str(tmp_path / "f.zarr"), unit_mib=0.02)
    finite = a[np.isfinite(a)]
    assert info.stats is not None
    assert info.stats.nonfinite == 9
    assert info.stats.count == finite.size
    assert info.stats.max == float(finite.max())
    for q in RECORDED_PERCENTILES:
        assert info.stats.percentile(q) == _higher(finite, q)
    assert info.stats == compute_stats(a).model_copy(
        update={"mean": info.stats.mean, "std": info.stats.std}
    )


def test_ingest_refuses_an_image_without_finite_values(tmp_path):
    a = np.full((3, 8, 8), np.nan, np.float32)
    a[1] = np.inf
    tifffile.imwrite(tmp_path / "n.tif", a, photometric="minisblack", metadata={"axes": "ZYX"})
    with pytest.raises(InvalidVolumeError, match=r"n\.tif: the image has no finite values"):
        ingest_volume(str(tmp_path / "n.tif"), str(tmp_path / "n.zarr"))
    attrs = zarr.open_group(tmp_path / "n.zarr", mode="r").attrs.asdict()
    assert attrs["segflow"]["ingest"]["status"] == "incomplete"


# ------------------------------------------------------------------- tiny volumes


@pytest.mark.parametrize(
    ("shape", "axes", "want"),
    [((1, 7, 9), "ZYX", "zyx"), ((1, 1, 1), "ZYX", "zyx"), ((1, 1), "YX", "yx")],
)
def test_tiny_volumes_ingest(tmp_path, shape, axes, want):
    a = np.arange(math.prod(shape), dtype=np.uint16).reshape(shape) + 3
    tifffile.imwrite(tmp_path / "t.tif", a, metadata={"axes": axes})
    info = ingest_volume(str(tmp_path / "t.tif"), str(tmp_path / "t.zarr"), levels=1)
    assert info.axes == want
    assert info.shape == shape
    assert np.array_equal(zarr.open_group(tmp_path / "t.zarr", mode="r")["0"][...], a)


@pytest.mark.parametrize(
    ("shape", "ndim"), [((1, 7, 9), 2), ((1, 7, 9), 3), ((1, 1, 1), 3), ((1, 1, 1), 2)]
)
def test_tiny_volumes_segment(tmp_path, dask_client, shape, ndim):
    from typer.testing import CliRunner

    from segflow.cli import _register, app

    a = (np.arange(math.prod(shape)).reshape(shape) % 5).astype(np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", a, metadata={"axes": "ZYX"})
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.ckpt", UNet(UNetConfig(ndim=ndim, depth=2, base_channels=2)))
    _register()
    ingest = CliRunner().invoke(app, ["ingest", str(tmp_path / "t.tif"), str(tmp_path / "t.zarr")])
    assert ingest.exit_code == 0, ingest.stderr
    argv = ["segment", str(tmp_path / "t.zarr"), "-m", str(tmp_path / "m.ckpt"), "--json"]
    done = CliRunner().invoke(app, [*argv, "--dask-address", dask_client.scheduler.address])
    assert done.exit_code == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["blocks_computed"] == summary["blocks_total"] >= 1
    labels = zarr.open_group(tmp_path / "t.zarr", mode="r")["labels/semantic/0"]
    assert labels.shape == shape


# ---------------------------------------------------------------------- paths


def test_an_existing_folder_with_glob_characters_is_used_as_is(tmp_path):
    folder = tmp_path / "stack[2]"
    folder.mkdir()
    decoy = tmp_path / "stack2"  # what 'stack[2]' matches as a pattern
    decoy.mkdir()
    for i in range(3):
        tifffile.imwrite(folder / f"z{i}.tif", np.full((5, 6), i, np.uint8))
        tifffile.imwrite(decoy / f"z{i}.tif", np.full((5, 6), 9, np.uint8))
    info = ingest_volume(str(folder), str(tmp_path / "s.zarr"))
    assert info.shape == (3, 5, 6)
    data = zarr.open_group(tmp_path / "s.zarr", mode="r")["0"][...]
    assert data[:, 0, 0].tolist() == [0, 1, 2]
    # a path that does not exist is still a pattern
    info = ingest_volume(str(tmp_path / "stack[2]" / "z[01].tif"), str(tmp_path / "p.zarr"))
    assert info.shape == (2, 5, 6)


# ------------------------------------------------------------------ checkpoints


def test_hostile_checkpoint_is_refused_before_any_allocation(tmp_path):
    small = UNet(UNetConfig(ndim=2, depth=1, base_channels=2))
    hostile = UNetConfig(ndim=3, depth=6, base_channels=512, n_classes=256)
    path = tmp_path / "hostile.ckpt"
    _checkpoint(path, hostile, dict(small.state_dict()))
    assert path.stat().st_size < 10_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"hostile\.ckpt: the config declares a network"):
        read_checkpoint_header(path)
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB


def test_checkpoint_weights_must_match_the_declared_network(tmp_path):
    small = UNet(UNetConfig(ndim=2, depth=1, base_channels=2))
    state = dict(small.state_dict())
    _checkpoint(tmp_path / "deeper.ckpt", UNetConfig(ndim=2, depth=2, base_channels=2), state)
    with pytest.raises(CheckpointError, match=r"deeper\.ckpt: the weights do not match .*missing"):
        read_checkpoint_header(tmp_path / "deeper.ckpt")
    _checkpoint(tmp_path / "wider.ckpt", UNetConfig(ndim=2, depth=1, base_channels=4), state)
    with pytest.raises(CheckpointError, match=r"wider\.ckpt: weight '.*' has shape"):
        read_checkpoint_header(tmp_path / "wider.ckpt")
    save_checkpoint(tmp_path / "fine.ckpt", small)
    assert read_checkpoint_header(tmp_path / "fine.ckpt")[0] == small.config


# ------------------------------------------------------------------------- sizes


def test_sparse_tiff_needs_allow_sparse(tmp_path):
    _sparse_tiff(tmp_path / "s.tif", 9000, "uint8", 4096)  # 77 MiB declared in ~5 KB
    with pytest.raises(InvalidVolumeError, match=r"s\.tif: declares 9000×9000 uint8"):
        ingest_volume(str(tmp_path / "s.tif"), str(tmp_path / "s.zarr"))
    assert not (tmp_path / "s.zarr").exists()
    info = ingest_volume(
        str(tmp_path / "s.tif"), str(tmp_path / "s.zarr"), chunks=(4096, 4096), allow_sparse=True
    )
    assert info.shape == (9000, 9000)
    assert read_image_info(str(tmp_path / "s.zarr")).stats.max == 0


def test_write_image_stats_include_nonfinite(tmp_path):
    a = np.ones((4, 4), np.float32)
    a[0, 0] = np.nan
    info = write_image(str(tmp_path / "w.zarr"), a, "yx")
    assert info.stats is not None
    assert info.stats.nonfinite == 1
