"""Ingest: TIFF sources of every kind -> OME-Zarr, bitwise; S3 both ways; resume; bad inputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from tasks.blockwise import Markers
from tasks.ingest import (
    DELAY_ENV,
    downsample,
    ingest_status,
    ingest_volume,
    make_plan,
    plan_units,
)
from tasks.store import read_image_info, storage_options
from tasks.tiff import natural_key, open_source, read_box
from unet_core.errors import (
    ConfigError,
    InvalidVolumeError,
    StorageAccessError,
    StoreConflictError,
    VolumeNotFoundError,
)
from unet_core.normalize import compute_stats

ROOT = Path(__file__).resolve().parents[2]


def ingest(src, dst, **kw):
    kw.setdefault("scheduler", "threads")
    kw.setdefault("workers", 2)
    return ingest_volume(str(src), str(dst), **kw)


def level0(dst) -> np.ndarray:
    dst = str(dst)
    return np.asarray(
        zarr.open_array(f"{dst}/0", mode="r", storage_options=storage_options(dst))[...]
    )


def validate_ngff(path) -> dict:
    """Read the image back with ome-zarr-py and validate it with ome-zarr-models."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image

    nodes = list(Reader(parse_url(str(path)))())
    assert nodes, "ome_zarr found no image"
    node = nodes[0]
    model = Image.from_zarr(zarr.open_group(str(path), mode="r"))
    ms = model.attributes.ome.multiscales[0]
    assert [a.name for a in ms.axes] == list(read_image_info(str(path)).axes)
    return {
        "axes": [a["name"] for a in node.metadata["axes"]],
        "types": [a["type"] for a in node.metadata["axes"]],
        "units": [a.get("unit") for a in node.metadata["axes"]],
        "scales": [t[0]["scale"] for t in node.metadata["coordinateTransformations"]],
        "shapes": [tuple(d.shape) for d in node.data],
    }


def assert_stats_match(info, ref: np.ndarray):
    expected = compute_stats(ref)
    got = info.stats
    assert got is not None
    assert got.count == expected.count
    assert got.min == expected.min
    assert got.max == expected.max
    assert got.mean == pytest.approx(expected.mean, rel=1e-9, abs=1e-12)
    assert got.std == pytest.approx(expected.std, rel=1e-9, abs=1e-12)
    if ref.dtype.kind in "ui" and ref.dtype.itemsize <= 2:
        assert got.percentiles == expected.percentiles
    else:
        width = (expected.max - expected.min) / 65536 * 1.01
        for k, v in expected.percentiles.items():
            assert got.percentiles[k] == pytest.approx(v, abs=width)


# --------------------------------------------------------------------- sources


def _rng(seed=0):
    return np.random.default_rng(seed)


def _volume(shape, dtype, seed=0):
    rng = _rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        return (rng.normal(100, 20, shape)).astype(dt)
    info = np.iinfo(dt)
    lo, hi = max(info.min, -3000), min(info.max, 60000)
    return rng.integers(lo, hi, shape, endpoint=True).astype(dt)


