"""The numerics of the three prediction modes: which kernels run (process-wide settings,
switched per forward pass) and what the network is rebuilt into for them (the 1x1 head as
elementwise operations, convolutions in slabs), and the memory layout of tensors.

See :mod:`unet_core.predict` for what each mode guarantees.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from unet_core.config import Mode
from unet_core.model import UNet

#: Reference mode: most bytes one convolution unfolds (im2col) at once.
SLAB_BYTES = 64 * 2**20

#: Default mode: most bytes the first convolution unfolds at once (see :func:`_model_for`).
FIRST_SLAB_BYTES = 16 * 2**20

#: Changes whenever the default mode computes a tile differently, so that its bits change:
#: part of a run's key (:func:`tasks.segment.plan_segmentation`), so that a run resumed by
#: another segflow version recomputes its blocks instead of mixing two versions' bits.
#: 1: until this was recorded; 2: channels-last tensors on CPU (first convolution in slabs
#: of FIRST_SLAB_BYTES).
INVARIANT_REVISION = 2

# ------------------------------------------------------------------------- numerics

# Process-wide kernel settings. Forward passes that need different settings never overlap
# in one process: a kind waits until the passes of another kind have finished.
_settings = threading.Condition()
_settings_kind: str | None = None
_settings_users = 0
_settings_saved: Callable[[], None] | None = None


def _apply(kind: str) -> Callable[[], None]:
    """Switch the process to ``kind``'s kernels; returns what restores the old settings."""
    if kind in ("native", "onednn"):
        was = bool(torch._C._get_mkldnn_enabled())
        torch._C._set_mkldnn_enabled(kind == "onednn")
        return lambda: torch._C._set_mkldnn_enabled(was)
    cudnn = torch.backends.cudnn
    det, bench = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False

    def restore() -> None:
        cudnn.deterministic, cudnn.benchmark = det, bench

    return restore


@contextlib.contextmanager
def _kernels(kind: str) -> Iterator[None]:
    """Hold the process's kernel settings at ``kind`` (re-entrant, thread safe)."""
    global _settings_kind, _settings_users, _settings_saved
    with _settings:
        while _settings_users and _settings_kind != kind:
            _settings.wait()
        if _settings_users == 0:
            _settings_saved = _apply(kind)
            _settings_kind = kind
        _settings_users += 1
    try:
        yield
    finally:
        with _settings:
            _settings_users -= 1
            if _settings_users == 0:
                if _settings_saved is not None:
                    _settings_saved()
                _settings_kind, _settings_saved = None, None
                _settings.notify_all()


def exact_numerics() -> contextlib.AbstractContextManager[None]:
    """Make CPU convolutions shift-invariant, bit for bit (the reference mode's kernels).

    oneDNN picks kernels by tensor shape, and its results for one voxel differ in the last
    bits between a large and a small input (measured up to ~5e-6). PyTorch's own
    convolution kernels (im2col + GEMM) sum in an order that does not depend on where the
    voxel sits, so a tile reproduces the whole-volume pass exactly. They are 2-6x slower.
    """
    return _kernels("native")


