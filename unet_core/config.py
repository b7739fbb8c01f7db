"""The U-Net configuration and the shape arithmetic derived from it.

The paper's network (Ronneberger et al. 2015) uses unpadded ("valid") 3×3 convolutions, so
every convolution trims one voxel per side and the output is smaller than the input::

    572 ─conv─conv─▶ 568 ─pool─▶ 284 ─conv─conv─▶ 280 ─pool─▶ ... ─▶ 28 (bottom)
                                                                      │ up-conv ×2
    388 ◀─conv─conv─ 392 ◀─up── 196 ◀─conv─conv─ 200 ◀── ... ◀── 56 ◀─┘

Nothing here is typed by hand: :meth:`UNetConfig.output_shape` simulates that walk through
the architecture, :attr:`UNetConfig.context` is half of what it loses, and
:meth:`UNetConfig.valid_input_shape` finds the sizes for which every 2×2 pooling sees an
even extent. Translation equivariance holds for shifts that are multiples of
:attr:`UNetConfig.grid` (``2**depth``), which is what makes overlap-tile inference exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from unet_core.errors import InvalidShapeError

#: How inference runs (see :mod:`unet_core.predict`); here, free of torch, so that option
#: schemas can name them without importing it.
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Mode = Literal["invariant", "reference", "fast"]
MODES: tuple[Mode, ...] = ("invariant", "reference", "fast")

#: Tiles per forward pass by default (``segflow segment``'s default too): the default mode's
#: bits depend on it for 2D networks, so the in-memory and the Dask paths share it.
DEFAULT_BATCH_SIZE = 4

#: Kernel size of every convolution and convolutions per level, as in the paper.
KERNEL_SIZE = 3
CONVS_PER_LEVEL = 2

Padding = Literal["valid", "same"]
Norm = Literal["none", "batch", "instance", "group"]


class UNetConfig(BaseModel):
    """Architecture of a U-Net. Frozen and validated; serialised into every checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ndim: Literal[2, 3] = Field(2, description="Spatial dimensions of the convolutions.")
    in_channels: int = Field(1, ge=1, le=64, description="Input channels.")
    n_classes: int = Field(2, ge=2, le=256, description="Output classes (softmax).")
    depth: int = Field(4, ge=1, le=6, description="Number of 2×2 poolings (paper: 4).")
    base_channels: int = Field(
        64, ge=1, le=512, description="Feature channels of the first level (paper: 64)."
    )
    padding: Padding = Field(
        "valid", description="'valid' (unpadded, as in the paper) or 'same' convolutions."
    )
    norm: Norm = Field("none", description="Normalisation after each convolution.")
    dropout: float = Field(
        0.5, ge=0.0, lt=1.0, description="Dropout rate at the end of the contracting path."
    )

    # ------------------------------------------------------------------ geometry
    @property
    def grid(self) -> int:
        """Tile origins must sit on multiples of this (per axis) for exact tiling."""
        return int(2**self.depth)

    @property
    def context(self) -> int:
        """Voxels per side that an output voxel sees beyond itself (92 for the paper's net).

        For a ``valid`` network this is exactly what the network trims per side; for a
        ``same`` network it is its receptive-field radius, the halo that tiling needs.
        """
        n = self.valid_input_size_1d(1, padding="valid")
        out = self._output_size_1d(n, padding="valid")
        assert out is not None
        return (n - out) // 2

    @property
    def tile_exact(self) -> bool:
        """Whether tiled inference equals whole-volume inference for this architecture.

        Instance and group normalisation compute statistics over each tile's extent, so
        their outputs depend on where a tile starts; 'none' and (eval-mode) 'batch' do not.
        """
        return self.norm in ("none", "batch")

    @property
    def channels(self) -> tuple[int, ...]:
        """Feature channels per level, from the top level down to the bottom."""
        return tuple(self.base_channels * 2**i for i in range(self.depth + 1))

    def _output_size_1d(self, n: int, padding: Padding | None = None) -> int | None:
        """Walk one axis through the network; ``None`` where the size is not valid."""
        padding = padding or self.padding
        loss = (KERNEL_SIZE - 1) * CONVS_PER_LEVEL if padding == "valid" else 0
        for _ in range(self.depth):
            n -= loss
            if n < 2 or n % 2:
                return None
            n //= 2
        n -= loss
        if n < 1:
            return None
        for _ in range(self.depth):
            n = 2 * n - loss
            if n < 1:
                return None
        return n

    def valid_input_size_1d(self, minimum: int, padding: Padding | None = None) -> int:
        """The smallest valid input extent >= ``minimum`` along one axis."""
        n = max(int(minimum), 1)
        while self._output_size_1d(n, padding) is None:
            n += 1
        return n

    def _check_spatial(self, shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(s) for s in shape)
        if len(shape) != self.ndim:
            raise InvalidShapeError(
                f"shape {shape} has {len(shape)} axes but this is a {self.ndim}D network"
            )
        return shape

    def is_valid_input(self, shape: Sequence[int]) -> bool:
        return all(self._output_size_1d(s) is not None for s in self._check_spatial(shape))

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape; raises for invalid inputs.

        >>> UNetConfig().output_shape((572, 572))
        (388, 388)
        """
        shape = self._check_spatial(input_shape)
        out: list[int] = []
        for axis, n in enumerate(shape):
            o = self._output_size_1d(n)
            if o is None:
                raise InvalidShapeError(self._invalid_message(shape, axis))
            out.append(o)
        return tuple(out)

    def valid_input_shape(self, min_shape: Sequence[int]) -> tuple[int, ...]:
        """The smallest valid input shape that is at least ``min_shape`` on every axis."""
        return tuple(self.valid_input_size_1d(n) for n in self._check_spatial(min_shape))

    def nearest_valid_sizes(self, n: int, padding: Padding | None = None) -> tuple[int | None, int]:
        """The valid extents at or below (``None`` if none) and at or above ``n``."""
        below = next(
            (m for m in range(n, 0, -1) if self._output_size_1d(m, padding) is not None), None
        )
        return below, self.valid_input_size_1d(n, padding)

    def _invalid_message(self, shape: tuple[int, ...], axis: int) -> str:
        below, above = self.nearest_valid_sizes(shape[axis])
        options = f"{below} or {above}" if below is not None else f"{above}"
        return (
            f"input shape {shape} is not valid for this U-Net (depth {self.depth}, "
            f"{self.padding} padding): size {shape[axis]} on axis {axis} must be "
            f"{options} (nearest valid sizes)"
        )

    def exact_region_1d(self, size: int) -> tuple[int, int]:
        """Input positions ``[begin, end)`` of a tile of ``size`` whose outputs equal the
        whole-volume outputs (they never see a border).

        A valid network computes only such voxels: ``(context, size - context)``. A same
        network zero-pads every convolution; the region is found by walking the interval of
        border-free positions through the layers (each 3×3 convolution loses one per side,
        pooling keeps whole windows, up-sampling doubles, skips intersect).
        """
        if self._output_size_1d(size) is None:
            raise InvalidShapeError(self._invalid_message((size,) * self.ndim, 0))
        if self.padding == "valid":
            return self.context, size - self.context
        per_block = CONVS_PER_LEVEL * (KERNEL_SIZE // 2)
        a, b = 0, size
        skips: list[tuple[int, int]] = []
        for _ in range(self.depth):
            a, b = a + per_block, b - per_block
            skips.append((a, b))
            a, b = -(-a // 2), b // 2
        a, b = a + per_block, b - per_block
        for level in reversed(range(self.depth)):
            a, b = max(2 * a, skips[level][0]), min(2 * b, skips[level][1])
            a, b = a + per_block, b - per_block
        return a, max(a, b)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        """Raise :class:`InvalidShapeError` naming the nearest valid sizes if not valid."""
        self.output_shape(shape)
