"""Checkpoints that carry everything inference needs, and load without running pickles.

A checkpoint is a ``torch.save`` file holding only plain containers, strings and tensors:

``{"format": "segflow-checkpoint", "version": 1, "config": <json>, "meta": <json>,
"digest": <sha256 hex>, "state_dict": {...}}``

It is read with ``torch.load(weights_only=True)``, which refuses any pickled object that is
not a tensor or a plain container, so a malicious file is rejected before anything in it
runs. The digest covers the config and every tensor's name, dtype, shape and bytes: a
corrupted file, or one whose weights were changed by hand, fails to load.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from unet_core.config import UNetConfig
from unet_core.errors import CheckpointError, VolumeNotFoundError
from unet_core.model import UNet
from unet_core.normalize import IntensityStats, Normalization
from unet_core.slicelink import DEFAULT_LINK_IOU

FORMAT = "segflow-checkpoint"
VERSION = 1
#: Largest network a checkpoint may declare (4 GB of float32 weights; the paper's 2D
#: network has 31 M parameters, a 3D one of depth 4 and 64 base channels about 90 M).
MAX_PARAMETERS = 1_000_000_000


class ObjectStats(BaseModel):
    """Sizes of connected foreground objects seen in the training labels, in their units:
    pixel areas for a 2D model, voxels for a 3D one (:mod:`unet_core.sizes` converts)."""

    model_config = ConfigDict(frozen=True)

    count: int = 0
    min: float = 0.0
    p5: float = 0.0
    median: float = 0.0
    p95: float = 0.0
    max: float = 0.0

    @property
    def suggested_min_size(self) -> int:
        """Default minimum object size for instance post-processing (1/4 of the 5th pct),
        in the training labels' units (:func:`unet_core.sizes.default_min_size`)."""
        return max(int(self.p5 // 4), 1) if self.count else 1


class CheckpointMeta(BaseModel):
    """What a checkpoint says about its model besides the weights."""

    model_config = ConfigDict(frozen=True, extra="allow")

    class_names: list[str] = Field(default_factory=list)
    normalization: Normalization = Field(default_factory=Normalization)
    training_stats: IntensityStats | None = Field(
        None, description="global intensity statistics of the training images"
    )
    channel_axis: Literal["first"] = Field(
        "first", description="tensors are (N, C, *spatial); images store channels first too"
    )
    object_stats: ObjectStats | None = None
    foreground_class: int = Field(1, ge=0, description="class whose instances are stitched")
    link_iou: float = Field(
        DEFAULT_LINK_IOU,
        ge=0.0,
        le=1.0,
        description="IoU that links objects of consecutive slices (2D models on stacks)",
    )
    training: dict[str, Any] = Field(default_factory=dict, description="steps, metrics, seed")
    digest: str = Field("", description="content digest, filled in on save and load")

    @property
    def identity(self) -> str:
        """What the checkpoint makes of an image: the content digest (config and weights)
        together with every metadata field that changes outputs (normalisation, classes,
        foreground class, link IoU, object sizes, anything unknown) — all but the training
        record. A checkpoint re-saved with another normalisation is another model."""
        fields = self.model_dump(mode="json", exclude={"training", "digest"})
        blob = json.dumps({"digest": self.digest, "meta": fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def names_for(self, n_classes: int) -> list[str]:
        if len(self.class_names) == n_classes:
            return list(self.class_names)
        return ["background"] + [f"class_{i}" for i in range(1, n_classes)]


def state_digest(config: UNetConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the config and every tensor (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    h.update(config.model_dump_json().encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(state_dict[name].shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike[str], model: UNet, meta: CheckpointMeta | None = None
) -> str:
    """Write ``model`` and ``meta`` atomically to ``path``; return the content digest."""
    meta = meta or CheckpointMeta()
    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    digest = state_digest(model.config, state)
    meta = meta.model_copy(update={"digest": digest})
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.model_dump_json(),
        "meta": meta.model_dump_json(),
        "digest": digest,
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return digest


def read_checkpoint_header(path: str | os.PathLike[str]) -> tuple[UNetConfig, CheckpointMeta]:
    """Config and meta of a checkpoint, verified (weights are read but no model is built).

    Remembered per file version (path, size, modification time): a run checks the model
    before any work and plans with it afterwards, and ``predict`` does both per input; a
    large checkpoint is then read and hashed once, not each time."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        st = None
    if st is None or not p.is_file():
        config, meta, _ = _read(p)  # raises the sentence for what is wrong
        return config, meta
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    known = _HEADERS.get(key)
    if known is None:
        config, meta, _ = _read(p)  # messages name the path as given
        while len(_HEADERS) >= _HEADERS_KEPT:
            _HEADERS.pop(next(iter(_HEADERS)))
        _HEADERS[key] = known = (config, meta)
    return known[0].model_copy(), known[1].model_copy()


#: Verified headers by (resolved path, size, modification time in ns), oldest first.
_HEADERS: dict[tuple[str, int, int], tuple[UNetConfig, CheckpointMeta]] = {}
_HEADERS_KEPT = 8


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[UNet, CheckpointMeta]:
    """Rebuild the model from a checkpoint (eval mode) and return it with its meta."""
    config, meta, state = _read(path, map_location)
    model = UNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the stored config ({first})") from exc
    model.eval()
    return model, meta


def _check_architecture(p: Path, config: UNetConfig, state: dict[str, Any]) -> None:
    """The weights are the ones the config implies (names, shapes, a bounded count), checked
    before any model is built (a crafted small file may declare a huge network)."""
    expected = UNet.state_shapes(config)
    count = sum(math.prod(shape) for shape in expected.values())
    if count > MAX_PARAMETERS:
        raise CheckpointError(
            f"{p}: the config declares a network of {count / 1e6:,.0f} M parameters "
            f"(depth {config.depth}, {config.base_channels} base channels, "
            f"{config.n_classes} classes), over the limit of {MAX_PARAMETERS / 1e6:,.0f} M"
        )
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing, e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected, e.g. '{unexpected[0]}'")
        raise CheckpointError(
            f"{p}: the weights do not match the network its config declares ({'; '.join(parts)})"
        )
    for name, shape in expected.items():
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(
                f"{p}: weight '{name}' has shape {got} but the network its config declares "
                f"needs {shape}"
            )


def _not_torch(raw: bytes) -> str | None:
    """Why ``raw`` cannot be a ``torch.save`` file (a zip archive holding ``data.pkl``), or
    None when it may be one."""
    kinds = (
        ((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), "a TIFF image"),
        ((b"\x93NUMPY",), "a NumPy array"),
        ((b"\x89PNG",), "a PNG picture"),
        ((b"\x89HDF",), "an HDF5 file"),
    )
    for magics, what in kinds:
        if raw.startswith(magics):
            return f"it is {what}, not a PyTorch file"
    if not raw.startswith(b"PK\x03\x04"):
        try:
            raw[:4096].decode("utf-8")
        except UnicodeDecodeError:
            return "it is not a PyTorch file"
        return "it is a text file, not a PyTorch file"
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError):
        return None  # damaged: torch.load says so
    if not any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
        return "it is a zip archive, not a PyTorch file"
    return _inflated_problem(infos, len(raw))


def _inflated_problem(infos: list[zipfile.ZipInfo], size: int) -> str | None:
    """Why the archive's entries cannot be inflated safely, or None.

    ``torch.save`` stores every entry uncompressed, so the entries of a real checkpoint
    declare at most the file's own size. PyTorch allocates what an entry declares before
    inflating it: a few hundred KB of deflated zeros declaring a GB would take a GB. Only
    the central directory is read here; nothing is inflated or unpickled."""
    declared = sum(int(i.file_size) for i in infos)
    if declared <= size:
        return None
    packed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    biggest = max(packed or infos, key=lambda i: int(i.file_size))
    ratio = int(biggest.file_size) / max(int(biggest.compress_size), 1)
    return (
        f"its zip entries declare {_bytes(declared)} uncompressed but the file holds "
        f"{_bytes(size)} ('{biggest.filename}' is packed {ratio:,.0f}:1); torch.save "
        "writes entries uncompressed, so nothing of it is inflated"
    )


def _bytes(n: int) -> str:
    """A byte count as people read it: '973,277 bytes' or '953.7 MiB'."""
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _pickle_reason(exc: BaseException) -> str:
    """The line of PyTorch's refusal that names the object (``GLOBAL module.Name``)."""
    text = str(exc)
    for line in text.splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            line = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return line.split(" was not an allowed global")[0][:160]
    first = text.strip().splitlines()[0] if text.strip() else "unpickling failed"
    return first[:160]


def _read(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> tuple[UNetConfig, CheckpointMeta, dict[str, torch.Tensor]]:
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is not a segflow checkpoint (it is a folder)")
    if not p.is_file():
        raise VolumeNotFoundError(f"{p}: checkpoint file does not exist")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{p}: checkpoint file is empty")
    try:
        raw = p.read_bytes()
    except PermissionError:
        raise CheckpointError(f"{p}: cannot read the checkpoint (permission denied)") from None
    reason = _not_torch(raw)
    if reason is not None:
        raise CheckpointError(f"{p} is not a segflow checkpoint ({reason})")
    try:
        payload = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{p} is not a segflow checkpoint (it holds pickled Python objects, refused "
            f"unrun: {_pickle_reason(exc)}; segflow checkpoints are written by 'segflow "
            "train' and 'segflow model create')"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{p}: not a readable segflow checkpoint (corrupted or not a torch file)"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{p} is not a segflow checkpoint (a PyTorch file without the '{FORMAT}' header, "
            "e.g. a bare state_dict or another program's checkpoint)"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format version {payload.get('version')} is not supported "
            f"(this segflow reads version {VERSION})"
        )
    try:
        config = UNetConfig.model_validate_json(payload["config"])
        meta = CheckpointMeta.model_validate(json.loads(payload["meta"]))
        state = payload["state_dict"]
        if not isinstance(state, dict):
            raise TypeError("state_dict is not a dict")
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise CheckpointError(
            f"{p}: checkpoint header is malformed ({type(exc).__name__})"
        ) from exc
    _check_architecture(p, config, state)
    digest = state_digest(config, state)
    if digest != payload.get("digest"):
        raise CheckpointError(f"{p}: checkpoint content does not match its digest (corrupted)")
    return config, meta.model_copy(update={"digest": digest}), state