def invariant_numerics(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The default mode's kernels: oneDNN on CPU; on CUDA cuDNN with deterministic
    algorithms and benchmarking off, so one input shape always runs the same algorithm."""
    return _kernels("onednn" if device.type == "cpu" else "cudnn-deterministic")


# ------------------------------------------------------------------ the network


class _ElementwiseHead(nn.Module):
    """The 1x1 output convolution as separate multiplies and adds in a fixed order.

    oneDNN's 1x1 convolution splits its sum differently with the number of threads
    (measured: 1 vs 2 threads differ in the last bit); one IEEE multiply or add at a time
    is the same on any thread count, vector width or device. It costs 2 x channels x
    classes elementwise operations per voxel, little next to a 3x3 convolution.
    """

    def __init__(self, head: nn.Conv2d | nn.Conv3d) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = head.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(self.weight.shape[0], self.weight.shape[1]).to(torch.float32)
        # Channel planes contiguous (a channels-last input's are strided), products into one
        # scratch plane: the same operations on each voxel, so the same bits, 25-40% faster.
        x = x.to(torch.float32).contiguous()
        out = x.new_empty((x.shape[0], w.shape[0], *x.shape[2:]))
        product = torch.empty_like(x[:, 0])
        for k in range(w.shape[0]):
            acc = out[:, k]
            torch.mul(x[:, 0], w[k, 0], out=acc)
            for c in range(1, w.shape[1]):
                torch.mul(x[:, c], w[k, c], out=product)
                acc.add_(product)
            if self.bias is not None:
                acc.add_(self.bias[k].to(torch.float32))
        return out


class _SlabConv(nn.Module):
    """A convolution computed in slabs along its first spatial axis (reference mode).

    PyTorch's own kernels unfold the input (im2col: input channels x kernel voxels per
    output voxel); for a 3D tile that is gigabytes. Slabs of output planes bound it to
    :data:`SLAB_BYTES`; the unfolded columns and their sums are the same, so the result is
    bitwise that of the whole convolution (checked in the tests).
    """

    def __init__(self, conv: nn.Conv2d | nn.Conv3d, budget: int | None = None) -> None:
        super().__init__()
        self.conv = conv
        self.budget = budget

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        sizes = [int(p) for p in conv.padding]
        kernel = [int(k) for k in conv.kernel_size]
        k, pad = kernel[0], sizes[0]
        out_len = x.shape[2] + 2 * pad - k + 1
        spatial = zip(x.shape[3:], sizes[1:], kernel[1:], strict=True)
        rest = [n + 2 * p - kk + 1 for n, p, kk in spatial]
        per_plane = x.shape[0] * x.shape[1] * math.prod(kernel) * math.prod(rest) * 4
        budget = SLAB_BYTES if self.budget is None else self.budget
        planes = max(1, budget // max(per_plane, 1))
        if planes >= out_len:
            return conv(x)
        if pad:
            x = F.pad(x, (0, 0) * len(rest) + (pad, pad))
        pads = (0, *sizes[1:])
        fn = F.conv3d if x.ndim == 5 else F.conv2d
        out = x.new_empty((x.shape[0], conv.out_channels, out_len, *rest))
        for z0 in range(0, out_len, planes):
            z1 = min(z0 + planes, out_len)
            out[:, :, z0:z1] = fn(x[:, :, z0 : z1 + k - 1], conv.weight, conv.bias, padding=pads)
        return out


def _model_for(model: UNet, mode: Mode) -> UNet:
    """The model a mode runs: the model itself in fast mode, else a copy (weights shared).

    Reference: every convolution in slabs. Invariant: the deterministic head, and the
    first convolution in slabs of :data:`FIRST_SLAB_BYTES`: it sees the image's few
    channels, and oneDNN unfolds such an input 27-fold (measured for the first block of
    one 88x168x168 tile: +320 MiB whole, +220 MiB in 64 MiB slabs, +100 MiB in 16 MiB
    slabs, for a pass 3-6% slower). The slabs follow from the tile shape alone, so every
    tile is still computed the same way.
    """
    if mode == "fast":
        return model
    copied = copy.copy(model)  # shallow: submodule dicts are copied below, weights shared
    copied._modules = dict(model._modules)

    def slabbed(block: nn.Module, every: bool, budget: int | None = None) -> nn.Sequential:
        layers: list[nn.Module] = list(block.children())
        return nn.Sequential(
            *(
                _SlabConv(m, budget)
                if isinstance(m, nn.Conv2d | nn.Conv3d) and (every or i == 0)
                else m
                for i, m in enumerate(layers)
            )
        )

    if mode == "invariant":
        copied._modules["head"] = _ElementwiseHead(model.head)
        encoder = list(model.encoder)
        first = slabbed(encoder[0], False, FIRST_SLAB_BYTES)
        copied._modules["encoder"] = nn.ModuleList([first, *encoder[1:]])
        return copied
    for name in ("encoder", "decoder"):
        copied._modules[name] = nn.ModuleList(
            slabbed(block, True)
            for block in model._modules[name]  # type: ignore[union-attr]
        )
    return copied


def channels_last_format(tensor_ndim: int) -> torch.memory_format:
    """The channels-last memory format of an (N, C, *spatial) tensor of ``tensor_ndim``
    axes: ``channels_last`` for 2D images, ``channels_last_3d`` for volumes."""
    return torch.channels_last if tensor_ndim == 4 else torch.channels_last_3d