def _make(kind: str, tmp: Path):
    """(src path, reference array in output axes, expected axes, expected scale, unit)."""
    if kind == "2d-single-page":
        a = _volume((150, 97), "uint16")
        tifffile.imwrite(tmp / "plane.tif", a)
        return tmp / "plane.tif", a, "yx", (1.0, 1.0), None
    if kind == "3d-multipage":
        a = _volume((21, 40, 33), "uint8")
        tifffile.imwrite(tmp / "stack.tif", a, metadata={"axes": "ZYX"})
        return tmp / "stack.tif", a, "zyx", (1.0, 1.0, 1.0), None
    if kind == "bigtiff-tiled":
        a = _volume((9, 100, 70), "int16")
        tifffile.imwrite(
            tmp / "tiled.btf",
            a,
            bigtiff=True,
            tile=(32, 16),
            compression="zlib",
            metadata={"axes": "ZYX"},
        )
        return tmp / "tiled.btf", a, "zyx", (1.0, 1.0, 1.0), None
    if kind == "ome-physical":
        a = _volume((12, 50, 61), "float32")
        tifffile.imwrite(
            tmp / "img.ome.tif",
            a,
            ome=True,
            metadata={
                "axes": "ZYX",
                "PhysicalSizeZ": 2.0,
                "PhysicalSizeY": 0.25,
                "PhysicalSizeX": 250.0,
                "PhysicalSizeXUnit": "nm",
            },
        )
        return tmp / "img.ome.tif", a, "zyx", (2.0, 0.25, 0.25), "micrometer"
    if kind == "imagej":
        a = _volume((7, 30, 20), "uint16")
        tifffile.imwrite(
            tmp / "ij.tif",
            a,
            imagej=True,
            resolution=(1 / 0.5, 1 / 0.5),
            metadata={"spacing": 1.5, "unit": "micron", "axes": "ZYX"},
        )
        return tmp / "ij.tif", a, "zyx", (1.5, 0.5, 0.5), "micrometer"
    if kind == "imagej-one-ifd":
        # what ImageJ writes over 4 GiB: one IFD, the pages follow it contiguously
        a = _volume((9, 40, 30), "uint16")
        tifffile.imwrite(
            tmp / "hyper.tif",
            a,
            imagej=True,
            truncate=True,
            resolution=(4.0, 4.0),
            metadata={"axes": "ZYX", "unit": "um", "spacing": 1.0},
        )
        return tmp / "hyper.tif", a, "zyx", (1.0, 0.25, 0.25), "micrometer"
    if kind == "rgb-slices-glob":
        a = _volume((4, 20, 30, 3), "uint8")
        for i in range(len(a)):
            tifffile.imwrite(tmp / f"rgb{i + 1}.tif", a[i], photometric="rgb")
        tifffile.imwrite(tmp / "other.tif", a[0], photometric="rgb")
        return tmp / "rgb*.tif", np.moveaxis(a, -1, 0), "czyx", (1.0,) * 4, None
    if kind == "slices-folder":
        a = _volume((12, 31, 45), "uint16")
        folder = tmp / "slices"
        folder.mkdir()
        for i in _rng(3).permutation(len(a)):  # written out of order; names sort naturally
            tifffile.imwrite(folder / f"slice_{i}.tif", a[i])
        (folder / "notes.txt").write_text("not an image")
        return folder, a, "zyx", (1.0, 1.0, 1.0), None
    if kind == "multichannel-ome":
        a = _volume((6, 3, 40, 35), "uint16")  # z, c, y, x in the file
        tifffile.imwrite(tmp / "mc.ome.tif", a, ome=True, metadata={"axes": "ZCYX"})
        return tmp / "mc.ome.tif", a.transpose(1, 0, 2, 3), "czyx", (1.0,) * 4, None
    if kind == "rgb":
        a = _volume((45, 50, 3), "uint8")
        tifffile.imwrite(tmp / "rgb.tif", a, photometric="rgb")
        return tmp / "rgb.tif", np.moveaxis(a, -1, 0), "cyx", (1.0,) * 3, None
    raise AssertionError(kind)


KINDS = [
    "2d-single-page",
    "3d-multipage",
    "bigtiff-tiled",
    "ome-physical",
    "imagej",
    "imagej-one-ifd",
    "slices-folder",
    "rgb-slices-glob",
    "multichannel-ome",
    "rgb",
]


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bitwise_and_valid_ngff(tmp_path, kind):
    src, ref, axes, scale, unit = _make(kind, tmp_path)
    dst = tmp_path / "out.ome.zarr"
    # a small unit budget so every source is read in several boxes
    info = ingest(src, dst, unit_mib=0.02)
    data = level0(dst)
    assert data.dtype == ref.dtype
    assert np.array_equal(data, ref)
    assert info.axes == axes
    assert info.shape == ref.shape
    assert info.scale == pytest.approx(scale)
    assert info.unit == unit
    assert_stats_match(info, ref)
    meta = validate_ngff(dst)
    assert meta["axes"] == list(axes)
    assert meta["types"] == ["channel" if a == "c" else "space" for a in axes]
    assert meta["scales"][0] == pytest.approx(list(scale))
    assert meta["units"] == [None if a == "c" else unit for a in axes]
    arr = zarr.open_array(str(dst / "0"), mode="r")
    assert list(arr.metadata.dimension_names) == list(axes)
    attrs = zarr.open_group(str(dst), mode="r").attrs.asdict()
    assert attrs["segflow"]["ingest"]["status"] == "complete"
    assert attrs["segflow"]["source"]["url"] == str(src)
    assert Markers.open(str(dst), "ingest").done_mask().all()


