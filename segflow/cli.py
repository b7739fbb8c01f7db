"""The ``segflow`` command: its entry point (:func:`main`) and the examples under each
command's ``--help``.

Each group of commands lives in its own module (``segflow/commands_*.py``) and registers
itself on :data:`segflow.app.app`; heavy imports (torch, dask, prefect) happen inside the
commands so that ``segflow --help`` is quick. The shared parts: :mod:`segflow.app` (the
application and its global options), :mod:`segflow.errors` (the error boundary and exit
statuses), :mod:`segflow.output` (quiet, JSON, log levels) and :mod:`segflow.options`
(options generated from the pydantic models the flows share).
"""

from __future__ import annotations

import sys
from typing import Any

import click
import typer
import typer.main

from segflow.app import app
from segflow.errors import ExitCode, usage_line
from segflow.help import HELP_ALL, compact_help, help_request
from unet_core.runtime import configure

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


#: The options every command shares (:mod:`segflow.output`): given before the command
#: (``segflow -q segment ...``) they mean the same as after it.
SHARED_FLAGS = ("-q", "--quiet", "--json", "-v", "-vv", "-vvv", "--verbose")
SHARED_WITH_VALUE = ("--log-level",)


def hoist_shared_options(argv: list[str], command: Any) -> list[str]:
    """``argv`` with the shared output options written before the command moved after it
    (``segflow -q segment x`` -> ``segflow segment -q x``); other options stay."""
    front: list[str] = []
    moved: list[str] = []
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        word = argv[i]
        if word in SHARED_FLAGS or word.startswith("--log-level="):
            moved.append(word)
        elif word in SHARED_WITH_VALUE and i + 1 < len(argv):
            moved += argv[i : i + 2]
            i += 1
        else:
            front.append(word)
        i += 1
    if not moved:
        return argv
    path: list[str] = []
    group = command
    while i < len(argv) and argv[i] in getattr(group, "commands", {}):
        group = group.commands[argv[i]]
        path.append(argv[i])
        i += 1
    if not path or hasattr(group, "commands"):
        return argv  # no command to give them to: leave the line as it was written
    return [*front, *path, *moved, *argv[i:]]


def main(argv: list[str] | None = None) -> None:
    """The ``segflow`` command: usage errors are one line ``segflow: error: ...`` (exit 2),
    like every other error; a command's own errors come through :func:`clean_errors`."""
    from typer.exceptions import TyperException

    configure()  # before any command imports PyTorch
    _register()
    command = typer.main.get_command(app)
    args = hoist_shared_options(list(sys.argv[1:] if argv is None else argv), command)
    asked = help_request(args, command)
    if asked is not None:
        path, chosen, full = asked
        if not full:
            typer.echo(compact_help(chosen, path))
            sys.exit(0)
        args = ["--help" if a == HELP_ALL else a for a in args]
    try:
        code = command.main(
            args=args,
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
