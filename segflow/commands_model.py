"""``segflow geometry`` and ``segflow model``: the network's shape arithmetic and checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from segflow.app import app
from segflow.errors import clean_errors
from segflow.options import parse_shape
from segflow.output import emit, output_options

model_app = typer.Typer(
    help="Create and inspect model checkpoints.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(model_app, name="model")


@app.command()
@clean_errors
@output_options
def geometry(
    tile: Annotated[str, typer.Argument(help="Desired input tile shape, e.g. 572,572.")],
    depth: Annotated[int, typer.Option(help="Poolings.")] = 4,
    padding: Annotated[str, typer.Option(help="valid or same.")] = "valid",
) -> None:
    """Print the valid input tile nearest to TILE, its output shape and the context."""
    from unet_core import UNetConfig

    shape = parse_shape(tile, "tile") or ()
    if padding not in ("valid", "same"):
        raise typer.BadParameter("padding must be 'valid' or 'same'")
    pad: Literal["valid", "same"] = "valid" if padding == "valid" else "same"
    config = UNetConfig(ndim=2 if len(shape) == 2 else 3, depth=depth, padding=pad)
    valid = config.valid_input_shape(shape)
    emit(
        {
            "requested": list(shape),
            "input": list(valid),
            "output": list(config.output_shape(valid)),
            "context": config.context,
            "grid": config.grid,
        }
    )


@model_app.command("create")
@clean_errors
@output_options
def create(
    out: Annotated[Path, typer.Argument(help="Checkpoint file to write.")],
    ndim: Annotated[int, typer.Option(help="2 or 3.")] = 2,
    in_channels: Annotated[int, typer.Option()] = 1,
    n_classes: Annotated[int, typer.Option()] = 2,
    depth: Annotated[int, typer.Option()] = 4,
    base_channels: Annotated[int, typer.Option()] = 64,
    padding: Annotated[str, typer.Option()] = "valid",
    norm: Annotated[str, typer.Option()] = "none",
    seed: Annotated[int, typer.Option()] = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a segflow checkpoint already at OUT (never any other file).",
        ),
    ] = False,
) -> None:
    """Write an untrained (randomly initialised) model, e.g. for trying out the pipeline."""
    import torch

    from tasks.outputs import check_file_target

    check_file_target(str(out), "checkpoint", overwrite=overwrite, what="checkpoint")

    from unet_core import CheckpointMeta, UNet, UNetConfig, save_checkpoint

    config = UNetConfig.model_validate(
        {
            "ndim": ndim,
            "in_channels": in_channels,
            "n_classes": n_classes,
            "depth": depth,
            "base_channels": base_channels,
            "padding": padding,
            "norm": norm,
        }
    )
    torch.manual_seed(seed)
    digest = save_checkpoint(out, UNet(config), CheckpointMeta())
    emit({"checkpoint": str(out), "digest": digest}, f"wrote {out} (digest {digest[:12]})")


@model_app.command("info")
@clean_errors
@output_options
def info(ckpt: Annotated[Path, typer.Argument(help="Checkpoint file.")]) -> None:
    """Print a checkpoint's config and metadata (verifies its digest)."""
    from unet_core import read_checkpoint_header

    config, meta = read_checkpoint_header(ckpt)
    emit(
        {
            "config": config.model_dump(),
            "context": config.context,
            "meta": meta.model_dump(mode="json"),
        }
    )
