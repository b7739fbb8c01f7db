"""In-memory tiled prediction: the reference mode's tilings equal the whole-array pass; the
invariant mode's lattice gives the same bits for any blocks, threads and batch fill."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import unet_core.numerics as numerics_mod
from unet_core import ConfigError, InvalidVolumeError, UNet, UNetConfig
from unet_core.geometry import Box, ChunkGrid, TileSpec
from unet_core.lattice import plan_lattice
from unet_core.mirror import mirror_indices, read_mirrored
from unet_core.numerics import exact_numerics, invariant_numerics
from unet_core.predict import Predictor, class_labels, predict, softmax


def net(seed=0, **kw):
    torch.manual_seed(seed)
    return UNet(UNetConfig(**{"base_channels": 4, "depth": 2, "n_classes": 3, **kw})).eval()


@pytest.mark.parametrize(
    ("kw", "shape", "tiles"),
    [
        ({"ndim": 2}, (71, 53), [(44, 44), (60, 90), (100, 30)]),
        ({"ndim": 2, "padding": "same"}, (50, 61), [(48, 48), (64, 40)]),
        ({"ndim": 3}, (23, 29, 31), [(52, 52, 52), (48, 60, 56)]),
        ({"ndim": 2}, (9, 40, 37), [(1, 44, 44), (3, 60, 60)]),
    ],
)
def test_reference_mode_any_tiling_equals_the_whole_pass(kw, shape, tiles):
    model = net(**kw)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ref = predict(model, x, normalization=(0.5, 2.0), mode="reference")
    assert ref.shape == (3, *shape)
    assert np.allclose(ref.sum(0), 1, atol=1e-5)
    for tile in tiles:
        for batch in (1, 3):
            got = predict(model, x, tile, batch, normalization=(0.5, 2.0), mode="reference")
            assert np.array_equal(got, ref)


def test_same_network_interior_equals_a_direct_model_call():
    """The grid of a same network's pass lines up with model(volume) run by the user."""
    model = net(ndim=2, padding="same")
    x = np.random.default_rng(1).normal(size=(96, 80)).astype(np.float32)
    with torch.no_grad(), exact_numerics():
        direct = torch.softmax(model(torch.from_numpy(x)[None, None]), 1)[0].numpy()
    ours = predict(model, x, tile_shape=(48, 48), mode="reference")
    r = model.config.context + 4  # outputs that never see the zero padding of `direct`
    inner = (slice(None), slice(r, -r), slice(r, -r))
    assert np.allclose(ours[inner], direct[inner], atol=1e-6)


def test_mirror_reads():
    assert mirror_indices(-3, 6, 4).tolist() == [2, 1, 0, 0, 1, 2, 3, 3, 2]
    assert mirror_indices(-2, 3, 1).tolist() == [0] * 5
    a = np.arange(20).reshape(4, 5)
    got = read_mirrored(a, Box((-1, 3), (6, 4)), a.shape)
    assert np.array_equal(got, np.pad(a, ((1, 1), (0, 2)), mode="symmetric")[:, 3:7])
    # Assembled from block copies in one pass, converted on the way: the same voxels as
    # gathering every axis by its mirror indices, for boxes far outside small volumes too.
    rng = np.random.default_rng(4)
    for _ in range(400):
        shape = tuple(int(n) for n in rng.integers(1, 9, size=int(rng.integers(1, 4))))
        vol = rng.integers(0, 1000, size=(2, *shape)).astype(np.uint16)
        begin = [int(b) for b in rng.integers(-20, 9, size=len(shape))]
        box = Box.from_bounds(begin, [b + int(rng.integers(1, 30)) for b in begin])
        want = vol
        for axis, (b, e, n) in enumerate(zip(box.begin, box.end, shape, strict=True)):
            want = np.take(want, mirror_indices(b, e, n), axis=1 + axis)
        got = read_mirrored(vol, box, shape, leading=1, dtype=np.float32)
        assert got.dtype == np.float32
        assert np.array_equal(got, want), (shape, box)
        assert np.array_equal(read_mirrored(vol[0], box, shape), want[0])


def test_predict_leaves_the_callers_array_untouched():
    model = net(ndim=2)
    x = np.random.default_rng(3).normal(size=(40, 40)).astype(np.float32)
    kept = x.copy()
    predict(model, x, tile_shape=(60, 60), normalization=(0.5, 2.0))
    predict(model, x, normalization=(0.5, 2.0))
    assert np.array_equal(x, kept)


def test_channels_and_bad_inputs():
    model = net(ndim=2, in_channels=2)
    x = np.random.default_rng(2).normal(size=(30, 30, 2)).astype(np.float32)
    out = predict(model, x, channel_axis=-1)
    assert out.shape == (3, 30, 30)
    with pytest.raises(InvalidVolumeError, match="expects 2"):
        predict(model, x[..., 0])
    with pytest.raises(InvalidVolumeError, match="spatial shape"):
        predict(net(ndim=2), np.zeros((0, 5), np.float32))


@pytest.mark.parametrize("k", [1, 2, 3, 7, 300])
def test_class_labels_equal_numpy_argmax_with_ties(k):
    rng = np.random.default_rng(k)
    scores = rng.normal(size=(k, 6, 9, 11)).astype(np.float32)
    tied = rng.random((6, 9, 11)) < 0.3  # ties between the first and the last class
    scores[-1][tied] = scores[0][tied]
    labels, counts = class_labels(scores)
    ref = np.argmax(scores, axis=0)
    assert labels.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert np.array_equal(labels, ref)
    assert counts.tolist() == np.bincount(ref.ravel(), minlength=k).tolist()


