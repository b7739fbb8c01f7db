"""The ``segflow`` command.

Each group of commands lives in its own module (``segflow/commands_*.py``) and registers
itself on :data:`app`. Heavy imports (torch, dask, prefect) happen inside the commands so
that ``segflow --help`` is quick. Errors segflow raises on purpose are printed as one line
on stderr and exit with status 1; nothing else is swallowed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, ParamSpec, TypeVar

import typer

from unet_core.errors import SegflowError

app = typer.Typer(
    name="segflow",
    help="Exact overlap-tile U-Net segmentation of very large microscopy volumes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

P = ParamSpec("P")
R = TypeVar("R")


def clean_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`SegflowError` into one line on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SegflowError as exc:
            typer.echo(f"segflow: error: {exc}", err=True)
            raise typer.Exit(1) from None

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
    ):
        try:
            __import__(f"segflow.{name}")
        except ModuleNotFoundError as exc:  # a command group not built yet
            if exc.name != f"segflow.{name}":
                raise


def main() -> None:
    _register()
    app(prog_name="segflow")


if __name__ == "__main__":  # pragma: no cover
    main()
