"""The engine: exact overlap-tile inference over chunked OME-Zarr on a real Dask cluster."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import tasks.segment.worker as segment_worker
from tasks.blockwise import Markers
from tasks.cluster import ClusterSpec
from tasks.segment import SegmentParams, segment_image
from tasks.store import read_image_info, write_image
from unet_core import (
    CheckpointMeta,
    InvalidVolumeError,
    Normalization,
    UNet,
    UNetConfig,
    VolumeNotFoundError,
    load_checkpoint,
    save_checkpoint,
)
from unet_core.predict import predict


def make_model(path, seed=0, **kw):
    torch.manual_seed(seed)
    config = UNetConfig(**{"base_channels": 4, "depth": 2, "n_classes": 3, **kw})
    model = UNet(config)
    save_checkpoint(path, model, CheckpointMeta(normalization=Normalization(kind="zscore")))
    return path


def reference(model_path, image_url, array, channel_axis=None):
    model, meta = load_checkpoint(model_path)
    info = read_image_info(image_url)
    norm = meta.normalization.affine(info.stats)
    return predict(model, array, normalization=norm, channel_axis=channel_axis, mode="reference")


def run(src, model, out, client, **params):
    block = params.pop("block_shape", None)
    force = params.pop("force", True)
    params.setdefault("mode", "reference")  # compared with the whole-volume pass, bit for bit
    p = SegmentParams(probabilities=True, probabilities_dtype="float32", **params)
    return segment_image(
        src, str(model), out=out, params=p, client=client, force=force, block_shape=block
    )


def outputs(out, name="semantic"):
    g = zarr.open_group(out, mode="r")
    return g["probabilities/0"][...], g[f"labels/{name}/0"][...]


CASES = [
    # (model kwargs, volume shape, tile, chunk shapes)
    ({"ndim": 3}, (37, 45, 51), (60, 60, 60), [(16, 16, 16), (9, 23, 13), (37, 20, 51)]),
    (
        {"ndim": 3, "padding": "same"},
        (29, 41, 35),
        (64, 64, 64),
        [(16, 16, 16), (7, 41, 12), (29, 41, 35)],
    ),
    ({"ndim": 2}, (67, 83), (60, 60), [(16, 16), (25, 19), (67, 83)]),
    ({"ndim": 2, "padding": "same"}, (53, 47), (64, 64), [(16, 16), (11, 30), (53, 47)]),
    ({"ndim": 2}, (5, 50, 43), (1, 60, 60), [(1, 16, 16), (2, 25, 19), (5, 50, 43)]),  # slice-wise
]


@pytest.mark.parametrize(("model_kw", "shape", "tile", "chunk_shapes"), CASES)
def test_engine_equals_whole_volume_pass_bitwise(
    tmp_path, dask_client, model_kw, shape, tile, chunk_shapes
):
    rng = np.random.default_rng(7)
    vol = rng.integers(0, 4000, size=shape).astype(np.uint16)
    axes = "zyx"[-len(shape) :]
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, axes, chunks=(16,) * len(shape))
    model = make_model(tmp_path / "m.ckpt", **model_kw)
    ref = reference(model, src, vol)
    for chunks in chunk_shapes:
        out = str(tmp_path / f"out-{'x'.join(map(str, chunks))}.zarr")
        res = run(src, model, out, dask_client, chunks=chunks, tile=tile)
        probs, labels = outputs(out)
        assert probs.dtype == np.float32
        assert np.array_equal(probs, ref), (chunks, float(np.abs(probs - ref).max()))
        assert np.array_equal(labels, ref.argmax(0))
        assert labels.dtype == np.uint8
        assert res.blocks_computed == res.blocks_total
    # At least one chunking really split the work into several blocks and tiles.
    assert res.blocks_total >= 1


def test_small_volumes_and_singleton_axes(tmp_path, dask_client):
    rng = np.random.default_rng(1)
    model = make_model(tmp_path / "m.ckpt", ndim=3)
    for shape in [(3, 4, 5), (1, 30, 27), (12, 1, 9)]:
        vol = rng.normal(size=shape).astype(np.float32)
        src = str(tmp_path / f"v{'x'.join(map(str, shape))}.ome.zarr")
        write_image(src, vol, "zyx", chunks=(4, 8, 8))
        ref = reference(model, src, vol)
        out = src.replace(".ome.zarr", "-out.zarr")
        run(src, model, out, dask_client, chunks=(2, 8, 8))
        probs, _ = outputs(out)
        assert np.array_equal(probs, ref), shape


def test_channels_select_or_feed_all(tmp_path, dask_client):
    rng = np.random.default_rng(2)
    vol = rng.integers(0, 255, size=(3, 40, 36)).astype(np.uint8)  # (c, y, x)
    src = str(tmp_path / "rgb.ome.zarr")
    write_image(src, vol, "cyx", chunks=(16, 16))
    two = make_model(tmp_path / "c3.ckpt", ndim=2, in_channels=3)
    run(src, two, str(tmp_path / "o3.zarr"), dask_client, chunks=(16, 16), tile=(60, 60))
    probs, _ = outputs(str(tmp_path / "o3.zarr"))
    assert np.array_equal(probs, reference(two, src, vol, channel_axis=0))
    one = make_model(tmp_path / "c1.ckpt", ndim=2, in_channels=1)
    with pytest.raises(InvalidVolumeError, match="3 channel"):
        run(src, one, str(tmp_path / "o1.zarr"), dask_client)
    run(src, one, str(tmp_path / "o1.zarr"), dask_client, chunks=(16, 16), channel=1)
    probs, _ = outputs(str(tmp_path / "o1.zarr"))
    assert np.array_equal(probs, reference(one, src, vol[1]))


def test_labels_written_into_the_image_store_with_ngff_metadata(tmp_path, dask_client):
    vol = np.random.default_rng(3).normal(size=(20, 30, 30)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "zyx", chunks=(10, 16, 16), scale=(2.0, 0.5, 0.5))
    model = make_model(tmp_path / "m.ckpt", ndim=2)
    res = segment_image(src, str(model), client=dask_client)
    assert res.out_url == src
    group = zarr.open_group(src, mode="r")
    assert group["labels"].attrs["ome"]["labels"] == ["semantic"]
    label_attrs = group["labels/semantic"].attrs.asdict()
    assert label_attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    scale = label_attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"] == [2.0, 0.5, 0.5]
    assert label_attrs["segflow"]["complete"] is True
    assert "probabilities" not in group
    assert sum(res.class_voxels.values()) == vol.size


def test_resume_skips_done_blocks_and_a_new_model_recomputes(tmp_path, dask_client):
    vol = np.random.default_rng(4).normal(size=(40, 44)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "yx", chunks=(16, 16))
    model = make_model(tmp_path / "m.ckpt", ndim=2)
    kw = {"chunks": (16, 16), "tile": (60, 60), "force": False}
    out = str(tmp_path / "o.zarr")
    first = run(src, model, out, dask_client, **kw)
    assert first.blocks_computed == first.blocks_total > 1
    again = run(src, model, out, dask_client, **kw)
    assert again.blocks_computed == 0
    # Forget one block: only that block is recomputed, and the result is unchanged.
    Markers.open(out, "segment-semantic", mode="r+").clear([(0, 1)])
    before, _ = outputs(out)
    partial = run(src, model, out, dask_client, **kw)
    assert partial.blocks_computed == 1
    assert np.array_equal(outputs(out)[0], before)
    # Another model (other weights, same architecture) recomputes every block.
    other = make_model(tmp_path / "m2.ckpt", seed=5, ndim=2)
    changed = run(src, other, out, dask_client, **kw)
    assert changed.blocks_computed == changed.blocks_total
    assert not np.array_equal(outputs(out)[0], before)


def test_model_is_loaded_once_per_worker(tmp_path, dask_client):
    vol = np.random.default_rng(6).normal(size=(64, 64)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "yx", chunks=(16, 16))
    model = make_model(tmp_path / "m.ckpt", seed=11, ndim=2)
    before = segment_worker.model_loads
    res = run(src, model, str(tmp_path / "o.zarr"), dask_client, chunks=(16, 16), tile=(60, 60))
    assert res.blocks_total >= 9
    assert segment_worker.model_loads - before == 1


def test_arrays_are_opened_once_per_run_and_a_deleted_output_is_named(tmp_path, dask_client):
    """A worker keeps the run's arrays open across blocks (keyed by the run key); a block
    after its output store was deleted fails naming the store, without re-creating it."""
    import shutil

    from tasks.segment import plan_segmentation
    from unet_core.errors import SegflowError

    vol = np.random.default_rng(7).normal(size=(64, 64)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "yx", chunks=(16, 16))
    model = make_model(tmp_path / "m.ckpt", seed=12, ndim=2)
    out = str(tmp_path / "o.zarr")
    params: dict = {"chunks": (16, 16), "tile": (60, 60)}
    run(src, model, out, dask_client, **params)
    p = SegmentParams(probabilities=True, probabilities_dtype="float32", mode="reference", **params)
    plan = plan_segmentation(src, str(model), out, p)
    cached = {key[1:] for key in segment_worker._arrays if key[0] == plan.key}
    assert cached == {(src, "0"), (out, "labels/semantic/0"), (out, "probabilities/0")}
    shutil.rmtree(out)
    with pytest.raises(SegflowError, match="no such store"):
        segment_worker.segment_block(plan, (0, 0))
    assert not (tmp_path / "o.zarr").exists()


def test_blocks_decode_the_chunks_they_share_once(tmp_path, dask_client):
    """A 3D block reads its neighbours' chunks for the network's context (up to 27 chunks
    for one chunk of output); the worker keeps them decoded, so a run decodes far fewer
    chunks than its blocks' boxes touch, with the same bits as the whole-volume pass."""
    from tasks.segment import plan_segmentation
    from unet_core.mirror import mirror_indices

    vol = np.random.default_rng(9).integers(0, 60000, size=(24, 40, 40)).astype(np.uint16)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "zyx", chunks=(8, 8, 8))
    model = make_model(tmp_path / "m.ckpt", ndim=3, depth=1)
    out = str(tmp_path / "o.zarr")
    params = {"chunks": (8, 8, 8), "tile": (32, 32, 32), "mode": "reference"}
    plan = plan_segmentation(src, str(model), out, SegmentParams(**params), (8, 8, 8))
    assert plan.reads_overlap
    assert plan.n_blocks == 75
    touched = 0  # chunks that reading every block's box directly decodes
    for index in plan.indices():
        read = plan.block(index).read
        per_axis = []
        for b, e, n in zip(read.begin, read.end, vol.shape, strict=True):
            i = mirror_indices(b, e, n)
            per_axis.append(int(i.max()) // 8 - int(i.min()) // 8 + 1)
        touched += int(np.prod(per_axis))
    cache = segment_worker.image_chunks
    cache.clear()
    misses = cache.misses
    run(src, model, out, dask_client, block_shape=(8, 8, 8), **params)
    decoded = cache.misses - misses
    assert 75 <= decoded < touched / 4, (decoded, touched)
    probs, _ = outputs(out)
    assert np.array_equal(probs, reference(model, src, vol))
    # A block whose context stays inside it reads nothing of its neighbours: no cache.
    whole = SegmentParams(chunks=(24, 40, 40), tile=(64, 64, 64))
    assert not plan_segmentation(src, str(model), out, whole).reads_overlap


def test_s3_store_gives_the_same_result_as_local(tmp_path, dask_client, s3_bucket):
    vol = np.random.default_rng(8).integers(0, 60000, size=(12, 40, 37)).astype(np.uint16)
    model = make_model(tmp_path / "m.ckpt", ndim=3)
    local = str(tmp_path / "img.ome.zarr")
    remote = f"s3://{s3_bucket}/img.ome.zarr"
    write_image(local, vol, "zyx", chunks=(8, 16, 16))
    write_image(remote, vol, "zyx", chunks=(8, 16, 16))
    kw = {"chunks": (8, 16, 16), "tile": (60, 60, 60)}
    run(local, model, str(tmp_path / "o.zarr"), dask_client, **kw)
    run(remote, model, f"s3://{s3_bucket}/out.zarr", dask_client, **kw)
    local_probs, local_labels = outputs(str(tmp_path / "o.zarr"))
    g = zarr.open_group(f"s3://{s3_bucket}/out.zarr", mode="r", storage_options=_s3_opts())
    assert np.array_equal(g["probabilities/0"][...], local_probs)
    assert np.array_equal(g["labels/semantic/0"][...], local_labels)


def _s3_opts():
    from tasks.store import storage_options

    return storage_options("s3://x")


def test_bad_inputs_give_one_clear_error_and_nothing_done(tmp_path, dask_client):
    model3 = make_model(tmp_path / "m3.ckpt", ndim=3, in_channels=2)
    vol = np.zeros((10, 20, 20), dtype=np.uint8)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "zyx")
    out = str(tmp_path / "o.zarr")
    with pytest.raises(InvalidVolumeError, match=r"1 channel\(s\) but the model .* expects 2"):
        run(src, model3, out, dask_client)
    with pytest.raises(VolumeNotFoundError, match=r"nope\.zarr"):
        run(str(tmp_path / "nope.zarr"), model3, out, dask_client)
    # Unsupported axes (a time axis).
    tsrc = str(tmp_path / "t.ome.zarr")
    write_image(tsrc, np.zeros((2, 8, 8), np.uint8), "zyx")
    g = zarr.open_group(tsrc, mode="r+")
    ome = g.attrs["ome"]
    ome["multiscales"][0]["axes"][0] = {"name": "t", "type": "time"}
    g.attrs["ome"] = ome
    with pytest.raises(InvalidVolumeError, match="unsupported axes 'tyx'"):
        run(tsrc, model3, out, dask_client)
    # An empty volume.
    esrc = str(tmp_path / "e.ome.zarr")
    write_image(esrc, np.zeros((0, 8, 8), np.uint8), "zyx", with_stats=False)
    with pytest.raises(InvalidVolumeError, match="empty"):
        run(esrc, make_model(tmp_path / "m1.ckpt", ndim=3), out, dask_client)
    # Nothing was marked done anywhere.
    assert Markers.open(out, "segment-semantic") is None


