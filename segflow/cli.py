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
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Annotated, Any, ParamSpec, TypeVar

import click
import typer
import typer.exceptions

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
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
R = TypeVar("R")
_state = {"debug": False}


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option("--debug", help=f"Print the traceback of an error (or set {DEBUG_ENV}=1)."),
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
    if isinstance(exc, SegflowError):
        cause = getattr(exc, "cause", None)  # an error that wraps another (a failed block)
        if isinstance(cause, BaseException) and not isinstance(cause, SegflowError):
            from tasks.store import translate_storage_error

            err = translate_storage_error(cause, where or "storage")
            return _one_line(str(exc)), err.exit_code if err is not None else exc.exit_code
        if isinstance(cause, SegflowError):
            return _one_line(str(exc)), cause.exit_code
        return _one_line(str(exc)), exc.exit_code
    if type(exc).__name__ == "ValidationError" and hasattr(exc, "errors"):  # pydantic
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ())) or "value"
        return _one_line(f"invalid option {loc}: {first.get('msg', exc)}"), ExitCode.USAGE
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


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Unless debugging, Dask's logs and warnings stay off stderr: a failed task is reported
    once, as the error sentence, not also as a worker's "Compute Failed" traceback."""
    if debug_enabled():
        yield
        return
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


#: ``--lease-wait``: shared by the commands that write a store.
LeaseWait = Annotated[
    float,
    typer.Option(
        "--lease-wait",
        min=0,
        help="Seconds to wait for another run writing the same store, then refuse.",
    ),
]


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


CLUSTER_PANEL = "Cluster: where the Dask workers run"


def _cluster_parameters() -> list[inspect.Parameter]:
    def option(name: str, kind: Any, default: Any, *decls: str, **kw: Any) -> inspect.Parameter:
        info = typer.Option(*decls, rich_help_panel=CLUSTER_PANEL, **kw)
        return inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
        )

    return [
        option(
            "cluster_kind",
            str,
            "local",
            "--cluster",
            "--dask-address",
            help="local (this machine; one worker per GPU with --device cuda), slurm, pbs, "
            "sge or lsf (workers are batch jobs, set up by dask-jobqueue's jobqueue.<kind> "
            "config), or a Dask scheduler address tcp://host:8786 (--dask-address is an "
            "alias).",
        ),
        option(
            "workers",
            int | None,
            None,
            "--workers",
            min=1,
            help="Job clusters: the most worker jobs, scaled between 0 and N (default 4). "
            "Local: worker processes (ingest: parallel tasks).",
        ),
        option("worker_cores", int | None, None, "--worker-cores", min=1, help="Cores per worker."),
        option("worker_memory", str | None, None, "--worker-memory", help="E.g. 16GB per job."),
        option("gpus_per_worker", int, 0, "--gpus-per-worker", min=0, help="GPUs per worker job."),
        option("walltime", str | None, None, "--walltime", help="Job time limit, e.g. 04:00:00."),
        option("queue", str | None, None, "--queue", "--partition", help="Queue / partition."),
        option("account", str | None, None, "--account", help="Account (project) to charge."),
        option(
            "start_timeout_s",
            float,
            600.0,
            "--start-timeout",
            min=1.0,
            help="Seconds to wait for the first worker job before failing.",
        ),
    ]


def cluster_options(fn: Callable[..., R]) -> Callable[..., R]:
    """Give a command the cluster options (``--cluster``, ``--workers``, ...) in place of
    its ``cluster`` parameter, which receives the validated ``ClusterSpec``; a bad value
    is one sentence naming the option (with :func:`clean_errors` outside)."""
    options = _cluster_parameters()
    names = [p.name for p in options]
    own = [
        p.replace(annotation=_evaluate(p.annotation, fn))
        for p in inspect.signature(fn).parameters.values()
        if p.name != "cluster"
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> R:
        from tasks.cluster import cluster_spec

        values = {name: kwargs.pop(name) for name in names if name in kwargs}
        values["kind"] = values.pop("cluster_kind", "local")
        return fn(*args, cluster=cluster_spec(**values), **kwargs)

    params = [*own, *options]
    wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def _evaluate(annotation: Any, fn: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) as its object."""
    if isinstance(annotation, str):
        return eval(annotation, fn.__globals__)  # what inspect.signature(eval_str=True) does
    return annotation


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


def main() -> None:
    configure()  # before any command imports PyTorch
    _register()
    app(prog_name="segflow")


if __name__ == "__main__":  # pragma: no cover
    main()
