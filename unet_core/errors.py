"""The one small error hierarchy of segflow.

Every error subclasses :class:`SegflowError` *and* the builtin it refines, so callers may
catch either ``SegflowError`` (anything segflow refused) or the builtin they already expect
(``ValueError``, ``FileNotFoundError``, ...). Messages are one sentence that names the file
or the value and the problem; the CLI prints exactly that sentence and exits non-zero.
"""

from __future__ import annotations


class SegflowError(Exception):
    """Base class of every error segflow raises on purpose."""


class InvalidShapeError(SegflowError, ValueError):
    """A tile or input shape the network cannot take (the message names valid ones)."""


class ConfigError(SegflowError, ValueError):
    """A parameter or configuration value that is out of range or inconsistent."""


class ClusterStartError(SegflowError, RuntimeError):
    """No Dask worker could be obtained (batch jobs rejected or never started)."""


class CheckpointError(SegflowError, ValueError):
    """A checkpoint that is corrupted, foreign, unsafe or incompatible."""


class InvalidVolumeError(SegflowError, ValueError):
    """An input image/volume that cannot be read or has an unsupported layout."""


class VolumeNotFoundError(SegflowError, FileNotFoundError):
    """A source or store that does not exist."""


class StoreConflictError(SegflowError, FileExistsError):
    """A destination that already holds other data (use --overwrite to replace it)."""


class StorageAccessError(SegflowError, PermissionError):
    """Remote storage refused access (credentials, permissions, missing bucket)."""
