"""Slice-linked instances on chunked stores: equal to the whole-volume reference for any
chunking, chosen by default for 2D models on stacks, and reachable from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from test_stitch import (  # sibling test module (pytest puts tests/tasks on the path)
    assert_consecutive,
    semantic_store,
)

from tasks.instances import link_slices, stitch
from tasks.segment import SegmentParams, segment_image
from tasks.store import write_image
from unet_core import UNet, UNetConfig, save_checkpoint
from unet_core.checkpoint import CheckpointMeta
from unet_core.errors import ConfigError
from unet_core.metrics import same_partition
from unet_core.slicelink import LinkParams, link_instances
from unet_core.synthetic import blobs
from unet_core.targets import separate_touching


def stack_store(path, image: np.ndarray, mask: np.ndarray, chunks) -> str:
    """The stack (intensities) with its semantic mask under labels/semantic."""
    return semantic_store(path, mask, chunks, scale=(3.0, 1.0, 1.0), image=image)


def reference(url: str, mask: np.ndarray, params: LinkParams, **kw) -> np.ndarray:
    """The whole-volume reference, with the store's image and its recorded median."""
    root = zarr.open_group(url, mode="r")
    median = root.attrs["segflow"]["stats"]["percentiles"]["50"]
    params = replace(params, background=median if params.intensity_depth else 0.0)
    return link_instances(mask, root["0"][...], params=params, **kw)


@pytest.fixture(scope="module")
def touching_stack():
    """Nuclei touching along z (3x coarser slices), segmented with gaps between touching
    objects in each slice and a little noise, as a 2D network does."""
    rng = np.random.default_rng(2)
    image, truth = blobs((14, 90, 84), rng=5, spacing=(3, 1, 1), stacked=0.5)
    mask = np.stack([separate_touching(s) for s in truth]) & (rng.random(truth.shape) > 0.03)
    return image, truth, mask


# z chunk of 1; chunk boundaries inside objects on every axis; one chunk in y and x.
CHUNKINGS = [(1, 32, 32), (4, 17, 23), (5, 90, 84), (3, 45, 28)]


@pytest.mark.parametrize("chunks", CHUNKINGS)
def test_partition_equals_the_whole_volume_reference(tmp_path, dask_client, touching_stack, chunks):
    image, _, mask = touching_stack
    url = stack_store(tmp_path / "s.ome.zarr", image, mask, chunks)
    variants = [
        (LinkParams(), 1),  # the defaults: area and intensity waists
        (LinkParams(iou=0.3, intensity_depth=0.0), 1),  # area only: the image is not read
        (LinkParams(iou=0.05, area_depth=0.2, intensity_depth=0.1), 2),
    ]
    if chunks in CHUNKINGS[:2]:  # many blocks (the slow ones): the defaults only
        variants = variants[:1]
    for params, connectivity in variants:
        res = link_slices(
            url, connectivity=connectivity, params=params, link_iou=params.iou, client=dask_client
        )
        out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
        ref = reference(url, mask, params, connectivity=connectivity)
        assert same_partition(out, ref), (chunks, params)
        assert res.objects == ref.max()
        assert out.max() == ref.max()  # consecutive ids
        assert res.method == "slices"
    # The object table keeps its columns, with the z extent, and matches the labels.
    table = pd.read_csv(res.table_csv).set_index("id")
    ids = np.arange(1, out.max() + 1)
    assert np.array_equal(table.loc[ids, "voxels"], np.bincount(out.reshape(-1))[1:])
    z = np.nonzero(out)[0]
    zmin = np.full(ids.size + 1, 99)
    zmax = np.zeros(ids.size + 1, int)
    np.minimum.at(zmin, out[out > 0], z)
    np.maximum.at(zmax, out[out > 0], z + 1)
    assert np.array_equal(table.loc[ids, "extent_z"], (zmax - zmin)[1:])
    attrs = zarr.open_group(url, mode="r")["labels/instances"].attrs["segflow"]
    assert attrs["method"] == "slices"
    assert attrs["complete"] is True


def test_min_size_and_id_offset_follow_the_component_stitch(tmp_path, dask_client, touching_stack):
    image, _, mask = touching_stack
    url = stack_store(tmp_path / "s.ome.zarr", image, mask, (4, 32, 32))
    ref = reference(url, mask, LinkParams())
    sizes = np.bincount(ref.reshape(-1))[1:]
    small = int(np.median(sizes))
    res = link_slices(url, min_size=small, link_iou=LinkParams().iou, client=dask_client)
    out = assert_consecutive(url, res)  # ids 1..N after the filter, the table the same
    assert res.objects == int((sizes >= small).sum())
    kept = reference(url, mask, LinkParams(), min_size=small)
    assert same_partition(out, kept)
    res = link_slices(
        url, min_size=small, id_offset=70, link_iou=LinkParams().iou, client=dask_client
    )
    assert same_partition(assert_consecutive(url, res, 70), kept)
    res = link_slices(url, id_offset=2**32 - 5, link_iou=LinkParams().iou, client=dask_client)
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    assert out.dtype == np.uint64
    assert out.max() == 2**32 - 5 + ref.max()
    assert same_partition(out, ref)