def test_default_chunks_compression_and_channel_chunking(tmp_path):
    a = _volume((70, 300, 140), "uint16")
    tifffile.imwrite(tmp_path / "v.tif", a, metadata={"axes": "ZYX"})
    info = ingest(tmp_path / "v.tif", tmp_path / "d.zarr")
    assert info.chunks == (64, 128, 128)
    codecs = zarr.open_array(str(tmp_path / "d.zarr/0"), mode="r").metadata.codecs
    assert any(type(c).__name__ == "ZstdCodec" for c in codecs)

    info = ingest(tmp_path / "v.tif", tmp_path / "b.zarr", chunks=(16, 64, 32), compression="blosc")
    assert info.chunks == (16, 64, 32)
    codecs = zarr.open_array(str(tmp_path / "b.zarr/0"), mode="r").metadata.codecs
    assert any(type(c).__name__ == "BloscCodec" for c in codecs)
    assert np.array_equal(level0(tmp_path / "b.zarr"), a)

    info = ingest(tmp_path / "v.tif", tmp_path / "n.zarr", compression="none")
    codecs = zarr.open_array(str(tmp_path / "n.zarr/0"), mode="r").metadata.codecs
    assert [type(c).__name__ for c in codecs] == ["BytesCodec"]

    src, _ref, *_ = _make("multichannel-ome", tmp_path)
    info = ingest(src, tmp_path / "c.zarr", chunks=(4, 16, 16))
    assert info.chunks == (3, 4, 16, 16)  # all channels in a chunk

    with pytest.raises(ConfigError, match="compression"):
        ingest(tmp_path / "v.tif", tmp_path / "x.zarr", compression="lz4")
    with pytest.raises(ConfigError, match="chunks"):
        ingest(tmp_path / "v.tif", tmp_path / "x.zarr", chunks=(4, 4))


