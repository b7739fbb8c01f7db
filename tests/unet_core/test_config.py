from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from unet_core import InvalidShapeError, UNetConfig


def test_paper_2d_shape_arithmetic():
    config = UNetConfig(ndim=2, depth=4, padding="valid")
    assert config.output_shape((572, 572)) == (388, 388)
    assert config.context == 92
    assert config.grid == 16
    assert config.valid_input_shape((572, 572)) == (572, 572)
    assert config.valid_input_shape((560, 570)) == (572, 572)


def test_3d_unet_shape_arithmetic():
    # Çiçek et al. 2016: 132×132×116 -> 44×44×28 with three poolings.
    config = UNetConfig(ndim=3, depth=3, padding="valid")
    assert config.output_shape((132, 132, 116)) == (44, 44, 28)
    assert config.context == 44


def test_same_padding_keeps_shape_and_reports_receptive_radius():
    config = UNetConfig(ndim=2, depth=4, padding="same")
    assert config.output_shape((64, 80)) == (64, 80)
    assert config.context == 92
    assert config.valid_input_shape((50, 65)) == (64, 80)


def test_invalid_shape_names_nearest_valid_sizes():
    config = UNetConfig(ndim=2, depth=4)
    with pytest.raises(InvalidShapeError, match=r"556 or 572") as info:
        config.output_shape((570, 572))
    assert isinstance(info.value, ValueError)
    with pytest.raises(InvalidShapeError, match="3D network"):
        UNetConfig(ndim=3).output_shape((572, 572))


def test_config_is_validated_and_frozen():
    with pytest.raises(ValidationError):
        UNetConfig(depth=0)
    with pytest.raises(ValidationError):
        UNetConfig(padding="reflect")  # type: ignore[arg-type]
    config = UNetConfig()
    with pytest.raises(ValidationError):
        config.depth = 3  # type: ignore[misc]


configs = st.builds(
    UNetConfig,
    ndim=st.sampled_from([2, 3]),
    depth=st.integers(1, 5),
    padding=st.sampled_from(["valid", "same"]),
)


@settings(max_examples=200, deadline=None)
@given(config=configs, sizes=st.lists(st.integers(1, 700), min_size=3, max_size=3))
def test_valid_input_shape_invariants(config, sizes):
    want = tuple(sizes[: config.ndim])
    valid = config.valid_input_shape(want)
    assert all(v >= w for v, w in zip(valid, want, strict=True))
    assert config.is_valid_input(valid)
    out = config.output_shape(valid)
    c = config.context
    if config.padding == "valid":
        assert all(o == v - 2 * c for o, v in zip(out, valid, strict=True))
        # Every valid size is ≡ the smallest one modulo the grid, and smaller ones are not valid.
        assert all(not config.is_valid_input((v - 1,) * config.ndim) for v in valid if v > 1)
    else:
        assert out == valid
        assert all(v % config.grid == 0 for v in valid)
    # The output always covers what the desired input would have yielded.
    assert all(o >= w - 2 * c for o, w in zip(out, want, strict=True))
    # Valid sizes repeat with the grid period.
    shifted = tuple(v + config.grid for v in valid)
    assert config.is_valid_input(shifted)
