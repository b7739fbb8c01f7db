"""Stitching instances across chunk faces, object tables, label pyramids and TIFF export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
import zarr
from scipy import ndimage

from tasks.export import export_tiff
from tasks.instances import id_dtype, stitch
from tasks.segment import SegmentParams, segment_image
from tasks.store import write_image, write_labels
from unet_core import UNet, UNetConfig, save_checkpoint
from unet_core.metrics import same_partition
from unet_core.slicelink import LinkParams, link_instances


def semantic_store(path, mask: np.ndarray, chunks, scale=None, image=None) -> str:
    """An image store (``image``, else the mask) with a semantic label image (1 =
    foreground) beside it."""
    url = str(path)
    axes = "zyx"[-mask.ndim :]
    image = mask.astype(np.uint8) if image is None else image
    write_image(url, image, axes, chunks=chunks, scale=scale)
    write_labels(url, "semantic", mask.astype(np.uint8), chunks=chunks, key="test-mask")
    return url


def random_mask(rng, shape, sigma=1.5, level=0.52):
    return ndimage.gaussian_filter(rng.random(shape), sigma) > level


CASES = [
    ((40, 50, 45), (8, 16, 10)),
    ((40, 50, 45), (13, 7, 20)),
    ((31, 33, 29), (31, 33, 29)),  # one chunk
    ((200, 190), (32, 17)),
    ((200, 190), (64, 64)),
]


@pytest.mark.parametrize(("shape", "chunks"), CASES)
def test_partition_equals_scipy_label(tmp_path, dask_client, shape, chunks):
    rng = np.random.default_rng(sum(shape))
    mask = random_mask(rng, shape)
    url = semantic_store(tmp_path / "img.ome.zarr", mask, chunks)
    for connectivity in sorted({1, len(shape)}):
        res = stitch(url, connectivity=connectivity, client=dask_client, write_table=False)
        out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
        ref, n = ndimage.label(mask, ndimage.generate_binary_structure(len(shape), connectivity))
        assert same_partition(out, ref), connectivity
        assert res.objects == n
        assert out.max() == n  # consecutive ids
        assert out.dtype == np.uint32


def test_objects_crossing_one_two_and_three_faces_and_a_snake(tmp_path, dask_client):
    mask = np.zeros((24, 24, 24), dtype=bool)
    mask[2:6, 6:10, 2:4] = True  # crosses the y face at 8
    mask[6:10, 6:10, 6:10] = True  # crosses z, y and x faces at 8: a corner cube
    mask[14:18, 2:4, 6:10] = True  # crosses z=16 and x=8
    # A snake through many chunks, touching chunk boundaries on every axis.
    z, y, x = 1, 12, 1
    for step in range(60):
        mask[z, y, x] = True
        axis = step % 3
        if axis == 0:
            x = min(x + 1, 22)
        elif axis == 1:
            y = min(y + 1, 22)
        else:
            z = min(z + 1, 22)
    # Diagonal-only contacts: separate under face connectivity, joined under full.
    mask[20, 2, 2] = mask[21, 3, 3] = True
    # chunks of 8: 27 blocks, every object above crosses a face (4: 216 blocks, 8x the time)
    url = semantic_store(tmp_path / "img.ome.zarr", mask, (8, 8, 8))
    for connectivity in (1, 2, 3):
        stitch(url, connectivity=connectivity, client=dask_client, write_table=False)
        out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
        ref, _ = ndimage.label(mask, ndimage.generate_binary_structure(3, connectivity))
        assert same_partition(out, ref), connectivity
    # The snake is one object spanning many chunks.
    assert len(np.unique(out[out > 0])) < 8


def test_more_objects_than_uint16_and_uint64_ids(tmp_path, dask_client):
    mask = np.zeros((600, 600), dtype=bool)
    mask[::2, ::2] = True  # 90,000 isolated pixels
    mask[100, :] = True  # and one long bar joining 300 of them across 10 chunks
    url = semantic_store(tmp_path / "img.ome.zarr", mask, (64, 64))
    res = stitch(url, client=dask_client, write_table=True)
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    ref, n = ndimage.label(mask)
    assert n > 2**16
    assert res.objects == n
    assert same_partition(out, ref)
    # Ids beyond 2**32 (an offset keeps ids unique across volumes) switch to uint64.
    assert id_dtype(2**32 - 1) == np.uint32
    assert id_dtype(2**32) == np.uint64
    res64 = stitch(url, client=dask_client, write_table=False, id_offset=2**32 - 10)
    out64 = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    assert res64.dtype == "uint64"
    assert out64.dtype == np.uint64
    assert out64.max() == 2**32 - 10 + n
    assert same_partition(out64, ref)


def test_object_table_matches_scipy_and_min_size(tmp_path, dask_client):
    rng = np.random.default_rng(3)
    mask = random_mask(rng, (30, 40, 44))
    url = semantic_store(tmp_path / "vol.ome.zarr", mask, (10, 16, 16), scale=(2.0, 0.5, 0.25))
    res = stitch(url, connectivity=1, client=dask_client)
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    table = pd.read_csv(res.table_csv).set_index("id")
    assert table.equals(pd.read_parquet(res.table_parquet).set_index("id"))
    ids = np.arange(1, out.max() + 1)
    counts = ndimage.sum_labels(np.ones_like(out), out, ids)
    centroids = np.array(ndimage.center_of_mass(np.ones_like(out), out, ids))
    assert np.array_equal(table.loc[ids, "voxels"].to_numpy(), counts.astype(int))
    got = table.loc[ids, ["centroid_z", "centroid_y", "centroid_x"]].to_numpy()
    assert np.allclose(got, centroids)
    assert np.allclose(table.loc[ids, "volume"], counts * 2.0 * 0.5 * 0.25)
    slices = ndimage.find_objects(out)
    first = slices[0]
    assert table.loc[1, "bbox_min_z"] == first[0].start
    assert table.loc[1, "bbox_max_x"] == first[2].stop
    # Drop small objects: exactly those under the threshold vanish.
    small = int(np.median(counts))
    res2 = stitch(url, connectivity=1, client=dask_client, min_size=small)
    out2 = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    assert same_partition(out2, np.where(np.isin(out, ids[counts >= small]), out, 0))
    assert res2.objects == int((counts >= small).sum())


def assert_consecutive(url: str, res, offset: int = 0) -> np.ndarray:
    """The instance labels' ids are offset+1..offset+N, N the objects, and the object table
    (CSV and Parquet) lists exactly those ids with the labels' voxel counts."""
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    ids, counts = np.unique(out[out > 0], return_counts=True)
    assert np.array_equal(ids, np.arange(offset + 1, offset + res.objects + 1))
    assert int(out.max()) == offset + res.objects
    for table in (pd.read_csv(res.table_csv), pd.read_parquet(res.table_parquet)):
        assert np.array_equal(table["id"].to_numpy(), ids)
        assert np.array_equal(table["voxels"].to_numpy(), counts)
    made = zarr.open_group(url, mode="r")["labels/instances"].attrs["segflow"]
    assert (made["objects"], made["max_id"]) == (res.objects, offset + res.objects)
    return out


