"""unet_core: the U-Net, its geometry, tiled prediction, training and checkpoints.

Plain PyTorch and NumPy only: this package never imports prefect, dask or zarr.
"""

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
    StoreConflictError,
    VolumeNotFoundError,
)
from unet_core.model import UNet
from unet_core.normalize import IntensityStats, Normalization, StatsAccumulator

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
    "StoreConflictError",
    "UNet",
    "UNetConfig",
    "VolumeNotFoundError",
    "load_checkpoint",
    "read_checkpoint_header",
    "save_checkpoint",
]
