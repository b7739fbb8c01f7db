"""The ``segflow`` command.

Each group of commands lives in its own module (``segflow/commands_*.py``) and registers
itself on :data:`app`. Heavy imports (torch, dask, prefect) happen inside the commands so
that ``segflow --help`` is quick.

Every command runs inside one error boundary (:func:`clean_errors`): whatever reaches it
is printed as one sentence on stderr and the command exits with the status of its kind
(:class:`unet_core.errors.ExitCode`, tabled in the README): errors segflow raises on
purpose carry their own, storage exceptions are translated by
:func:`tasks.store.translate_storage_error`, anything else is "unexpected" (status 1).
``--debug`` (or ``SEGFLOW_DEBUG=1``) also prints the traceback.

Every command follows one set of conventions (:func:`output_options`): ``-h/--help`` with
examples (:data:`EXAMPLES`), ``-q/--quiet`` (nothing but errors), ``--json`` (the summary
as one JSON object on stdout; human text otherwise, :func:`emit`), ``-v/--log-level`` (log
messages of segflow, Dask and Prefect; Dask and Prefect say only warnings by default).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, ParamSpec, TypeVar

import click
import typer
import typer.exceptions
import typer.main

from unet_core.errors import ExitCode, SegflowError
from unet_core.runtime import configure

#: Environment variable that turns on tracebacks like ``--debug``.
DEBUG_ENV = "SEGFLOW_DEBUG"
#: Arguments that name what a command reads or writes, in the order they are blamed for a
#: storage failure that does not name its own file.
_WHERE_ARGS = ("src", "store", "image", "ckpt", "model", "dst", "out", "to")

app = typer.Typer(
    name="segflow",
    help="Exact overlap-tile U-Net segmentation of very large microscopy volumes.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
R = TypeVar("R")
_state: dict[str, Any] = {"debug": False, "quiet": False, "json": False}


def _print_version(value: bool) -> None:
    if value:
        from segflow import __version__

        typer.echo(f"segflow {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Print the traceback of an error (or set {DEBUG_ENV}=1)."),
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Exact overlap-tile U-Net segmentation of very large microscopy volumes."""
    _state["debug"] = debug


def debug_enabled() -> bool:
    return _state["debug"] or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false")


def describe_error(exc: BaseException, where: str = "") -> tuple[str, ExitCode]:
    """One sentence and the exit status for an exception that reached a command.

    ``where`` names what the command works on (a store, a file); it is used only for a
    storage failure that does not name its own file or chunk."""
    from segflow.options import describe_validation, name_field

    if isinstance(exc, SegflowError):
        text = _one_line(exc.render(name_field))  # option fields named as this door's flags
        cause = getattr(exc, "cause", None)  # an error that wraps another (a failed block)
        if isinstance(cause, BaseException) and not isinstance(cause, SegflowError):
            from tasks.store import translate_storage_error

            err = translate_storage_error(cause, where or "storage")
            return text, err.exit_code if err is not None else exc.exit_code
        if isinstance(cause, SegflowError):
            return text, cause.exit_code
        return text, exc.exit_code
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return _one_line(f"invalid option {describe_validation(exc)}"), ExitCode.USAGE
    from tasks.store import translate_storage_error

    err = translate_storage_error(exc, where or "storage")
    if err is not None:
        return _one_line(str(err)), err.exit_code
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