INVARIANT_CASES = [
    # (model kwargs, volume, tile bound, batch, two more chunkings)
    ({"ndim": 2}, (46, 53), (60, 60), 2, [(16, 16), (23, 53)]),
    ({"ndim": 2, "padding": "same"}, (3, 37, 41), (1, 64, 64), 4, [(2, 9, 41), (3, 20, 13)]),
    ({"ndim": 3, "base_channels": 2}, (14, 19, 23), (56, 56, 56), 1, [(7, 10, 12), (14, 19, 5)]),
    (
        {"ndim": 3, "padding": "same"},  # 4 channels: oneDNN differs from the oracle here
        (13, 21, 18),
        (64, 64, 64),
        1,
        [(13, 8, 8), (6, 21, 18)],
    ),
]


def assert_invariant(model, x, bound, batch, chunkings) -> np.ndarray:
    """Blocks of each chunking (torch threads 1, then 2) give the bits of the whole volume
    as one block; returns those probabilities."""
    shape = x.shape
    whole = predict(model, x, bound, batch, mode="invariant")  # the volume as one block
    lattice = plan_lattice(TileSpec(model.config, len(shape)), shape, bound)
    assert lattice.n_tiles > 1
    predictor = Predictor(model, "cpu", batch, mode="invariant")
    try:
        for chunks, threads in zip(chunkings, (1, 2), strict=True):
            torch.set_num_threads(threads)
            logits = np.full((model.config.n_classes, *shape), np.nan, dtype=np.float32)
            for write in ChunkGrid(shape, chunks).boxes():
                read, tiles = lattice.plan(write)
                data = read_mirrored(x[None], read, shape, leading=1)
                logits[(slice(None), *write.to_slices())] = predictor.logits(
                    data, read, tiles, write
                )
            assert np.array_equal(softmax(logits), whole), (chunks, threads)
    finally:
        torch.set_num_threads(2)
    return whole


@pytest.mark.parametrize(("kw", "shape", "bound", "batch", "chunkings"), INVARIANT_CASES)
def test_invariant_mode_same_bits_for_any_blocks_threads_and_batch_fill(
    kw, shape, bound, batch, chunkings, record_property
):
    """The lattice fixes which tile computes a voxel; blocks, torch threads and how full a
    batch is (short ones are padded) change nothing, bit for bit."""
    model = net(**kw)
    x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    whole = assert_invariant(model, x, bound, batch, chunkings)
    # Against the oracle: the same computation with other kernels, float32 noise apart.
    dp = float(np.abs(whole - predict(model, x, mode="reference")).max())
    record_property("max_abs_dp_invariant_vs_reference", dp)
    print(f"max |dp| invariant vs reference, {kw} {shape}: {dp:.3g}")
    assert dp < 1e-5


def test_invariant_mode_first_convolution_in_slabs(monkeypatch):
    """The first convolution runs in slabs planned from the tile shape alone: still the
    same bits for any blocks."""
    monkeypatch.setattr(numerics_mod, "SLAB_BYTES", 4096)
    model = net(ndim=2)
    x = np.random.default_rng(5).normal(size=(46, 53)).astype(np.float32)
    sliced = assert_invariant(model, x, (60, 60), 2, [(16, 16), (23, 53)])
    monkeypatch.setattr(numerics_mod, "SLAB_BYTES", 2**40)
    assert np.abs(sliced - predict(model, x, (60, 60), 2)).max() < 1e-5


def test_reference_convolutions_in_slabs_are_bitwise_the_whole(monkeypatch):
    model = net(ndim=3, padding="same", base_channels=2)
    x = np.random.default_rng(4).normal(size=(9, 14, 11)).astype(np.float32)
    monkeypatch.setattr(numerics_mod, "SLAB_BYTES", 2**40)
    whole = predict(model, x, mode="reference")
    monkeypatch.setattr(numerics_mod, "SLAB_BYTES", 2**18)  # a few output planes at a time
    assert np.array_equal(predict(model, x, mode="reference"), whole)


def test_reference_mode_is_cpu_float32():
    with pytest.raises(ConfigError, match="reference mode runs on the CPU"):
        Predictor(net(ndim=2), device="cuda", mode="reference")
    with pytest.raises(ConfigError, match="mode must be one of"):
        Predictor(net(ndim=2), mode="exact")  # type: ignore[arg-type]
    assert Predictor(net(ndim=2), device="auto", mode="reference").device.type == "cpu"


def test_kernel_settings_of_two_modes_never_overlap():
    """A reference pass (oneDNN off) waits while an invariant pass (oneDNN on) runs."""
    import threading

    seen: list[bool] = []
    with invariant_numerics(torch.device("cpu")):
        assert torch._C._get_mkldnn_enabled()

        def reference_pass() -> None:
            with exact_numerics():
                seen.append(bool(torch._C._get_mkldnn_enabled()))

        t = threading.Thread(target=reference_pass)
        t.start()
        t.join(0.5)
        assert t.is_alive()
        assert not seen
        assert torch._C._get_mkldnn_enabled()
    t.join(10)
    assert seen == [False]
    assert torch._C._get_mkldnn_enabled()
