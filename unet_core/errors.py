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


class LeaseHeldError(StoreConflictError):
    """Another run holds the lease on the outputs (the message names the holder)."""


class IncompleteError(SegflowError, ValueError):
    """An input that a run has not finished writing (not marked complete)."""


class MissingDataError(InvalidVolumeError):
    """A chunk that must exist is missing or cannot be decoded (never read as zeros)."""


class BlockError(SegflowError, RuntimeError):
    """A block of a step failed: names the step, the block, its voxel box and the store.

    ``cause`` is the original exception, so callers (the CLI's exit codes, Prefect's retry
    decision) can still tell a bad input from a storage outage.
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.failed_blocks = 1

    @classmethod
    def wrap(cls, where: str, exc: BaseException) -> BlockError:
        if isinstance(exc, BlockError):
            return exc
        text = str(exc) or type(exc).__name__
        if not isinstance(exc, SegflowError):
            text = f"{type(exc).__name__}: {text}"
        return cls(f"{where} failed: {text}", exc)

    def __reduce__(self) -> tuple[type, tuple[str, BaseException | None]]:
        return (type(self), (str(self), self.cause))
