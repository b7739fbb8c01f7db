"""The ``segflow`` command.

Each group of commands lives in its own module (``segflow/commands_*.py``) and registers
itself on :data:`app`. Heavy imports (torch, dask, prefect) happen inside the commands so
that ``segflow --help`` is quick. Errors segflow raises on purpose are printed as one line
on stderr and exit with status 1; nothing else is swallowed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Annotated, ParamSpec, TypeVar

import typer

from unet_core.errors import SegflowError
from unet_core.runtime import configure

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
    configure()  # before any command imports PyTorch
    _register()
    app(prog_name="segflow")


if __name__ == "__main__":  # pragma: no cover
    main()