def test_a_failing_block_leaves_others_done_and_is_not_marked(
    tmp_path, dask_client, failing_blocks
):
    vol = np.random.default_rng(9).normal(size=(48, 48)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "yx", chunks=(16, 16))
    model = make_model(tmp_path / "m.ckpt", ndim=2)
    out = str(tmp_path / "o.zarr")

    healed = failing_blocks(lambda block: block.index == (1, 1))
    try:
        with pytest.raises(RuntimeError, match="injected"):
            run(src, model, out, dask_client, chunks=(16, 16), tile=(60, 60), force=False)
    finally:
        healed()
    done = Markers.open(str(out), "segment-semantic").done_mask()
    assert not done[1, 1]
    assert done.sum() == done.size - 1
    assert zarr.open_group(out)["labels/semantic"].attrs["segflow"]["complete"] is False
    res = run(src, model, out, dask_client, chunks=(16, 16), tile=(60, 60), force=False)
    assert res.blocks_computed == 1
    assert zarr.open_group(out)["labels/semantic"].attrs["segflow"]["complete"] is True


def test_cli_segment(tmp_path):
    vol = np.random.default_rng(10).normal(size=(24, 40)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "yx", chunks=(16, 16))
    model = make_model(tmp_path / "m.ckpt", ndim=2)
    out = str(tmp_path / "o.zarr")
    cmd = [
        sys.executable,
        "-m",
        "segflow",
        "segment",
        src,
        "--model",
        str(model),
        "--out",
        out,
        "--chunks",
        "16,16",
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--probabilities",
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["blocks_computed"] == summary["blocks_total"]
    assert zarr.open_group(out)["probabilities/0"].shape == (3, 24, 40)
    bad = subprocess.run(
        [*cmd[:4], str(tmp_path / "missing.zarr"), *cmd[5:]], capture_output=True, text=True
    )
    assert bad.returncode == 3  # ExitCode.BAD_INPUT
    assert "missing.zarr" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_channels_last_matches_cpu(tmp_path, dask_client):
    vol = np.random.default_rng(12).normal(size=(16, 70, 70)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "zyx", chunks=(8, 32, 32))
    model = make_model(tmp_path / "m.ckpt", ndim=3)
    ref = reference(model, src, vol)
    for precision in ("fp32", "bf16", "fp16"):
        out = str(tmp_path / f"o-{precision}.zarr")
        run(
            src,
            model,
            out,
            dask_client,
            device="cuda",
            precision=precision,
            mode="invariant",
            batch_size=4,
            tile=(60, 60, 60),
        )
        probs, labels = outputs(out)
        tol = 1e-4 if precision == "fp32" else 5e-2
        assert np.abs(probs - ref).max() < tol
        assert (labels == ref.argmax(0)).mean() > 0.97


def test_dask_address_of_a_process_cluster(tmp_path):
    """Worker processes (not threads): the plan travels pickled, each worker loads the model."""
    from distributed import Client, LocalCluster

    vol = np.random.default_rng(13).normal(size=(9, 40, 44)).astype(np.float32)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "zyx", chunks=(4, 16, 16))
    model = make_model(tmp_path / "m.ckpt", ndim=3)
    ref = reference(model, src, vol)
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        p = SegmentParams(
            probabilities=True, probabilities_dtype="float32", tile=(60, 60, 60), mode="reference"
        )
        out = str(tmp_path / "o.zarr")
        res = segment_image(
            src, str(model), out=out, params=p, cluster=ClusterSpec(kind=cluster.scheduler_address)
        )
        assert res.blocks_total == res.blocks_computed > 1
        with Client(cluster) as client:
            loads = client.run(lambda: segment_worker.model_loads)  # each worker's own
    probs, _ = outputs(out)
    assert np.array_equal(probs, ref)
    assert all(n <= 1 for n in loads.values())
    assert sum(loads.values()) >= 1