def parse_shape(text: str | None, what: str = "shape") -> tuple[int, ...] | None:
    """'64,128,128' -> (64, 128, 128); None stays None."""
    if text is None or text == "":
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} must be integers separated by commas, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def _with_options(
    fn: Callable[..., R],
    options: list[inspect.Parameter],
    call: Callable[[Callable[..., R], Any, dict[str, Any]], R],
    replaces: str | None = None,
) -> Callable[..., R]:
    """``fn`` with ``options`` added to the signature typer reads (in place of its
    parameter ``replaces``); ``call(fn, args, kwargs)`` takes them out and calls ``fn``."""
    own = [
        p.replace(annotation=_evaluate(p.annotation, fn))
        for p in inspect.signature(fn).parameters.values()
        if p.name != replaces
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        return call(fn, args, kwargs)

    params = [*own, *options]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


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


def output_options(fn: Callable[..., R] | None = None, *, summary: bool = True) -> Any:
    """Give a command the shared output options: ``-q/--quiet``, ``--json`` (when it has a
    summary: ``summary=False`` leaves it out), ``-v/--verbose`` and ``--log-level``. The
    command reads them through :func:`is_quiet`, :func:`emit` and :func:`warn`; log levels
    are set for the command's run and restored after."""

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
                with _log_levels(quiet, verbose, level):
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
        text = super().format(record)
        own = record.name.split(".")[0] in OWN_LOGGERS and record.levelno >= logging.WARNING
        where = "" if own else f"{record.name}: "
        return f"segflow: {record.levelname.lower()}: {where}{text}"


@contextlib.contextmanager
def _log_levels(quiet: bool, verbose: int, level: str | None) -> Iterator[None]:
    """Log levels for one command: segflow's own loggers, Dask's and other libraries'
    (the environment carries Dask's and Prefect's to worker processes and to Prefect)."""
    named = {name.upper(): getattr(logging, name.upper()) for name in LOG_LEVELS}
    if level is not None:
        own = dask = lib = named[level.upper()]
    elif quiet:
        own, dask, lib = logging.ERROR, logging.CRITICAL, logging.ERROR
    elif verbose >= 2:
        own, dask, lib = logging.DEBUG, logging.INFO, logging.INFO
    elif verbose == 1 or debug_enabled():
        own, dask, lib = logging.INFO, logging.WARNING, logging.WARNING
    else:
        own, dask, lib = logging.WARNING, logging.CRITICAL, logging.WARNING
    explicit = level is not None or quiet or verbose > 0
    env = {"DASK_LOGGING__DISTRIBUTED": dask, "PREFECT_LOGGING_LEVEL": lib}
    saved_env = {k: os.environ.get(k) for k in env}
    for key, value in env.items():
        if explicit or saved_env[key] is None:
            os.environ[key] = logging.getLevelName(value).lower()
    root = logging.getLogger()
    loggers = dict.fromkeys(OWN_LOGGERS, own)
    loggers.update(dict.fromkeys(DASK_LOGGERS, dask))
    loggers.update(dict.fromkeys(LIBRARY_LOGGERS, lib))
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
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _evaluate(annotation: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) as its object."""
    if isinstance(annotation, str):
        return eval(annotation, fn.__globals__)  # what inspect.signature(eval_str=True) does
    return annotation


#: Examples shown under each command's ``--help`` (command path -> command lines).
EXAMPLES: dict[str, tuple[str, ...]] = {
    "ingest": (
        "segflow ingest stack.tif image.ome.zarr",
        "segflow ingest 'slices/*.tif' image.ome.zarr --axes zyx --chunks 32,256,256",
    ),
    "segment": (
        "segflow segment image.ome.zarr --model model.ckpt",
        "segflow segment stack.tif -m model.ckpt --instances --json",
    ),
    "stitch": (
        "segflow stitch image.ome.zarr",
        "segflow stitch image.ome.zarr --labels semantic --connectivity 3 --min-size 50",
    ),
    "export": ("segflow export image.ome.zarr --labels instances --to instances.ome.tif",),
    "train": (
        "segflow train --image img.tif --labels labels.tif --out model.ckpt",
        "segflow train --image img.tif --labels labels.tif --out model.ckpt --steps 100 --json",
    ),
    "evaluate": ("segflow evaluate pred.tif truth.tif --instances",),
    "predict": (
        "segflow predict stack.tif --model model.ckpt --out results",
        "segflow predict 'raw/*.tif' --model model.ckpt --out results --instances --json",
    ),
    "geometry": ("segflow geometry 572,572", "segflow geometry 64,128,128 --depth 3"),
    "model create": ("segflow model create tiny.ckpt --ndim 2 --base-channels 4 --depth 2",),
    "model info": ("segflow model info model.ckpt --json",),
    "serve": (
        "segflow serve",
        "segflow serve --inbox /data/inbox --output /data/out --model model.ckpt",
    ),
}


def examples_epilog(lines: tuple[str, ...]) -> str:
    """An ``Examples:`` epilog as typer prints it (paragraphs are lines; no markup)."""
    from rich.markup import escape

    return "\n\n".join(["Examples:", *(f"  $ {escape(line)}" for line in lines)])


def _register() -> None:
    from segflow import commands_model  # noqa: F401

    for name in (
        "commands_ingest",
        "commands_segment",
        "commands_stitch",
        "commands_train",
        "commands_serve",
        "commands_predict",
        "demo",
    ):
        try:
            __import__(f"segflow.{name}")
        except ModuleNotFoundError as exc:  # a command group not built yet
            if exc.name != f"segflow.{name}":
                raise
    _add_examples(app, "")


def _add_examples(group: typer.Typer, prefix: str) -> None:
    for command in group.registered_commands:
        name = command.name or (command.callback.__name__ if command.callback else "")
        lines = EXAMPLES.get(f"{prefix}{name}")
        if lines and command.epilog is None:
            command.epilog = examples_epilog(lines)
    for sub in group.registered_groups:
        if sub.typer_instance is not None and sub.name:
            _add_examples(sub.typer_instance, f"{prefix}{sub.name} ")


def usage_line(exc: BaseException) -> str:
    """A usage error (unknown option, bad value, missing argument) as one line."""
    format_message = getattr(exc, "format_message", None)
    text = format_message() if callable(format_message) else str(exc)
    text = text.replace("Value error, ", "")
    return _one_line(text[:1].lower() + text[1:]) if text else "bad command line"


def main(argv: list[str] | None = None) -> None:
    """The ``segflow`` command: usage errors are one line ``segflow: error: ...`` (exit 2),
    like every other error; a command's own errors come through :func:`clean_errors`."""
    from typer.exceptions import TyperException

    configure()  # before any command imports PyTorch
    _register()
    command = typer.main.get_command(app)
    try:
        code = command.main(
            args=sys.argv[1:] if argv is None else argv,
            prog_name="segflow",
            standalone_mode=False,
        )
    except TyperException as exc:
        if type(exc).__name__ != "NoArgsIsHelpError":  # the help was shown already
            typer.echo(f"segflow: error: {usage_line(exc)}", err=True)
        sys.exit(int(getattr(exc, "exit_code", ExitCode.USAGE)))
    except (KeyboardInterrupt, click.exceptions.Abort):
        typer.echo("segflow: interrupted", err=True)
        sys.exit(130)
    sys.exit(int(code or 0))


if __name__ == "__main__":  # pragma: no cover
    main()
