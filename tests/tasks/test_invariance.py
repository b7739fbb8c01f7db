"""The default mode on the engine: the same bits for any chunking, worker count or resume.

Every run below (on real Dask clusters, real zarr stores) must reproduce, bit for bit, the
in-memory pass over the same tile lattice (``predict(mode="invariant")``: the whole volume
as one block). Against the reference mode (the whole-volume oracle) the default differs
only by float32 rounding; the largest difference is recorded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from tasks.blockwise import Markers
from tasks.cluster import ClusterSpec
from tasks.segment import SegmentParams, plan_segmentation, segment_image
from tasks.store import read_image_info, write_image
from unet_core import (
    CheckpointMeta,
    Normalization,
    UNet,
    UNetConfig,
    load_checkpoint,
    save_checkpoint,
)
from unet_core.predict import predict

CASES = [
    # id, model kwargs, volume, tile bound, batch, forced chunkings (the 2nd one is resumed)
    ("2d-valid", {"ndim": 2}, (46, 53), (60, 60), 2, [(16, 16), (23, 13)]),
    ("2d-same-slices", {"ndim": 2, "padding": "same"}, (3, 37, 41), (1, 64, 64), 4,
     [(1, 13, 41), (2, 19, 9)]),
    ("3d-valid", {"ndim": 3}, (14, 19, 23), (56, 56, 56), 4, [(7, 10, 12), (14, 8, 23)]),
    ("3d-same", {"ndim": 3, "padding": "same"}, (13, 21, 18), (64, 64, 64), 1,
     [(13, 8, 8), (6, 21, 9)]),
]  # fmt: skip


@pytest.fixture(scope="module")
def two_workers():
    """A real two-process Dask cluster, shared by the cases."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


def probabilities(out: str) -> tuple[np.ndarray, np.ndarray]:
    g = zarr.open_group(out, mode="r")
    return g["probabilities/0"][...], g["labels/semantic/0"][...]


@pytest.mark.parametrize(
    ("model_kw", "shape", "tile", "batch", "chunkings"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_default_mode_same_bits_for_any_chunks_workers_and_resume(
    tmp_path,
    dask_client,
    two_workers,
    model_kw,
    shape,
    tile,
    batch,
    chunkings,
    record_property,
    failing_blocks,
):
    rng = np.random.default_rng(11)
    vol = rng.integers(0, 4000, size=shape).astype(np.uint16)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, vol, "zyx"[-len(shape) :], chunks=(8,) * len(shape))
    torch.manual_seed(0)
    config = UNetConfig(**{"base_channels": 2, "depth": 2, "n_classes": 3, **model_kw})
    ckpt = str(tmp_path / "m.ckpt")
    save_checkpoint(ckpt, UNet(config), CheckpointMeta(normalization=Normalization(kind="zscore")))
    model, meta = load_checkpoint(ckpt)
    norm = meta.normalization.affine(read_image_info(src).stats)
    expected = predict(model, vol, tile, batch, normalization=norm, mode="invariant")

    def params(chunks=None):
        return SegmentParams(
            chunks=chunks, tile=tile, batch_size=batch, probabilities=True,
            probabilities_dtype="float32", device="cpu",
        )  # fmt: skip

    def check(out: str, what: str) -> None:
        probs, labels = probabilities(out)
        assert np.array_equal(probs, expected), (what, float(np.abs(probs - expected).max()))
        assert np.array_equal(labels, expected.argmax(0)), what

    # 1. Default chunks, chosen on the lattice: every tile computed once.
    plan = plan_segmentation(src, ckpt, str(tmp_path / "a.zarr"), params())
    assert plan.lattice is not None
    assert plan.lattice.misaligned_axes(plan.block_shape) == []
    assert plan.n_blocks > 1 or plan.lattice.n_tiles == 1
    segment_image(src, ckpt, str(tmp_path / "a.zarr"), params(), client=dask_client)
    check(str(tmp_path / "a.zarr"), "lattice chunks")

    # 2. Forced chunks, one per block, that cut through tiles: blocks on both sides of a
    # cut compute the tile (identically).
    cut = chunkings[0]
    forced = plan_segmentation(src, ckpt, None, params(cut), block_shape=cut)
    assert forced.lattice is not None
    assert forced.lattice.misaligned_axes(forced.block_shape)
    out = str(tmp_path / "b.zarr")
    segment_image(src, ckpt, out, params(cut), client=dask_client, block_shape=cut)
    check(out, f"chunks {cut}")

    # 3. Two worker processes.
    out = str(tmp_path / "c.zarr")
    segment_image(
        src, ckpt, out, params(cut), cluster=ClusterSpec(kind=two_workers), block_shape=cut
    )
    check(out, "two workers")

    # 4. Another chunking, interrupted by a failing block, then resumed.
    out = str(tmp_path / "d.zarr")
    first = (0,) * len(shape)

    healed = failing_blocks(lambda block: block.index == first)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            segment_image(src, ckpt, out, params(chunkings[1]), client=dask_client)
    finally:
        healed()
    done = Markers.open(out, "segment-semantic").done_mask()
    assert not done[first]
    assert done.sum() == done.size - 1
    res = segment_image(src, ckpt, out, params(chunkings[1]), client=dask_client)
    assert res.blocks_computed == 1
    check(out, f"resumed, chunks {chunkings[1]}")

    # Against the whole-volume oracle: float32 noise.
    oracle = predict(model, vol, normalization=norm, mode="reference")
    dp = float(np.abs(expected - oracle).max())
    record_property("max_abs_dp_default_vs_reference", dp)
    print(f"max |dp| default vs reference ({model_kw}, {shape}): {dp:.3g}")
    assert dp < 1e-5


def test_cli_modes_exclude_each_other(tmp_path):
    from typer.testing import CliRunner

    from segflow.cli import _register, app

    _register()
    res = CliRunner().invoke(
        app,
        ["segment", str(tmp_path / "x.zarr"), "-m", "m.ckpt", "--fast", "--reference"],
        terminal_width=200,
    )
    assert res.exit_code == 2
    assert "exclude each other" in res.output
