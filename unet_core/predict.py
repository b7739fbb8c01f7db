"""Tiled prediction in memory: mirror reads, batched forward passes, three numerics modes.

:func:`predict` runs a model over a NumPy array; :class:`Predictor` is what it and the Dask
engine in ``tasks`` run per block. The modes (``Mode``) say what is guaranteed:

- ``"invariant"`` (default): tiles on one lattice per volume
  (:class:`unet_core.lattice.TileLattice`), every forward pass of the same shape (a short
  batch is padded), the fast deterministic kernels (oneDNN on CPU; cuDNN with
  deterministic algorithms and benchmarking off on CUDA) and the 1x1 head as separate
  multiplies and adds. A voxel's value then does not depend on the chunking, the block
  order, the number of workers or torch threads: bitwise, on one kind of processor.
- ``"reference"``: PyTorch's own CPU kernels (see :func:`exact_numerics`), which sum in an
  order that does not depend on where a voxel sits: any tiling is bitwise equal to one
  pass over the whole volume (the test oracle). Slower; convolutions run in slabs so they
  never unfold more than :data:`SLAB_BYTES` at once.
- ``"fast"``: tiles planned per block, no padded batches, default kernels: the fewest
  voxels for given blocks, equal to the others up to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import DTypeLike
from torch import nn

from unet_core.config import DEFAULT_BATCH_SIZE, MODES, Mode, Precision
from unet_core.errors import ConfigError, InvalidVolumeError, opt
from unet_core.geometry import Box, Tile, TileSpec, plan_tiles
from unet_core.lattice import plan_lattice
from unet_core.model import UNet
from unet_core.normalize import apply_affine

log = logging.getLogger(__name__)


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


def softmax(logits: np.ndarray, axis: int = 0) -> np.ndarray:
    """float32 softmax in NumPy (shift-invariant, unlike torch's vectorised tail loops)."""
    m = logits.max(axis=axis, keepdims=True)
    e = np.exp(logits - m)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def label_dtype(n_classes: int) -> np.dtype:
    """Smallest unsigned integer type holding class ids 0..n_classes-1."""
    return np.dtype(np.uint8 if n_classes <= 256 else np.uint16)


def class_labels(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Argmax over axis 0 of (K, *spatial) scores, and the voxel count of each class.

    Same result as ``np.argmax(scores, axis=0)`` for finite scores (first maximum wins on
    ties), in the smallest integer dtype and without its int64 temporary: one pass per
    class over contiguous planes, about 3x faster than NumPy's strided argmax here.
    """
    k = scores.shape[0]
    if k == 2:  # the common foreground/background case: one comparison
        fg = scores[1] > scores[0]
        n_fg = int(np.count_nonzero(fg))
        return fg.view(np.uint8), np.array([fg.size - n_fg, n_fg], dtype=np.int64)
    labels = np.zeros(scores.shape[1:], dtype=label_dtype(k))
    best = scores[0].copy()
    for c in range(1, k):
        better = scores[c] > best
        labels[better] = c
        np.maximum(best, scores[c], out=best)
    if k <= 8:
        counts = np.array([np.count_nonzero(labels == c) for c in range(k)], dtype=np.int64)
    else:
        counts = np.bincount(labels.reshape(-1), minlength=k).astype(np.int64)
    return labels, counts


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def check_device(device: str | torch.device, indexed: bool = True, here: bool = True) -> str:
    """``device`` if it names a device this machine has, else one sentence (usage error).

    Names are ``auto``, ``cpu``, ``cuda`` and, when ``indexed``, ``cuda:N``. ``cuda`` on a
    machine without a CUDA GPU (or with fewer than N + 1) is refused here, before any
    work, rather than by the first block that loads the model. ``here=False``: the model
    runs on other machines (cluster workers), so only the name is checked."""
    name = str(device).strip().lower()
    choices = "auto, cpu, cuda or cuda:N" if indexed else "auto, cpu or cuda"
    kind, _, index = name.partition(":")
    if kind not in DEVICE_CHOICES or (index and (not indexed or kind != "cuda")):
        raise ConfigError(f"{opt('device')} {device}: unknown device; use {choices}")
    if index and not index.isdigit():
        raise ConfigError(f"{opt('device')} {device}: unknown device; use {choices}")
    if kind == "cuda" and here:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{opt('device')} {device}: no CUDA GPU is available on this machine "
                f"(use {opt('device')} cpu, or auto to take a GPU when there is one)"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"{opt('device')} {device}: this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
        return device
    name = check_device(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------- mirror reads


def mirror_indices(begin: int, end: int, n: int) -> np.ndarray:
    """Source indices for positions begin..end-1 of an axis of length n, mirrored at the
    borders (half-sample symmetric: ``c b a | a b c | c b a``, as SciPy's 'reflect')."""
    if n < 1:
        raise InvalidVolumeError("cannot mirror an empty axis")
    q = np.mod(np.arange(begin, end), 2 * n)
    return np.where(q < n, q, 2 * n - 1 - q)


def _mirror_runs(idx: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``idx`` (from :func:`mirror_indices`, relative to the read range) as runs of
    consecutive indices: (first output position, first source index, length, step ±1)."""
    runs = []
    start, n = 0, len(idx)
    while start < n:
        step = -1 if start + 1 < n and idx[start + 1] - idx[start] == -1 else 1
        end = start + 1
        while end < n and idx[end] - idx[end - 1] == step:
            end += 1
        runs.append((start, int(idx[start]), end - start, step))
        start = end
    return runs


#: A mirrored read is assembled from at most this many block copies (runs per axis
#: multiplied); beyond (axes of a few voxels mirrored many times) it gathers by index.
_MAX_MIRROR_COPIES = 512


def read_mirrored(
    source: object,
    box: Box,
    volume_shape: Sequence[int],
    leading: int = 0,
    dtype: DTypeLike | None = None,
) -> np.ndarray:
    """Read ``box`` from ``source`` (NumPy, zarr, anything sliceable) with mirror extension.

    Only the bounding range of needed voxels is read (one request for zarr); ``leading``
    axes (e.g. channels) are read whole. Mirroring happens only where the box leaves the
    volume, never at chunk or block borders. The result has ``dtype`` (default: the
    source's), converted while it is assembled: one pass over the box, however many of
    its axes are mirrored.
    """
    idx = [
        mirror_indices(b, e, n) for b, e, n in zip(box.begin, box.end, volume_shape, strict=True)
    ]
    lo = [int(i.min()) for i in idx]
    hi = [int(i.max()) + 1 for i in idx]
    sel = (slice(None),) * leading + tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    data = np.asarray(source[sel])  # type: ignore[index]
    target = data.dtype if dtype is None else np.dtype(dtype)
    runs = [_mirror_runs(i - a) for i, a in zip(idx, lo, strict=True)]
    if all(len(r) == 1 and r[0][3] == 1 for r in runs):  # inside the volume: no mirroring
        return data if data.dtype == target else data.astype(target)
    if math.prod(len(r) for r in runs) > _MAX_MIRROR_COPIES:
        for axis, (i, a) in enumerate(zip(idx, lo, strict=True)):
            data = np.take(data, i - a, axis=leading + axis)
        return data.astype(target, copy=False)
    out = np.empty((*data.shape[:leading], *box.shape), dtype=target)
    lead = (slice(None),) * leading
    for combo in itertools.product(*runs):
        dst = tuple(slice(o, o + n) for o, _, n, _ in combo)
        src = tuple(
            slice(s, s + n) if step == 1 else slice(s, s - n if s >= n else None, -1)
            for _, s, n, step in combo
        )
        out[(*lead, *dst)] = data[(*lead, *src)]
    return out


# ------------------------------------------------------------------------ predictor


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


class Predictor:
    """A model on a device that turns mirror-extended input boxes into class logits.

    One instance per process (or Dask worker): the model is moved once, batches of
    ``batch_size`` equal-shaped tiles go through it (in the invariant mode always exactly
    ``batch_size``: a short batch is padded with zeros, since some kernels' results depend
    on the batch size; a 3D network runs one tile per pass, its tiles being sized to fill
    one). Tensors are channels-last in the default and fast modes (oneDNN's and cuDNN's
    fast layout; the reference mode keeps contiguous ones), and on CUDA autocast
    (bf16/fp16) and pinned, asynchronous host/device copies keep the GPU busy while the
    next batch is assembled.
    """

    def __init__(
        self,
        model: UNet,
        device: str | torch.device = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        precision: Precision = "auto",
        mode: Mode = "invariant",
        channels_last: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {batch_size}")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.config = model.config
        self.mode: Mode = mode
        if mode == "reference":
            if str(device) == "auto":
                device = "cpu"
            if torch.device(device).type != "cpu" or precision not in ("auto", "fp32"):
                raise ConfigError(
                    "the reference mode runs on the CPU in float32 (PyTorch's own kernels); "
                    "use device 'cpu' or another mode"
                )
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        if precision in ("bf16", "fp16") and not cuda:
            raise ConfigError(f"{precision} autocast is only supported on CUDA here; use fp32")
        self.precision: Precision = precision
        # Channels-last: oneDNN's and cuDNN's fast layout (CPU: 30-45% faster forward passes
        # for these networks, measured on 2D and 3D tiles); the reference mode keeps
        # PyTorch's own kernels on contiguous tensors.
        if channels_last is None:
            channels_last = cuda or mode != "reference"
        if channels_last and mode == "reference":
            raise ConfigError("the reference mode runs on contiguous tensors, not channels-last")
        self.channels_last = channels_last
        self.batch_size = effective_batch_size(self.config.ndim, mode, batch_size)
        moved = model.to(self.device).eval()
        if self.channels_last:
            # A copy: the caller's model keeps its layout (training validates the model it
            # is training; converting its weights in place would change later steps' bits).
            fmt = channels_last_format(self.config.ndim + 2)
            moved = copy.deepcopy(moved).to(memory_format=fmt)  # type: ignore[call-overload]
        self.model = _model_for(moved, mode)
        if not self.config.tile_exact:
            log.warning(
                "norm=%r computes statistics per tile: tiled output will not equal the "
                "whole-volume output exactly",
                self.config.norm,
            )

    def spec(self, volume_ndim: int) -> TileSpec:
        return TileSpec(self.config, volume_ndim)

    def numerics(self) -> contextlib.AbstractContextManager[None]:
        if self.mode == "reference":
            return exact_numerics()
        if self.mode == "invariant":
            return invariant_numerics(self.device)
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.device.type == "cuda" and self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (N, C, *spatial) in the memory layout this predictor's model runs on."""
        return x.contiguous(memory_format=channels_last_format(x.ndim)) if self.channels_last else x

    def _forward(self, batch: np.ndarray) -> torch.Tensor:
        """batch: (B, C, *spatial) float32 on the host; returns logits on the device."""
        x = torch.from_numpy(batch)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = self.layout(x)
        with self._autocast():
            out: torch.Tensor = self.model(x)
        return out.float().contiguous()  # channels-last logits: classes back in front

    def logits(self, data: np.ndarray, read: Box, tiles: Sequence[Tile], write: Box) -> np.ndarray:
        """Class logits over ``write`` from ``data`` = the (C, *read.shape) input of the block.

        ``data`` must already be normalised (float32) and mirror-extended.
        """
        spec = self.spec(read.ndim)
        s = spec.slice_axes
        out = np.empty((self.config.n_classes, *write.shape), dtype=np.float32)
        pending: list[tuple[torch.Tensor, list[Tile]]] = []
        pad = self.mode == "invariant"

        def drain() -> None:
            for result, group in pending:
                host = result.to("cpu").numpy()
                for j, tile in enumerate(group):
                    y = host[j]  # (K, *model-spatial)
                    if s:
                        y = y[:, None]
                    margins = [spec.margins_1d(a, t) for a, t in enumerate(tile.read.shape)]
                    usable_origin = tuple(
                        b + m[0] for b, m in zip(tile.read.begin, margins, strict=True)
                    )
                    # Output index of input position p is p - (input - output) // 2.
                    crop = tuple(
                        slice(m[0] - (t - n) // 2, t - m[1] - (t - n) // 2)
                        for n, t, m in zip(y.shape[1:], tile.read.shape, margins, strict=True)
                    )
                    y = y[(slice(None), *crop)]
                    out[(slice(None), *tile.write.to_slices(write))] = y[
                        (slice(None), *tile.write.to_slices(usable_origin))
                    ]
            pending.clear()

        with torch.inference_mode(), self.numerics():
            for start in range(0, len(tiles), self.batch_size):
                group = list(tiles[start : start + self.batch_size])
                parts = []
                for tile in group:
                    part = data[(slice(None), *tile.read.to_slices(read))]
                    parts.append(part[:, 0] if s else part)
                if pad and len(parts) < self.batch_size:
                    # Every pass has the same shape: kernels may depend on the batch size.
                    parts += [np.zeros_like(parts[0])] * (self.batch_size - len(parts))
                result = self._forward(np.ascontiguousarray(np.stack(parts)))
                # Keep one batch in flight: the device computes while the host slices.
                drain()
                pending.append((result, group))
            drain()
        return out


def plan_box(
    spec: TileSpec,
    volume_shape: Sequence[int],
    box: Box,
    mode: Mode,
    tile_shape: Sequence[int] | None = None,
) -> tuple[Box, list[Tile]]:
    """(read box, tiles) for ``box`` of a volume as ``mode`` plans them: on the volume's
    tile lattice in the invariant mode (``tile_shape`` bounds the tile), for the box alone
    otherwise (``tile_shape=None``: one tile)."""
    if mode == "invariant":
        return plan_lattice(spec, volume_shape, tile_shape).plan(box)
    return plan_tiles(spec, box, tile_shape)


def effective_batch_size(ndim: int, mode: Mode, batch_size: int) -> int:
    """Tiles per forward pass: ``batch_size``, except that in the invariant mode a 3D
    network runs one tile per pass (its tiles are sized to fill a pass, and padding short
    batches of large tiles would waste whole passes)."""
    return 1 if mode == "invariant" and ndim == 3 else batch_size


def predict(
    model: UNet,
    array: np.ndarray,
    tile_shape: Sequence[int] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    normalization: tuple[float, float] | None = None,
    channel_axis: int | None = None,
    precision: Precision = "auto",
    mode: Mode = "invariant",
) -> np.ndarray:
    """Class probabilities ``(n_classes, *spatial)`` (float32) for a NumPy image.

    ``array`` is ``spatial`` (2D or 3D) or has a channel axis at ``channel_axis``. A 2D
    network on a 3D array runs slice by slice along the first axis. ``normalization`` is
    the global ``(offset, scale)`` applied as ``(x - offset) * scale`` (never per tile).

    ``mode="invariant"`` tiles the array on the lattice :func:`plan_lattice` plans for it
    (``tile_shape`` bounds the tile): the same probabilities, bit for bit, as ``segflow
    segment`` in its default mode with the same tile bound and batch size, for any chunks.
    ``mode="reference"`` with ``tile_shape=None`` is one pass over the whole array, the
    oracle; with any tile shape it gives the same probabilities. ``mode="fast"`` tiles the
    array on its own (``None``: one pass).
    """
    a = np.asarray(array)
    a = a[None] if channel_axis is None else np.moveaxis(a, channel_axis, 0)
    if a.shape[0] != model.config.in_channels:
        raise InvalidVolumeError(
            f"the image has {a.shape[0]} channel(s) but the model expects "
            f"{model.config.in_channels}"
        )
    if a.ndim - 1 not in (2, 3) or any(n < 1 for n in a.shape[1:]):
        raise InvalidVolumeError(f"cannot segment an image of spatial shape {a.shape[1:]}")
    offset, scale = normalization or (0.0, 1.0)
    volume = Box.of_shape(a.shape[1:])
    predictor = Predictor(
        model, device=device, batch_size=batch_size, precision=precision, mode=mode
    )
    read, tiles = plan_box(predictor.spec(volume.ndim), volume.shape, volume, mode, tile_shape)
    data = read_mirrored(a, read, volume.shape, leading=1, dtype=np.float32)
    own = not np.may_share_memory(data, a)  # a view of the caller's array stays untouched
    data = apply_affine(data, offset, scale, in_place=own, source_dtype=a.dtype)
    return softmax(predictor.logits(data, read, tiles, volume))
