"""Identity is complete: a block is reused only when the image, the model (weights, config
and the checkpoint's metadata) and the effective parameters are what they were.

Each case once reused every block of an earlier run, exit 0, with labels that were wrong
for the new input: a checkpoint re-saved with another normalisation, a TIFF edited with its
size and modification time kept, an ingested image rewritten in place through zarr.
"""

from __future__ import annotations

import json
import os

import numpy as np
import tifffile
import torch
import zarr
from harness import blobs, cli, make_model

from unet_core import CheckpointMeta, Normalization, UNet, UNetConfig, save_checkpoint
from unet_core.checkpoint import load_checkpoint

ARGS = ("--tile", "1,64,64", "--chunks", "4,32,32", "--device", "cpu", "--mode", "fast")


def run(*args):
    done = cli("segment", *args, *ARGS, "--json", "--no-preview")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def labels(store) -> np.ndarray:
    return zarr.open_group(str(store), mode="r")["labels/semantic/0"][...]


def test_a_checkpoint_resaved_with_another_normalisation_is_another_model(tmp_path):
    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, blobs((8, 64, 64), 1), metadata={"axes": "ZYX"})
    torch.manual_seed(0)
    model = UNet(UNetConfig(ndim=2, base_channels=4, depth=2, n_classes=2))
    ckpt = tmp_path / "m.ckpt"
    save_checkpoint(ckpt, model, CheckpointMeta(normalization=Normalization(kind="zscore")))
    first = run(tif, "-m", ckpt)
    assert first["blocks_computed"] == first["blocks_total"]
    assert run(tif, "-m", ckpt)["blocks_computed"] == 0  # the same model: reused
    # the same weights and config, another normalisation: a different model
    loaded, meta = load_checkpoint(ckpt)
    other = meta.model_copy(update={"normalization": Normalization(kind="percentile")})
    save_checkpoint(ckpt, loaded, other)
    second = run(tif, "-m", ckpt)
    assert second["blocks_computed"] == second["blocks_total"]
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    tifffile.imwrite(fresh / "v.tif", blobs((8, 64, 64), 1), metadata={"axes": "ZYX"})
    run(fresh / "v.tif", "-m", ckpt)
    assert np.array_equal(labels(tmp_path / "v.ome.zarr"), labels(fresh / "v.ome.zarr"))


def test_a_tiff_edited_with_its_size_and_mtime_kept_is_read_again(tmp_path):
    tif = tmp_path / "v.tif"
    data = blobs((8, 64, 64), 2)
    tifffile.imwrite(tif, data, metadata={"axes": "ZYX"})

    model = make_model(tmp_path / "m.ckpt", 2)
    first = run(tif, "-m", model)
    assert first["blocks_computed"] == first["blocks_total"]
    st = os.stat(tif)
    # edit in place (same size), then set the modification time back (touch -r, rsync -t)
    edited = data.copy()
    edited[:, :32] = edited[:, :32][:, ::-1]
    raw = bytearray(tif.read_bytes())
    offset = tifffile.TiffFile(tif).pages[0].dataoffsets[0]
    raw[offset : offset + edited.nbytes] = edited.tobytes()
    with open(tif, "r+b") as f:  # the same inode, the same size
        f.write(raw)
    os.utime(tif, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(tif).st_size == st.st_size
    assert os.stat(tif).st_mtime_ns == st.st_mtime_ns
    second = run(tif, "-m", model)
    assert second["blocks_computed"] > 0
    stored = zarr.open_group(str(tmp_path / "v.ome.zarr"), mode="r")["0"][...]
    assert np.array_equal(stored, edited)


def test_an_ingested_image_rewritten_in_place_is_segmented_again(tmp_path):

    tif = tmp_path / "v.tif"
    tifffile.imwrite(tif, blobs((8, 64, 64), 3), metadata={"axes": "ZYX"})
    model = make_model(tmp_path / "m.ckpt", 3)
    store = tmp_path / "v.ome.zarr"
    first = run(tif, "-m", model)
    assert first["blocks_computed"] == first["blocks_total"]
    assert run(store, "-m", model)["blocks_computed"] == 0
    image = zarr.open_group(str(store), mode="r+")["0"]
    image[:4] = image[:4][:, ::-1]  # through zarr, the recorded digest untouched
    again = run(store, "-m", model)
    assert again["blocks_computed"] == again["blocks_total"]
    fresh = tmp_path / "fresh.tif"
    tifffile.imwrite(fresh, image[...], metadata={"axes": "ZYX"})
    run(fresh, "-m", model)
    assert np.array_equal(labels(store), labels(tmp_path / "fresh.ome.zarr"))