def test_pyramid_levels_are_block_means_and_valid(tmp_path):
    a = _volume((20, 64, 50), "uint16")
    tifffile.imwrite(
        tmp_path / "v.ome.tif",
        a,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 1.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.5},
    )
    dst = tmp_path / "p.zarr"
    ingest(tmp_path / "v.ome.tif", dst, levels=2, chunks=(8, 16, 16))
    meta = validate_ngff(dst)
    # z (1.0) is coarser than 1.5 x xy (0.5) at first, so only y and x halve; then all three
    assert meta["shapes"] == [(20, 64, 50), (20, 32, 25), (10, 16, 13)]
    assert meta["scales"] == [[1.0, 0.5, 0.5], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    one = np.asarray(zarr.open_array(str(dst / "1"), mode="r")[...])
    assert np.array_equal(one, downsample(a, (1, 2, 2)))
    # fewer levels on a re-run drop the extra ones
    ingest(tmp_path / "v.ome.tif", dst, levels=1, chunks=(8, 16, 16))
    assert validate_ngff(dst)["shapes"] == [(20, 64, 50), (20, 32, 25)]
    assert "2" not in zarr.open_group(str(dst), mode="r")


def test_read_box_reads_any_box_of_any_layout(tmp_path):
    rng = _rng(5)
    cases = {
        "planar.tif": (
            rng.integers(0, 255, (3, 50, 70), dtype=np.uint8),
            {"photometric": "rgb", "planarconfig": "separate"},
        ),
        "big_endian.tif": (
            rng.integers(0, 60000, (7, 50, 70), dtype=np.uint16),
            {"byteorder": ">", "metadata": {"axes": "ZYX"}},
        ),
        "pred.tif": (
            rng.random((6, 50, 70)).astype("f4"),
            {"compression": "zlib", "predictor": True, "metadata": {"axes": "ZYX"}},
        ),
        "strips.tif": (
            rng.integers(0, 9, (4, 300, 70), dtype=np.int16),
            {
                "compression": "zlib",
                "rowsperstrip": 16,
                "photometric": "minisblack",
                "metadata": {"axes": "ZYX"},
            },
        ),
    }
    # 600 rows of 2 kB are over the 1 MiB band: a box of some columns is read row by row
    cases["wide.tif"] = (
        rng.integers(0, 60000, (2, 600, 1000), dtype=np.uint16),
        {"photometric": "minisblack", "metadata": {"axes": "ZYX"}},
    )
    for name, (a, kw) in cases.items():
        tifffile.imwrite(tmp_path / name, a, **kw)
        source = open_source(str(tmp_path / name))
        for _ in range(15):
            box = []
            for n in source.shape:
                lo = int(rng.integers(0, n))
                box.append((lo, int(rng.integers(lo + 1, n + 1))))
            got = read_box(source, box)
            assert np.array_equal(got, a[tuple(slice(*b) for b in box)]), name
        x1 = min(700, source.shape[-1] - 1)
        box = [(0, n) for n in source.shape[:-1]] + [(3, x1)]
        assert np.array_equal(read_box(source, box), a[..., 3:x1]), name


def test_units_bound_memory_and_split_x_when_rows_are_wide():
    # 3D: one chunk deep, whole rows first
    assert plan_units("zyx", (512, 1024, 1024), (64, 128, 128), 2, 32 << 20) == (1, 2, 8)
    # a row of chunks over budget: x is split
    assert plan_units("zyx", (512, 1024, 8192), (64, 128, 128), 2, 32 << 20) == (1, 1, 16)
    # small planes: whole planes, then several chunks deep
    assert plan_units("zyx", (512, 64, 64), (64, 64, 64), 2, 4 << 20) == (8, 1, 1)
    # channels always whole
    assert plan_units("czyx", (3, 64, 64, 64), (3, 32, 32, 32), 1, 1) == (1, 1, 1, 1)


def test_natural_order():
    names = ["s10.tif", "s2.tif", "s1.tif", "S3.tif"]
    assert sorted(names, key=natural_key) == ["s1.tif", "s2.tif", "S3.tif", "s10.tif"]


def test_axes_override_and_ambiguity(tmp_path):
    a = _volume((5, 20, 30), "uint16")
    tifffile.imwrite(tmp_path / "plain.tif", a, metadata=None)
    # no axis metadata at all: a stack of single-channel planes is read as z-slices
    info = ingest(tmp_path / "plain.tif", tmp_path / "p.zarr")
    assert info.axes == "zyx"
    # pages of three samples and no metadata: z-slices of colour, or channels? ambiguous
    rgb = np.repeat(a[:, :, :, None], 3, axis=3).astype("uint8")
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, metadata=None, photometric="rgb")
    dst = tmp_path / "a.zarr"
    with pytest.raises(InvalidVolumeError, match=r"rgb\.tif: the axes are ambiguous.*'axes'"):
        ingest(tmp_path / "rgb.tif", dst)
    assert not dst.exists()
    info = ingest(tmp_path / "plain.tif", dst, axes="zyx")
    assert info.axes == "zyx"
    assert np.array_equal(level0(dst), a)
    info = ingest(tmp_path / "plain.tif", tmp_path / "c.zarr", axes="cyx")
    assert info.axes == "cyx"
    with pytest.raises(ConfigError, match="names 2 axes"):
        ingest(tmp_path / "plain.tif", tmp_path / "x.zarr", axes="yx")
    # ImageJ time points read as z when asked
    tifffile.imwrite(tmp_path / "t.tif", a, imagej=True, metadata={"axes": "TYX"})
    with pytest.raises(InvalidVolumeError, match="time series"):
        ingest(tmp_path / "t.tif", tmp_path / "t.zarr")
    assert ingest(tmp_path / "t.tif", tmp_path / "t.zarr", axes="zyx").axes == "zyx"
    # voxel size given on the command line
    info = ingest(tmp_path / "plain.tif", tmp_path / "v.zarr", axes="zyx", voxel_size=(3, 0.2, 0.2))
    assert info.scale == (3.0, 0.2, 0.2)
    assert info.unit == "micrometer"


def test_rerun_is_idempotent_and_other_src_refused(tmp_path):
    a = _volume((10, 40, 40), "uint16")
    tifffile.imwrite(tmp_path / "a.tif", a, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "b.tif", a[::-1], metadata={"axes": "ZYX"})
    dst = tmp_path / "d.zarr"
    first = ingest(tmp_path / "a.tif", dst, chunks=(4, 16, 16), unit_mib=0.01)
    mtimes = _chunk_mtimes(dst)
    again = ingest(tmp_path / "a.tif", dst, chunks=(4, 16, 16), unit_mib=0.01)
    assert again == first
    assert _chunk_mtimes(dst) == mtimes  # nothing rewritten
    with pytest.raises(
        StoreConflictError,
        match=r"d\.zarr: already holds an image ingested from .*a\.tif.*'overwrite'",
    ):
        ingest(tmp_path / "b.tif", dst)
    with pytest.raises(StoreConflictError, match="other settings"):
        ingest(tmp_path / "a.tif", dst, chunks=(5, 16, 16))
    assert np.array_equal(level0(dst), a)  # untouched
    ingest(tmp_path / "b.tif", dst, overwrite=True)
    assert np.array_equal(level0(dst), a[::-1])


