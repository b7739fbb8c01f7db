"""The U-Net of Ronneberger et al. (2015), in 2D and 3D.

Every layer is a registered submodule built in ``__init__``: nothing is created in
``forward``, so the state dict holds every weight and ``.to(device)`` moves them all.
"""

from __future__ import annotations

import torch
from torch import nn

from unet_core.config import CONVS_PER_LEVEL, KERNEL_SIZE, UNetConfig


def _conv(ndim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv2d if ndim == 2 else nn.Conv3d


def _norm(config: UNetConfig, channels: int) -> nn.Module:
    if config.norm == "none":
        return nn.Identity()
    if config.norm == "batch":
        return (nn.BatchNorm2d if config.ndim == 2 else nn.BatchNorm3d)(channels)
    if config.norm == "instance":
        return (nn.InstanceNorm2d if config.ndim == 2 else nn.InstanceNorm3d)(channels, affine=True)
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by the optional norm and a ReLU."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int) -> None:
        pad = 0 if config.padding == "valid" else KERNEL_SIZE // 2
        layers: list[nn.Module] = []
        for i in range(CONVS_PER_LEVEL):
            layers.append(
                _conv(config.ndim)(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    KERNEL_SIZE,
                    padding=pad,
                    bias=config.norm != "batch",
                )
            )
            layers.append(_norm(config, out_channels))
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


def center_crop(x: torch.Tensor, spatial: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (N, C, *spatial) to ``spatial``, centred, all axes."""
    slices: list[slice] = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], spatial, strict=True):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


class UNet(nn.Module):
    """U-Net for 2D or 3D images.

    ``forward`` takes ``(N, in_channels, *spatial)`` with a spatial shape that
    ``config.is_valid_input`` accepts and returns unnormalised class scores (logits)
    ``(N, n_classes, *config.output_shape(spatial))``. With ``padding="valid"`` the output
    is smaller by ``2 * config.context`` per axis; with ``"same"`` it has the input's size.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        ch = config.channels
        conv = _conv(config.ndim)
        self.encoder = nn.ModuleList(
            ConvBlock(config, config.in_channels if i == 0 else ch[i - 1], ch[i])
            for i in range(config.depth + 1)
        )
        self.pool = (nn.MaxPool2d if config.ndim == 2 else nn.MaxPool3d)(2)
        self.dropout = (nn.Dropout2d if config.ndim == 2 else nn.Dropout3d)(config.dropout)
        upconv = nn.ConvTranspose2d if config.ndim == 2 else nn.ConvTranspose3d
        # Decoder modules are stored bottom-up: index 0 joins the bottom to level depth-1.
        self.upsamplers = nn.ModuleList(
            upconv(ch[i + 1], ch[i], kernel_size=2, stride=2) for i in reversed(range(config.depth))
        )
        self.decoder = nn.ModuleList(
            ConvBlock(config, 2 * ch[i], ch[i]) for i in reversed(range(config.depth))
        )
        self.head = conv(ch[0], config.n_classes, kernel_size=1)
        if self.head.weight.device.type != "meta":  # meta tensors hold no values
            self.reset_parameters()

    @staticmethod
    def state_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every entry of the state dict of a model of ``config``.

        The model is built on PyTorch's meta device: no memory is allocated for weights, so
        this is safe for any config, however large."""
        with torch.device("meta"):
            model = UNet(config)
        return {name: tuple(t.shape) for name, t in model.state_dict().items()}

    def reset_parameters(self) -> None:
        """The paper's initialisation: Gaussian with std sqrt(2 / fan_in), zero bias."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.config.ndim + 2:
            raise ValueError(
                f"expected a {self.config.ndim + 2}D tensor (N, C, *spatial), got {tuple(x.shape)}"
            )
        self.config.check_input_shape(tuple(x.shape[2:]))
        skips: list[torch.Tensor] = []
        for block in self.encoder[:-1]:
            x = block(x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.encoder[-1](x))
        for up, block, skip in zip(self.upsamplers, self.decoder, reversed(skips), strict=True):
            x = up(x)
            x = block(torch.cat([center_crop(skip, x.shape[2:]), x], dim=1))
        out: torch.Tensor = self.head(x)
        return out
