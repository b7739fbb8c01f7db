"""The one small error hierarchy of segflow.

Every error subclasses :class:`SegflowError` *and* the builtin it refines, so callers may
catch either ``SegflowError`` (anything segflow refused) or the builtin they already expect
(``ValueError``, ``FileNotFoundError``, ...). Messages are one sentence that names the file
or the value and the problem, and name an option as a field (:func:`opt`). What a door
makes of an error is the door's: the CLI prints the sentence and exits with the status of
its kind (:data:`segflow.errors.EXIT_CODES`), a flow fails its run with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

_FIELD = re.compile("\u27e8([a-z_]+)\u27e9")


def opt(field: str) -> str:
    """A reference to the option (schema field) ``field`` in a message. The engine never
    names a flag or a form title: each door renders the field in its own words (the CLI
    ``--field-name``, the Prefect form its title), so no message suggests an option the
    user does not have. Plain ``str(error)`` shows ``'field'``."""
    return f"\u27e8{field}\u27e9"


def render(text: str, name: Callable[[str], str] | None = None) -> str:
    """``text`` with its option references (:func:`opt`) named by ``name`` (default: the
    field in quotes)."""
    return _FIELD.sub(lambda m: (name or _neutral)(m.group(1)), text)


def _neutral(field: str) -> str:
    return f"'{field}'"


class SegflowError(Exception):
    """Base class of every error segflow raises on purpose.

    The message may name options with :func:`opt`; :attr:`template` keeps them, ``str()``
    shows them neutrally and :meth:`render` in a door's words."""

    def __init__(self, message: object = "", *args: object) -> None:
        self.template = str(message)
        super().__init__(render(self.template), *args)

    def render(self, name: Callable[[str], str] | None = None) -> str:
        return render(self.template, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.template,))


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
    """Storage refused access (credentials, permissions, missing bucket, read-only)."""


class StorageError(SegflowError, OSError):
    """Storage failed: unreachable endpoint, throttling, full disk, I/O error.

    Raised by :func:`tasks.store.translate_storage_error`; the original exception is kept
    as ``__cause__`` (:func:`tasks.store.is_transient` looks at it)."""


class LeaseHeldError(StoreConflictError):
    """Another run holds the lease on the outputs (the message names the holder)."""


class LeaseLostError(SegflowError, RuntimeError):
    """This run's lease was taken over by another run (it was suspended past the lease's
    time to live, or could not renew it): it stops writing and exits non-zero."""


class IncompleteError(SegflowError, ValueError):
    """An input that a run has not finished writing (not marked complete)."""


class MissingDataError(InvalidVolumeError):
    """A chunk that must exist is missing or cannot be decoded (never read as zeros)."""


class BlockError(SegflowError, RuntimeError):
    """A block of a step failed: names the step, the block, its voxel box and the store.

    ``cause`` is the original exception, so callers (the CLI's exit codes, Prefect's retry
    decision) can still tell a bad input from a storage outage.
    """

    def __init__(self, message: object, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        self.failed_blocks = 1

    @classmethod
    def wrap(cls, where: str, exc: BaseException) -> BlockError:
        if isinstance(exc, BlockError):
            return exc
        if isinstance(exc, SegflowError):
            text = exc.template or type(exc).__name__
        else:
            text = f"{type(exc).__name__}: {str(exc) or type(exc).__name__}"
        return cls(f"{where} failed: {text}", exc)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.template, self.cause))
