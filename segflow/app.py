"""The ``segflow`` Typer application, its global options and the state a command's run
shares (``--debug``, ``-q``, ``--json``). Commands register themselves on :data:`app` from
their modules (``segflow/commands_*.py``); :mod:`segflow.cli` is the entry point."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

#: Environment variable that turns on tracebacks like ``--debug``.
DEBUG_ENV = "SEGFLOW_DEBUG"

app = typer.Typer(
    name="segflow",
    help="Exact overlap-tile U-Net segmentation of very large microscopy volumes.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
    pretty_exceptions_enable=False,
)

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