def test_dst_with_other_data_is_refused(tmp_path):
    a = _volume((4, 16, 16), "uint8")
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="minisblack", metadata={"axes": "ZYX"})
    other = tmp_path / "other.zarr"
    zarr.create_array(str(other), shape=(3,), dtype="uint8")
    with pytest.raises(
        StoreConflictError, match=r"other\.zarr: already holds a zarr store that segflow did not"
    ):
        ingest(tmp_path / "a.tif", other)
    # --overwrite deletes only stores segflow made: a foreign zarr store stays
    with pytest.raises(StoreConflictError, match="never replaced"):
        ingest(tmp_path / "a.tif", other, overwrite=True)
    assert zarr.open_array(str(other), mode="r").shape == (3,)

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    with pytest.raises(StoreConflictError, match="other files"):
        ingest(tmp_path / "a.tif", folder)
    with pytest.raises(StoreConflictError, match="never replaced"):
        ingest(tmp_path / "a.tif", folder, overwrite=True)
    assert (folder / "keep.txt").read_text() == "precious"
    # an empty folder is fine
    (tmp_path / "empty").mkdir()
    ingest(tmp_path / "a.tif", tmp_path / "empty")


# --------------------------------------------------------------------- bad inputs


def _bad_inputs(tmp: Path) -> dict[str, tuple[Path, type, str]]:
    a = _volume((10, 64, 64), "uint16")
    tifffile.imwrite(tmp / "whole.tif", a, metadata={"axes": "ZYX"})
    data = (tmp / "whole.tif").read_bytes()
    (tmp / "truncated.tif").write_bytes(data[: int(len(data) * 0.6)])
    (tmp / "cut_end.tif").write_bytes(data[:-100])
    tifffile.imwrite(tmp / "zl.tif", a, compression="zlib", metadata={"axes": "ZYX"})
    zl = (tmp / "zl.tif").read_bytes()
    (tmp / "cut_zlib.tif").write_bytes(zl[: len(zl) - 2000])
    (tmp / "text.tif").write_text("this is not an image at all")
    (tmp / "empty.tif").write_bytes(b"")
    shapes = tmp / "shapes"
    shapes.mkdir()
    for i in range(3):
        tifffile.imwrite(shapes / f"s{i}.tif", np.zeros((20, 20 if i != 2 else 21), np.uint8))
    dtypes = tmp / "dtypes"
    dtypes.mkdir()
    for i in range(3):
        tifffile.imwrite(
            dtypes / f"s{i}.tif", np.zeros((20, 20), np.uint8 if i != 1 else np.uint16)
        )
    rgb = np.repeat(a[:, :, :, None], 3, axis=3).astype("uint8")
    tifffile.imwrite(tmp / "plain.tif", rgb, metadata=None, photometric="rgb")
    return {
        "truncated": (
            tmp / "truncated.tif",
            InvalidVolumeError,
            r"truncated\.tif: the TIFF is truncated",
        ),
        "truncated-end": (
            tmp / "cut_end.tif",
            InvalidVolumeError,
            r"cut_end\.tif: the TIFF is truncated",
        ),
        "truncated-zlib": (
            tmp / "cut_zlib.tif",
            InvalidVolumeError,
            r"cut_zlib\.tif: the TIFF is truncated",
        ),
        "not-a-tiff": (tmp / "text.tif", InvalidVolumeError, r"text\.tif: not a TIFF file"),
        "empty": (tmp / "empty.tif", InvalidVolumeError, r"empty\.tif: the file is empty"),
        "slice-shapes": (
            shapes,
            InvalidVolumeError,
            r"s2\.tif: slice shape \(20, 21\) differs from \(20, 20\) of s0\.tif",
        ),
        "slice-dtypes": (
            dtypes,
            InvalidVolumeError,
            r"s1\.tif: slice dtype uint16 differs from uint8 of s0\.tif",
        ),
        "ambiguous-axes": (
            tmp / "plain.tif",
            InvalidVolumeError,
            r"plain\.tif: the axes are ambiguous",
        ),
        "missing": (tmp / "nope.tif", VolumeNotFoundError, r"nope\.tif: no such file or folder"),
        "empty-folder": (tmp / "shapes" / "*.png", VolumeNotFoundError, r"\*\.png: no matches"),
    }


