"""The error boundary of every command: one sentence on stderr, the documented exit status,
no traceback unless ``--debug`` (or ``SEGFLOW_DEBUG=1``).

Errors segflow raises on purpose map to the status of their kind (:data:`EXIT_CODES`,
tabled in the README and the guide); storage exceptions are translated by
:func:`tasks.store.translate_storage_error`; anything else is "unexpected" (status 1).
Option fields an engine message names (:func:`unet_core.errors.opt`) are shown as this
door's flags. Usage errors (unknown option, bad value) are one line too
(:func:`usage_line`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from enum import IntEnum
from typing import Any, ParamSpec, TypeVar

import click
import typer
import typer.exceptions

from segflow.app import debug_enabled
from unet_core.errors import (
    BlockError,
    CheckpointError,
    ConfigError,
    IncompleteError,
    InvalidShapeError,
    InvalidVolumeError,
    LeaseLostError,
    SegflowError,
    StorageAccessError,
    StorageError,
    StoreConflictError,
    VolumeNotFoundError,
)

P = ParamSpec("P")
R = TypeVar("R")

#: Arguments that name what a command reads or writes, in the order they are blamed for a
#: storage failure that does not name its own file.
_WHERE_ARGS = ("src", "store", "image", "ckpt", "model", "dst", "out", "to")


class ExitCode(IntEnum):
    """Exit status of the ``segflow`` command, one per kind of failure."""

    OK = 0
    #: anything segflow did not foresee (a bug or an unhandled case)
    OTHER = 1
    #: a bad command line: unknown option, malformed or out-of-range value
    USAGE = 2
    #: an input that is missing, unreadable, damaged or unusable (TIFF, store, checkpoint)
    BAD_INPUT = 3
    #: storage that is unreachable, refuses access, is full or fails (local disk or S3)
    STORAGE = 4
    #: a destination that holds other data, or outputs another run is writing (lease)
    CONFLICT = 5


#: The exit status of each kind of error (the nearest class in an error's MRO decides).
EXIT_CODES: dict[type[BaseException], ExitCode] = {
    ConfigError: ExitCode.USAGE,
    InvalidShapeError: ExitCode.USAGE,
    CheckpointError: ExitCode.BAD_INPUT,
    InvalidVolumeError: ExitCode.BAD_INPUT,
    VolumeNotFoundError: ExitCode.BAD_INPUT,
    IncompleteError: ExitCode.BAD_INPUT,
    StoreConflictError: ExitCode.CONFLICT,
    LeaseLostError: ExitCode.CONFLICT,
    StorageAccessError: ExitCode.STORAGE,
    StorageError: ExitCode.STORAGE,
    BlockError: ExitCode.OTHER,
    SegflowError: ExitCode.OTHER,
}


def exit_code(exc: BaseException) -> ExitCode:
    """The exit status of an error segflow raised (:data:`EXIT_CODES`)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return ExitCode.OTHER


def describe_error(exc: BaseException, where: str = "") -> tuple[str, ExitCode]:
    """One sentence and the exit status for an exception that reached a command.

    ``where`` names what the command works on (a store, a file); it is used only for a
    storage failure that does not name its own file or chunk."""
    from segflow.options import describe_validation, name_field

    if isinstance(exc, SegflowError):
        text = _one_line(exc.render(name_field))  # option fields named as this door's flags
        cause = getattr(exc, "cause", None)  # an error that wraps another (a failed block)
        if isinstance(cause, BaseException) and not isinstance(cause, SegflowError):
            from tasks.storage_errors import translate_storage_error

            err = translate_storage_error(cause, where or "storage")
            return text, exit_code(err) if err is not None else exit_code(exc)
        if isinstance(cause, SegflowError):
            return text, exit_code(cause)
        return text, exit_code(exc)
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return _one_line(f"invalid option {describe_validation(exc)}"), ExitCode.USAGE
    from tasks.storage_errors import translate_storage_error

    err = translate_storage_error(exc, where or "storage")
    if err is not None:
        return _one_line(err.render(name_field)), exit_code(err)
    if isinstance(exc, MemoryError):
        return "ran out of memory (try smaller --chunks, tiles or batches)", ExitCode.OTHER
    text = _one_line(str(exc), 200) or "(no message)"
    return (
        f"unexpected {type(exc).__name__}: {text} (an unhandled case; run with --debug "
        "for the traceback)",
        ExitCode.OTHER,
    )


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(arguments: Mapping[str, Any]) -> str:
    for name in _WHERE_ARGS:
        value = arguments.get(name)
        if value:
            return str(value)
    return ""


