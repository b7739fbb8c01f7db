"""Output and logging conventions every command shares (:func:`output_options`):
``-q/--quiet`` (nothing but errors), ``--json`` (the summary as one JSON object on stdout;
human text otherwise, :func:`emit`), ``-v/--log-level`` (log messages of segflow, Dask and
Prefect; Dask and Prefect say only warnings by default)."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, TypeVar

import typer

from segflow.app import _state, debug_enabled
from segflow.options import _with_options

R = TypeVar("R")

# ------------------------------------------------------------------ output conventions

OUTPUT_PANEL = "Output and logging"
#: Loggers of segflow itself: warnings by default, ``-v`` info, ``-vv`` debug.
OWN_LOGGERS = ("segflow", "tasks", "unet_core", "flows", "deployments")
#: Dask's logs. By default only what is critical: a failed block is reported once, as
#: the error sentence, not also as a worker's "Compute Failed" traceback.
DASK_LOGGERS = ("distributed",)
#: Other libraries' logs: warnings by default.
LIBRARY_LOGGERS = ("prefect", "tornado", "bokeh", "httpx", "httpcore", "asyncio", "fsspec")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _output_parameters(summary: bool) -> list[inspect.Parameter]:
    def option(name: str, kind: Any, default: Any, *decls: str, **kw: Any) -> inspect.Parameter:
        info = typer.Option(*decls, rich_help_panel=OUTPUT_PANEL, **kw)
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
        )

    params = [
        option(
            "quiet",
            bool,
            False,
            "--quiet",
            "-q",
            help="Print nothing but errors: no progress, no log messages, no summary "
            "(unless --json).",
        ),
        option(
            "verbose",
            int,
            0,
            "--verbose",
            "-v",
            count=True,
            help="More log messages: -v segflow's steps and Dask/Prefect warnings, -vv debug.",
        ),
        option(
            "log_level",
            str | None,
            None,
            "--log-level",
            help="Level of every log message (segflow, Dask, Prefect): "
            + ", ".join(LOG_LEVELS)
            + ".",
        ),
    ]
    if summary:
        params.insert(
            1,
            option(
                "as_json",
                bool,
                False,
                "--json",
                help="Print the summary as one JSON object on stdout (default: lines of text).",
            ),
        )
    return params


def output_options(
    fn: Callable[..., R] | None = None, *, summary: bool = True, serving: bool = False
) -> Any:
    """Give a command the shared output options: ``-q/--quiet``, ``--json`` (when it has a
    summary: ``summary=False`` leaves it out), ``-v/--verbose`` and ``--log-level``. The
    command reads them through :func:`is_quiet`, :func:`emit` and :func:`warn`; log levels
    are set for the command's run and restored after. ``serving``: the command runs flow
    runs (``segflow serve``), whose logs are what the Prefect UI shows: by default
    segflow's and Prefect's info lines (a run's summary, its lifecycle) instead of
    warnings only (:func:`_levels`)."""

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        def call(fn: Callable[..., R], args: Any, kwargs: dict[str, Any]) -> R:
            quiet = bool(kwargs.pop("quiet", False))
            as_json = bool(kwargs.pop("as_json", False))
            verbose = int(kwargs.pop("verbose", 0) or 0)
            level = kwargs.pop("log_level", None)
            if level is not None and level.lower() not in LOG_LEVELS:
                raise typer.BadParameter(
                    f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {level!r}"
                )
            saved = dict(_state)
            _state.update(quiet=quiet, json=as_json)
            try:
                with _log_levels(quiet, verbose, level, serving):
                    return fn(*args, **kwargs)
            finally:
                _state.clear()
                _state.update(saved)

        return _with_options(fn, _output_parameters(summary), call)

    return decorate if fn is None else decorate(fn)


def is_quiet() -> bool:
    """Whether the running command was asked for ``-q`` (no progress, no text)."""
    return bool(_state.get("quiet"))


def wants_json() -> bool:
    """Whether the running command was asked for ``--json``."""
    return bool(_state.get("json"))


def emit(summary: Mapping[str, Any], text: str | None = None) -> None:
    """A command's result: ``summary`` as one JSON object on stdout with ``--json``;
    otherwise ``text`` (default: the summary as ``key: value`` lines), unless ``-q``."""
    if _state.get("json"):
        typer.echo(json.dumps(summary, default=str))
    elif not _state.get("quiet"):
        typer.echo(text if text is not None else "\n".join(_lines(summary)))


def warn(message: str) -> None:
    """``segflow: warning: MESSAGE`` on stderr, unless ``-q``."""
    if not _state.get("quiet"):
        typer.echo(f"segflow: warning: {message}", err=True)


def _lines(value: Mapping[str, Any], indent: str = "") -> list[str]:
    out: list[str] = []
    for key, item in value.items():
        if isinstance(item, Mapping):
            out.append(f"{indent}{key}:")
            out += _lines(item, indent + "  ")
        elif isinstance(item, list | tuple) and item and isinstance(item[0], Mapping):
            out.append(f"{indent}{key}: {len(item)} entries (--json shows them)")
        elif isinstance(item, float):
            out.append(f"{indent}{key}: {item:.6g}")
        elif isinstance(item, list | tuple):
            out.append(f"{indent}{key}: {', '.join(map(str, item))}")
        else:
            out.append(f"{indent}{key}: {'-' if item is None else item}")
    return out


class _LogFormat(logging.Formatter):
    """``segflow: warning: message``; other levels, and other libraries, name the logger."""

    def format(self, record: logging.LogRecord) -> str:
        from segflow.options import name_field
        from unet_core.errors import render

        text = render(super().format(record), name_field)  # option fields as flags
        own = record.name.split(".")[0] in OWN_LOGGERS and record.levelno >= logging.WARNING
        where = "" if own else f"{record.name}: "
        return f"segflow: {record.levelname.lower()}: {where}{text}"


def _levels(
    quiet: bool, verbose: int, level: str | None, serving: bool = False
) -> tuple[int, int, int, int]:
    """The levels of segflow's own loggers, Dask's, Prefect's and other libraries'. A
    serving command logs segflow's and Prefect's info lines by default: they are the flow
    runs' logs in the UI (the run's summary, "Beginning flow run", "Finished in state")."""
    named = {name.upper(): getattr(logging, name.upper()) for name in LOG_LEVELS}
    if level is not None:
        own = dask = lib = named[level.upper()]
        return own, dask, lib, lib
    if quiet:
        own, dask, lib = logging.ERROR, logging.CRITICAL, logging.ERROR
    elif verbose >= 2:
        own, dask, lib = logging.DEBUG, logging.INFO, logging.INFO
    elif verbose == 1 or debug_enabled() or serving:
        own, dask, lib = logging.INFO, logging.WARNING, logging.WARNING
    else:
        own, dask, lib = logging.WARNING, logging.CRITICAL, logging.WARNING
    if serving and not quiet:
        dask = logging.CRITICAL if verbose < 2 else dask
        return own, dask, min(lib, logging.INFO), lib
    return own, dask, lib, lib


@contextlib.contextmanager
def _log_levels(
    quiet: bool, verbose: int, level: str | None, serving: bool = False
) -> Iterator[None]:
    """Log levels for one command: segflow's own loggers, Dask's, Prefect's and other
    libraries' (the environment carries Dask's and Prefect's to worker processes and to
    the flow runs Prefect starts)."""
    own, dask, prefect, lib = _levels(quiet, verbose, level, serving)
    explicit = level is not None or quiet or verbose > 0
    env = {"DASK_LOGGING__DISTRIBUTED": dask, "PREFECT_LOGGING_LEVEL": prefect}
    saved_env = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        if explicit or saved_env[key] is None:
            os.environ[key] = logging.getLevelName(value).lower()
    root = logging.getLogger()
    loggers = dict.fromkeys(OWN_LOGGERS, own)
    loggers.update(dict.fromkeys(DASK_LOGGERS, dask))
    loggers.update(dict.fromkeys(LIBRARY_LOGGERS, lib))
    loggers["prefect"] = prefect
    saved = {name: logging.getLogger(name).level for name in loggers}
    saved_root = root.level
    for name, value in loggers.items():
        logging.getLogger(name).setLevel(value)
    root.setLevel(lib)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat("%(message)s"))
    if not (level is not None or verbose > 0):
        # Other libraries' messages (tifffile, zarr, ...) only when asked: what they report
        # as an error reaches the user once, as the command's error sentence.
        handler.addFilter(lambda record: record.name.split(".")[0] in OWN_LOGGERS)
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_root)
        for name, value in saved.items():
            logging.getLogger(name).setLevel(value)
        for key, before in saved_env.items():
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before