BAD = [
    "truncated",
    "truncated-end",
    "truncated-zlib",
    "not-a-tiff",
    "empty",
    "slice-shapes",
    "slice-dtypes",
    "ambiguous-axes",
    "missing",
    "empty-folder",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_one_clear_error_and_nothing_written(tmp_path, case):
    src, exc, pattern = _bad_inputs(tmp_path)[case]
    dst = tmp_path / "out.zarr"
    with pytest.raises(exc, match=pattern) as info:
        ingest(src, dst)
    assert "\n" not in str(info.value)
    assert not dst.exists()


def test_cli_prints_one_line_and_exits_3(tmp_path):
    from typer.testing import CliRunner

    from segflow.cli import _register, app

    _register()
    src, _, _pattern = _bad_inputs(tmp_path)["truncated"]
    result = CliRunner().invoke(app, ["ingest", str(src), str(tmp_path / "o.zarr"), "-q"])
    assert result.exit_code == 3  # ExitCode.BAD_INPUT
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("segflow: error: ")
    assert "truncated.tif: the TIFF is truncated" in lines[0]

    good = tmp_path / "whole.tif"
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            str(good),
            str(tmp_path / "o.zarr"),
            "--chunks",
            "4,32,32",
            "--levels",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["shape"] == [10, 64, 64]
    assert summary["chunks"] == [4, 32, 32]
    assert summary["stats"]["p99.8"] > 0


# --------------------------------------------------------------------- Dask


def test_sync_scheduler_and_distributed_client(tmp_path):
    from distributed import Client, LocalCluster

    src, ref, *_ = _make("multichannel-ome", tmp_path)
    ingest(src, tmp_path / "p.zarr", scheduler="sync", unit_mib=0.01)
    assert np.array_equal(level0(tmp_path / "p.zarr"), ref)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False) as cluster,
        Client(cluster) as client,
    ):
        ingest(src, tmp_path / "d.zarr", scheduler=client, unit_mib=0.01, levels=1)
        # the same cluster by its address (a Client is made and closed for the ingest)
        address = cluster.scheduler_address
        ingest(src, tmp_path / "a.zarr", scheduler=address, unit_mib=0.01)
    assert np.array_equal(level0(tmp_path / "d.zarr"), ref)
    assert np.array_equal(level0(tmp_path / "a.zarr"), ref)


# --------------------------------------------------------------------- resume