def test_the_method_follows_the_model(tmp_path, dask_client):
    rng = np.random.default_rng(1)
    vol = (rng.random((6, 40, 40)) * 255).astype(np.uint8)
    torch.manual_seed(0)
    ckpt2 = tmp_path / "m2.ckpt"
    save_checkpoint(
        ckpt2,
        UNet(UNetConfig(ndim=2, depth=2, base_channels=4)),
        CheckpointMeta(link_iou=0.4),
    )
    url = str(tmp_path / "a.ome.zarr")
    write_image(url, vol, "zyx", chunks=(3, 20, 20))
    segment_image(url, str(ckpt2), params=SegmentParams(tile=(1, 60, 60)), client=dask_client)
    seg = zarr.open_group(url, mode="r")["labels/semantic"].attrs["segflow"]
    assert seg["model_ndim"] == 2
    assert seg["link_iou"] == 0.4
    res = stitch(url, client=dask_client)
    assert res.method == "slices"
    inst = zarr.open_group(url, mode="r")["labels/instances"].attrs["segflow"]
    assert inst["link_iou"] == 0.4  # the checkpoint's default
    sem = zarr.open_group(url, mode="r")["labels/semantic/0"][...]
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    assert same_partition(out, reference(url, sem == 1, LinkParams(iou=0.4)))
    # Labels made before the dimensionality was recorded: the checkpoint tells it.
    group = zarr.open_group(url, mode="r+")["labels/semantic"]
    old = dict(seg)
    del old["model_ndim"], old["link_iou"]
    group.attrs["segflow"] = old
    assert stitch(url, client=dask_client, write_table=False).method == "slices"
    assert stitch(url, client=dask_client, method="components").method == "components"
    # A 3D model: connected components.
    ckpt3 = tmp_path / "m3.ckpt"
    save_checkpoint(ckpt3, UNet(UNetConfig(ndim=3, depth=1, base_channels=2)))
    url3 = str(tmp_path / "b.ome.zarr")
    write_image(url3, vol, "zyx", chunks=(6, 20, 20))
    segment_image(url3, str(ckpt3), client=dask_client)
    assert zarr.open_group(url3, mode="r")["labels/semantic"].attrs["segflow"]["model_ndim"] == 3
    assert stitch(url3, client=dask_client).method == "components"


def test_cli_instance_method_and_link_iou(tmp_path):
    image, truth = blobs((8, 48, 48), rng=4, spacing=(3, 1, 1), stacked=0.5)
    mask = np.stack([separate_touching(s) for s in truth])
    url = stack_store(tmp_path / "s.ome.zarr", image, mask, (4, 24, 24))
    exe = [sys.executable, "-m", "segflow", "stitch", url]
    done = subprocess.run(
        [*exe, "--instance-method", "slices", "--link-iou", "0.3", "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["method"] == "slices"
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    assert same_partition(out, reference(url, mask, LinkParams(iou=0.3)))
    # Labels without a model: components by default.
    done = subprocess.run([*exe, "--json"], capture_output=True, text=True)
    assert json.loads(done.stdout)["method"] == "components"
    bad = subprocess.run([*exe, "--instance-method", "watershed"], capture_output=True, text=True)
    assert bad.returncode != 0
    assert "watershed" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_single_image_cannot_be_linked_across_slices(tmp_path, dask_client):
    mask = np.zeros((20, 20), np.uint8)
    mask[5:9, 5:9] = 1
    url = semantic_store(tmp_path / "flat.ome.zarr", mask, (10, 10))
    with pytest.raises(ConfigError, match="single 2D image"):
        stitch(url, method="slices", client=dask_client)
    assert stitch(url, client=dask_client, write_table=False).method == "components"


def test_a_2d_models_minimum_size_is_converted_to_voxels_for_a_stack(tmp_path, dask_client):
    """Nuclei spanning several slices and one-slice fragments of 25-40 pixels, labels of a
    2D model whose training objects suggest 20 pixels: as voxels of the stack (slices 3x
    coarser) that is a quarter of a ball of 80 pixels' cross-section, 45 voxels, so the
    fragments go and the nuclei stay, and the summary says so."""
    zz, yy, xx = np.ogrid[:12, :48, :64]
    mask = np.zeros((12, 48, 64), dtype=bool)
    for cz, cy, cx in ((2, 10, 10), (6, 10, 40), (9, 34, 20), (4, 34, 50)):  # radius 7 px
        mask |= ((zz - cz) * 3.0) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
    nuclei = int(mask.sum())
    fragments = [(0, 40, 4, 25), (11, 4, 56, 33), (7, 24, 34, 40)]  # z, y, x, area
    for z, y, x, area in fragments:
        mask[z, y : y + area // 5, x : x + 5] = True
        mask[z, y + area // 5, x : x + area % 5] = True
    url = semantic_store(tmp_path / "s.ome.zarr", mask, (5, 24, 32), scale=(3.0, 1.0, 1.0))
    group = zarr.open_group(url, mode="r+")["labels/semantic"]
    group.attrs["segflow"] = {**group.attrs["segflow"], "model_ndim": 2, "suggested_min_size": 20}
    done = subprocess.run(
        [sys.executable, "-m", "segflow", "stitch", url, "--json"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["method"] == "slices"
    assert (summary["min_size"], summary["min_size_unit"]) == (45, "voxels")
    assert (summary["min_size_from"], summary["removed"]) == ("model", len(fragments))
    out = zarr.open_group(url, mode="r")["labels/instances/0"][...]
    assert summary["objects"] == out.max() == 4  # the nuclei, numbered 1..4
    assert int((out > 0).sum()) == nuclei  # every fragment gone, every nucleus whole
    text = subprocess.run(
        [sys.executable, "-m", "segflow", "stitch", url], capture_output=True, text=True
    )
    assert "minimum size: 45 voxels (the model's suggestion); 3 smaller objects" in text.stdout
    # 3D components count voxels the same way; --min-size is voxels as given.
    res = stitch(url, method="components", client=dask_client, write_table=False)
    assert (res.objects, res.min_size, res.min_size_unit, res.removed) == (4, 45, "voxels", 3)
    res = stitch(url, min_size=30, client=dask_client, write_table=False)
    assert (res.objects, res.min_size, res.min_size_from, res.removed) == (6, 30, "option", 1)