class _UnretrievedTimeouts(logging.Filter):
    """Drops asyncio's report of a timed-out future that nothing awaited.

    On a loaded machine Dask's shutdown can leave one of its own timeouts unretrieved;
    asyncio then prints "Future exception was never retrieved ... TimeoutError: Timeout"
    when the future is collected, possibly after the command has finished, even with
    ``-q``. No result depends on it. Installed for the rest of the process (collection
    can happen at exit); ``--debug`` keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        unretrieved = record.getMessage().startswith(
            ("Future exception was never retrieved", "Task exception was never retrieved")
        )
        return not (unretrieved and isinstance(exc, TimeoutError))


_UNRETRIEVED = _UnretrievedTimeouts()


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Unless debugging, Dask's logs and warnings stay off stderr: a failed task is reported
    once, as the error sentence, not also as a worker's "Compute Failed" traceback."""
    if debug_enabled():
        yield
        return
    logging.getLogger("asyncio").addFilter(_UNRETRIEVED)  # idempotent
    env = "DASK_LOGGING__DISTRIBUTED"  # read when distributed is imported
    saved = os.environ.get(env)
    os.environ[env] = saved or "critical"
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="distributed")
            yield
    finally:
        logger.setLevel(level)
        if saved is None:
            os.environ.pop(env, None)


def clean_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """The error boundary of a command: one sentence on stderr, the documented exit status,
    and no traceback unless ``--debug`` or ``SEGFLOW_DEBUG=1``."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            with _quiet_libraries():
                return fn(*args, **kwargs)
        except (
            click.exceptions.Exit,
            click.exceptions.Abort,
            click.ClickException,
            typer.Exit,
            typer.Abort,
            typer.BadParameter,
            typer.exceptions.TyperException,
        ):
            raise  # typer's own exits and usage errors (status 2)
        except KeyboardInterrupt:
            typer.echo("segflow: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as exc:
            if debug_enabled():
                traceback.print_exc()
            message, code = describe_error(exc, _where(kwargs))
            typer.echo(f"segflow: error: {message}", err=True)
            raise typer.Exit(int(code)) from None

    return wrapper


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn ``a`` into ``b``."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        row = [i]
        for j, cb in enumerate(b, 1):
            cost = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                cost = min(cost, prev2[j - 2] + 1)
            row.append(cost)
        prev2, prev = prev, row
    return prev[-1]


def close_words(word: str, candidates: Iterable[str]) -> list[str]:
    """The candidates a typo of ``word`` could be: at most 2 edits away, and at most a
    third of the word (``--modle``: ``--mode``, ``--model``; never ``--tile``)."""
    bare = word.lstrip("-")
    limit = min(2, max(1, len(bare) // 3))
    scored = sorted((edit_distance(bare, c.lstrip("-")), c) for c in set(candidates))
    return [c for d, c in scored if d <= limit]


def _or(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def usage_line(exc: BaseException) -> str:
    """A usage error (unknown option, bad value, missing argument) as one line; an
    unknown option or command suggests only names a typo away."""
    option = getattr(exc, "option_name", None)
    command = getattr(exc, "command_name", None)
    ctx = getattr(exc, "ctx", None)
    commands = getattr(getattr(ctx, "command", None), "commands", None)
    unknown = re.match(r"No such command '(.+?)'", str(getattr(exc, "message", "")))
    if unknown and commands:
        command = unknown.group(1)
    if option or command:
        word = str(option or command)
        near = close_words(
            word, (commands or {}) if command else getattr(exc, "possibilities", None) or []
        )
        if command:
            near = [f"'{w}'" for w in near]
        kind = "option" if option else "command"
        hint = f"; did you mean {_or(near)}?" if near else ""
        return f"no such {kind}: {word}{hint}"
    format_message = getattr(exc, "format_message", None)
    text = format_message() if callable(format_message) else str(exc)
    text = text.replace("Value error, ", "")
    return _one_line(text[:1].lower() + text[1:]) if text else "bad command line"
