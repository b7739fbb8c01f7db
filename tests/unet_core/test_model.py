from __future__ import annotations

import pytest
import torch

from unet_core import InvalidShapeError, UNet, UNetConfig
from unet_core.numerics import exact_numerics


def small(**kw) -> UNetConfig:
    base = {"base_channels": 4, "depth": 2}
    base.update(kw)
    return UNetConfig(**base)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("padding", ["valid", "same"])
def test_forward_shapes(ndim, padding):
    config = small(ndim=ndim, padding=padding, in_channels=2, n_classes=3)
    model = UNet(config).eval()
    spatial = config.valid_input_shape((44, 40, 36)[:ndim])
    x = torch.randn(2, 2, *spatial)
    with torch.no_grad():
        y = model(x)
    assert tuple(y.shape) == (2, 3, *config.output_shape(spatial))


def test_paper_network_forward_shape():
    model = UNet(UNetConfig(base_channels=2)).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 1, 572, 572))
    assert tuple(y.shape) == (1, 2, 388, 388)


def test_forward_rejects_invalid_shape():
    model = UNet(small())
    with pytest.raises(InvalidShapeError, match="nearest valid"):
        model(torch.randn(1, 1, 41, 44))


def test_every_layer_is_registered():
    config = small(depth=3, norm="batch")
    model = UNet(config)
    names = set(model.state_dict())
    # One transposed convolution per level, registered and in the state dict.
    for i in range(config.depth):
        assert f"upsamplers.{i}.weight" in names
        assert f"upsamplers.{i}.bias" in names
    assert "head.weight" in names
    assert any(n.endswith("running_mean") for n in names)
    n_params = sum(p.numel() for p in model.parameters())
    n_state = sum(
        v.numel()
        for k, v in model.state_dict().items()
        if "running" not in k and "num_batches" not in k
    )
    assert n_params == n_state
    # Every module moves with the model: no tensors are created in forward.
    model2 = UNet(config)
    model2.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, *config.valid_input_shape((40, 40)))
    model.eval()
    model2.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))


@pytest.mark.parametrize("ndim", [2, 3])
def test_skip_connections_are_cropped_on_every_axis(ndim):
    # Unequal extents on every axis: a crop of only the first axis would fail to concatenate.
    config = small(ndim=ndim, depth=2)
    spatial = config.valid_input_shape((60, 52, 44)[:ndim])
    assert len(set(spatial)) == ndim
    with torch.no_grad():
        y = UNet(config).eval()(torch.randn(1, 1, *spatial))
    assert tuple(y.shape[2:]) == config.output_shape(spatial)


@pytest.mark.parametrize(("ndim", "depth"), [(2, 2), (2, 3), (3, 2)])
def test_translation_equivariance_on_the_pooling_grid(ndim, depth):
    """The property the tiling rests on: crop of output == output of crop (grid offsets)."""
    torch.manual_seed(0)
    config = small(ndim=ndim, depth=depth, base_channels=4)
    model = UNet(config).eval()
    g = config.grid
    big = config.valid_input_shape((96, 88, 80)[:ndim] if ndim == 2 else (56, 48, 40))
    crop = config.valid_input_shape(tuple(s - 2 * g - 5 for s in big))
    x = torch.randn(1, 1, *big)
    with torch.no_grad(), exact_numerics():
        full = model(x)
        for k in range(1, 3):
            offset = tuple(k * g if i % 2 == 0 else g for i in range(ndim))
            if any(o + c > b for o, c, b in zip(offset, crop, big, strict=True)):
                continue
            sl = tuple(slice(o, o + c) for o, c in zip(offset, crop, strict=True))
            part = model(x[(slice(None), slice(None), *sl)])
            out = config.output_shape(crop)
            ref = full[
                (
                    slice(None),
                    slice(None),
                    *(slice(o, o + n) for o, n in zip(offset, out, strict=True)),
                )
            ]
            assert part.shape == ref.shape
            assert torch.equal(part, ref)
    # oneDNN's shape-dependent kernels stay within float32 noise of the exact result.
    with torch.no_grad():
        fast = model(x)
    assert (fast - full).abs().max().item() <= 1e-4


def test_translation_off_grid_is_not_equivariant():
    """Sanity check that the test above can fail: offsets off the grid change the output."""
    torch.manual_seed(0)
    config = small(ndim=2, depth=2)
    model = UNet(config).eval()
    big = config.valid_input_shape((64, 64))
    crop = config.valid_input_shape((40, 40))
    x = torch.randn(1, 1, *big)
    with torch.no_grad():
        full = model(x)
        part = model(x[:, :, 2 : 2 + crop[0], 2 : 2 + crop[1]])
    out = config.output_shape(crop)
    ref = full[:, :, 2 : 2 + out[0], 2 : 2 + out[1]]
    assert (part - ref).abs().max().item() > 1e-3