@pytest.mark.parametrize("offset", [0, 1000])
def test_ids_are_consecutive_after_the_size_filter(tmp_path, dask_client, offset):
    rng = np.random.default_rng(5)
    mask = random_mask(rng, (20, 40, 36))
    url = semantic_store(tmp_path / "vol.ome.zarr", mask, (7, 16, 12))
    ref, _ = ndimage.label(mask)
    sizes = np.bincount(ref.reshape(-1))[1:]
    small = int(np.median(sizes))
    assert 0 < (sizes < small).sum() < sizes.size  # some objects go, with ids among the kept
    res = stitch(url, client=dask_client, min_size=small, id_offset=offset)
    out = assert_consecutive(url, res, offset)
    assert res.objects == int((sizes >= small).sum())
    assert same_partition(out, np.where(np.isin(ref, np.flatnonzero(sizes >= small) + 1), ref, 0))


def test_labels_open_with_ome_zarr_and_validate(tmp_path, dask_client):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    rng = np.random.default_rng(4)
    vol = (rng.random((16, 64, 64)) * 1000).astype(np.uint16)
    url = str(tmp_path / "img.ome.zarr")
    write_image(url, vol, "zyx", chunks=(8, 32, 32), scale=(1.0, 0.5, 0.5))
    torch.manual_seed(0)
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, UNet(UNetConfig(ndim=2, depth=2, base_channels=4)))
    segment_image(url, str(ckpt), params=SegmentParams(tile=(1, 60, 60)), client=dask_client)
    stitch(url, client=dask_client)
    nodes = list(Reader(parse_url(url))())
    specs = {type(s).__name__ for node in nodes for s in node.specs}
    assert {"Multiscales", "Labels", "Label"} <= specs
    label_nodes = [n for n in nodes if any(type(s).__name__ == "Label" for s in n.specs)]
    assert {n.zarr.path.rstrip("/").rsplit("/", 1)[-1] for n in label_nodes} == {
        "semantic",
        "instances",
    }
    root = zarr.open_group(url, mode="r")
    Image.from_zarr(root)
    Labels.from_zarr(root["labels"])
    for name in ("semantic", "instances"):
        model = ImageLabel.from_zarr(root[f"labels/{name}"])
        assert model.attributes.ome.image_label is not None