def _chunk_mtimes(dst: Path) -> dict[str, int]:
    base = dst / "0" / "c"
    return {str(p.relative_to(base)): p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_killed_ingest_resumes_rewriting_only_missing_units(tmp_path):
    a = _volume((32, 96, 64), "uint16")
    src = tmp_path / "v.tif"
    tifffile.imwrite(src, a, metadata={"axes": "ZYX"})
    dst = tmp_path / "v.ome.zarr"
    args = ["--chunks", "4,32,64", "--unit-mib", "0.015", "--workers", "2", "-q"]
    env = {**os.environ, DELAY_ENV: "0.3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "segflow", "ingest", str(src), str(dst), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    total = None
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            mask = (
                Markers.open(str(dst), "ingest").done_mask()
                if (dst / "segflow-done" / "ingest").exists()
                else None
            )
            if mask is not None and mask.sum() >= 4:
                break
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    done_at_kill = Markers.open(str(dst), "ingest").done_mask()
    total = done_at_kill.size
    assert 4 <= done_at_kill.sum() < total
    with pytest.raises(InvalidVolumeError, match="has not finished"):
        read_image_info(str(dst))
    assert ingest_status(str(dst))["status"] == "incomplete"
    before = _chunk_mtimes(dst)
    time.sleep(0.01)

    result = subprocess.run(
        [sys.executable, "-m", "segflow", "ingest", str(src), str(dst), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != DELAY_ENV},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert np.array_equal(level0(dst), a)
    info = read_image_info(str(dst))
    assert_stats_match(info, a)
    validate_ngff(dst)

    plan = make_plan(open_source(str(src)), str(dst), (4, 32, 64), unit_mib=0.015)
    assert plan.level0.grid == done_at_kill.shape
    after = _chunk_mtimes(dst)
    rewritten_units = set()
    for key, mtime in after.items():
        chunk = tuple(int(p) for p in Path(key).parts)
        unit = tuple(c // u for c, u in zip(chunk, plan.level0.unit_chunks, strict=True))
        if done_at_kill[unit]:
            assert before[key] == mtime, f"chunk {key} of a finished unit was rewritten"
        elif before.get(key) != mtime:
            rewritten_units.add(unit)
    assert len(rewritten_units) == total - done_at_kill.sum()


# --------------------------------------------------------------------- S3


def _upload(local: Path, url: str):
    from tasks.store import filesystem

    fs = filesystem(url)
    if local.is_dir():
        for p in local.iterdir():
            fs.put_file(str(p), f"{url}/{p.name}")
    else:
        fs.put_file(str(local), url)


def test_s3_source_and_destination(tmp_path, s3_bucket):
    src, ref, _axes, scale, unit = _make("ome-physical", tmp_path)
    url = f"s3://{s3_bucket}/in/img.ome.tif"
    _upload(src, url)
    info = ingest(url, tmp_path / "from_s3.zarr", unit_mib=0.02)
    assert np.array_equal(level0(tmp_path / "from_s3.zarr"), ref)
    assert info.scale == pytest.approx(scale)
    assert info.unit == unit
    validate_ngff(tmp_path / "from_s3.zarr")

    folder, ref2, *_ = _make("slices-folder", tmp_path)
    _upload(folder, f"s3://{s3_bucket}/slices")
    dst = f"s3://{s3_bucket}/out/slices.ome.zarr"
    info = ingest(f"s3://{s3_bucket}/slices", dst, unit_mib=0.005, levels=1)
    assert info.url == dst
    assert info.axes == "zyx"
    assert np.array_equal(level0(dst), ref2)
    assert_stats_match(info, ref2)
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(dst, mode="r", storage_options=storage_options(dst)))
    # re-run on S3 is a no-op, a different source is refused
    assert ingest(f"s3://{s3_bucket}/slices", dst, unit_mib=0.005, levels=1) == info
    with pytest.raises(StoreConflictError, match="already holds"):
        ingest(url, dst)


def test_s3_missing_bucket(tmp_path, s3_endpoint):
    src, *_ = _make("3d-multipage", tmp_path)
    with pytest.raises(
        StorageAccessError,
        match=r"s3://no-such-bucket-4711/x\.tif: the S3 bucket 'no-such-bucket-4711' does not",
    ):
        ingest("s3://no-such-bucket-4711/x.tif", tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()
    with pytest.raises(
        StorageAccessError, match="the S3 bucket 'no-such-bucket-4711' does not exist"
    ):
        ingest(src, "s3://no-such-bucket-4711/o.zarr")


def test_s3_missing_object(tmp_path, s3_bucket):
    with pytest.raises(VolumeNotFoundError, match="no such file or folder"):
        ingest(f"s3://{s3_bucket}/nothing.tif", tmp_path / "o.zarr")


def test_s3_wrong_credentials(tmp_path, s3_with_auth):
    src, *_ = _make("3d-multipage", tmp_path)
    with pytest.raises(
        StorageAccessError, match=r"s3://images/o\.zarr: access denied .*credentials"
    ):
        ingest(src, "s3://images/o.zarr")
    with pytest.raises(StorageAccessError, match=r"s3://images/in\.tif: access denied"):
        ingest("s3://images/in.tif", tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_float_stats_use_two_passes_and_ignore_nan(tmp_path):
    a = _volume((6, 30, 40), "float32")
    a[0, 0, :5] = np.nan
    tifffile.imwrite(tmp_path / "f.tif", a, metadata={"axes": "ZYX"})
    info = ingest(tmp_path / "f.tif", tmp_path / "f.zarr", unit_mib=0.01)
    data = level0(tmp_path / "f.zarr")
    assert np.array_equal(data, a, equal_nan=True)
    finite = a[np.isfinite(a)]
    assert info.stats.count == finite.size
    assert info.stats.min == float(finite.min())
    assert info.stats.max == float(finite.max())
    assert info.stats.mean == pytest.approx(float(finite.astype(np.float64).mean()), rel=1e-9)
    width = float(finite.max() - finite.min()) / 65536
    expected = compute_stats(finite)  # same percentile definition, same histogram range
    for q in (1.0, 50.0, 99.8):
        assert info.stats.percentile(q) == pytest.approx(expected.percentile(q), abs=width)
    assert math.isfinite(info.stats.std)
