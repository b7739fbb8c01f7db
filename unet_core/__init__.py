"""unet_core: the U-Net, its geometry, tiled prediction, training and checkpoints.

Plain PyTorch and NumPy only: this package never imports prefect, dask or zarr.

The names below are loaded on first use (PEP 562), so that importing a light submodule
such as :mod:`unet_core.errors` or :mod:`unet_core.normalize` (the CLI, the ingest step)
does not pull in PyTorch. Importing it changes nothing in the process: the CPU settings
for PyTorch are applied by :func:`unet_core.runtime.configure`, which the entry points call.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unet_core.checkpoint import (
        CheckpointMeta,
        ObjectStats,
        load_checkpoint,
        read_checkpoint_header,
        save_checkpoint,
    )
    from unet_core.config import UNetConfig
    from unet_core.errors import (
        CheckpointError,
        ConfigError,
        InvalidShapeError,
        InvalidVolumeError,
        SegflowError,
        StorageAccessError,
        StorageError,
        StoreConflictError,
        VolumeNotFoundError,
    )
    from unet_core.model import UNet
    from unet_core.normalize import IntensityStats, Normalization, StatsAccumulator

_EXPORTS = {
    "CheckpointMeta": "unet_core.checkpoint",
    "ObjectStats": "unet_core.checkpoint",
    "load_checkpoint": "unet_core.checkpoint",
    "read_checkpoint_header": "unet_core.checkpoint",
    "save_checkpoint": "unet_core.checkpoint",
    "UNetConfig": "unet_core.config",
    "CheckpointError": "unet_core.errors",
    "ConfigError": "unet_core.errors",
    "InvalidShapeError": "unet_core.errors",
    "InvalidVolumeError": "unet_core.errors",
    "SegflowError": "unet_core.errors",
    "StorageAccessError": "unet_core.errors",
    "StorageError": "unet_core.errors",
    "StoreConflictError": "unet_core.errors",
    "VolumeNotFoundError": "unet_core.errors",
    "UNet": "unet_core.model",
    "IntensityStats": "unet_core.normalize",
    "Normalization": "unet_core.normalize",
    "StatsAccumulator": "unet_core.normalize",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'unet_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


__all__ = [
    "CheckpointError",
    "CheckpointMeta",
    "ConfigError",
    "IntensityStats",
    "InvalidShapeError",
    "InvalidVolumeError",
    "Normalization",
    "ObjectStats",
    "SegflowError",
    "StatsAccumulator",
    "StorageAccessError",
    "StorageError",
    "StoreConflictError",
    "UNet",
    "UNetConfig",
    "VolumeNotFoundError",
    "load_checkpoint",
    "read_checkpoint_header",
    "save_checkpoint",
]