def test_label_pyramid_matches_image_levels(tmp_path, dask_client):
    from tasks.ingest import ingest_volume

    rng = np.random.default_rng(5)
    vol = (rng.random((20, 70, 66)) * 255).astype(np.uint8)
    tif = tmp_path / "vol.tif"
    tifffile.imwrite(tif, vol, metadata={"axes": "ZYX"})
    url = str(tmp_path / "vol.ome.zarr")
    info = ingest_volume(str(tif), url, chunks=(10, 32, 32), levels=2)
    torch.manual_seed(0)
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, UNet(UNetConfig(ndim=2, depth=2, base_channels=4)))
    segment_image(info.url, str(ckpt), params=SegmentParams(tile=(1, 60, 60)), client=dask_client)
    root = zarr.open_group(url, mode="r")
    sem = root["labels/semantic"]
    image_ms = root.attrs["ome"]["multiscales"][0]["datasets"]
    label_ms = sem.attrs["ome"]["multiscales"][0]["datasets"]
    assert [d["coordinateTransformations"] for d in label_ms] == [
        d["coordinateTransformations"] for d in image_ms
    ]
    base = sem["0"][...]
    for level in (1, 2):
        assert sem[str(level)].shape == root[str(level)].shape
        ratio = tuple(
            round(b / a)
            for a, b in zip(
                image_ms[level - 1]["coordinateTransformations"][0]["scale"],
                image_ms[level]["coordinateTransformations"][0]["scale"],
                strict=True,
            )
        )
        prev = sem[str(level - 1)][...]
        # Nearest sampling: every value is an existing id of the level above.
        assert np.array_equal(
            prev[tuple(slice(None, None, f) for f in ratio)], sem[str(level)][...]
        )
    assert set(np.unique(sem["2"][...])) <= set(np.unique(base))


def test_export_tiff_equals_zarr_and_carries_physical_sizes(tmp_path, dask_client):
    rng = np.random.default_rng(6)
    mask = random_mask(rng, (12, 40, 36))
    url = semantic_store(tmp_path / "img.ome.zarr", mask, (5, 16, 16), scale=(2.0, 0.25, 0.25))
    stitch(url, client=dask_client)
    out = tmp_path / "instances.tif"
    export_tiff(url, str(out), labels="instances")
    labels = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    with tifffile.TiffFile(out) as tif:
        assert tif.is_bigtiff
        assert tif.is_ome
        data = tif.asarray()
        ome = tif.ome_metadata
    assert data.dtype == labels.dtype
    assert np.array_equal(data, labels)
    assert 'PhysicalSizeZ="2.0"' in ome
    assert 'PhysicalSizeX="0.25"' in ome
    assert 'PhysicalSizeXUnit="µm"' in ome


def test_cli_segment_with_instances_then_export(tmp_path):
    rng = np.random.default_rng(7)
    vol = (rng.random((8, 48, 48)) * 255).astype(np.uint8)
    url = str(tmp_path / "img.ome.zarr")
    write_image(url, vol, "zyx", chunks=(4, 32, 32))
    torch.manual_seed(0)
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, UNet(UNetConfig(ndim=2, depth=2, base_channels=4)))
    exe = [sys.executable, "-m", "segflow"]
    done = subprocess.run(
        [
            *exe,
            "segment",
            url,
            "--model",
            str(ckpt),
            "--instances",
            "--connectivity",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    objects = summary["stitch"]["objects"]
    sem = zarr.open_group(url, mode="r")["labels/semantic/0"][...]
    # A 2D model on a stack: slice objects linked across slices (tests/tasks/test_link_slices).
    assert summary["stitch"]["method"] == "slices"
    median = zarr.open_group(url, mode="r").attrs["segflow"]["stats"]["percentiles"]["50"]
    ref = link_instances(sem == 1, vol, connectivity=2, params=LinkParams(background=median))
    assert objects == ref.max()
    tif = tmp_path / "out.tif"
    exp = subprocess.run([*exe, "export", url, "--to", str(tif)], capture_output=True, text=True)
    assert exp.returncode == 0, exp.stderr
    assert np.array_equal(tifffile.imread(tif), zarr.open_group(url)["labels/instances/0"][...])
    again = subprocess.run(
        [*exe, "stitch", url, "--connectivity", "1", "--instance-method", "components", "--json"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["objects"] == ndimage.label(sem == 1)[1]
    bad = subprocess.run([*exe, "stitch", url, "--labels", "nope"], capture_output=True, text=True)
    assert bad.returncode == 3  # ExitCode.BAD_INPUT
    assert "labels/nope/0" in bad.stderr
