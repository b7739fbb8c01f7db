"""``segflow stitch`` and ``segflow export``: instances across chunk faces, TIFF export."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.cli import app, clean_errors, cluster_options

if TYPE_CHECKING:
    from tasks.cluster import ClusterSpec


def run_stitch(
    store: str,
    labels: str,
    name: str,
    min_size: int | None,
    connectivity: int,
    foreground: int | None,
    cluster: ClusterSpec | None,
    client: Any = None,
) -> dict[str, Any]:
    from tasks.stitch import stitch

    for noisy in ("distributed", "tornado"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    result = stitch(
        store,
        labels=labels,
        out_name=name,
        foreground=None if foreground is None else (foreground,),
        connectivity=connectivity,
        min_size=min_size,
        cluster=cluster,
        client=client,
    )
    return {
        "instances": f"{result.store}/{result.labels_path}",
        "objects": result.objects,
        "dtype": result.dtype,
        "table_csv": result.table_csv,
        "table_parquet": result.table_parquet,
        "seconds": round(result.seconds, 3),
    }


@app.command()
@clean_errors
@cluster_options
def stitch(
    store: Annotated[str, typer.Argument(help="Store holding labels/<NAME> (path or s3://).")],
    labels: Annotated[str, typer.Option(help="Semantic label image to read.")] = "semantic",
    name: Annotated[str, typer.Option(help="Name of the instance label image.")] = "instances",
    min_size: Annotated[
        int | None,
        typer.Option(help="Drop smaller objects (default: the model's suggestion, else 0)."),
    ] = None,
    connectivity: Annotated[
        int, typer.Option(min=1, max=3, help="1 = faces, 2 = +edges, 3 = +corners.")
    ] = 1,
    foreground: Annotated[
        int | None, typer.Option(help="Class id to split into objects (default: the model's).")
    ] = None,
    cluster: ClusterSpec | None = None,
) -> None:
    """Connected components of a semantic mask, with global ids across chunk faces."""
    summary = run_stitch(store, labels, name, min_size, connectivity, foreground, cluster)
    typer.echo(json.dumps(summary))


@app.command()
@clean_errors
def export(
    store: Annotated[str, typer.Argument(help="OME-Zarr store.")],
    to: Annotated[str, typer.Option("--to", help="Output .tif (BigTIFF, OME metadata).")],
    labels: Annotated[
        str | None, typer.Option(help="Label image to export (omit with --image).")
    ] = "instances",
    image: Annotated[bool, typer.Option("--image", help="Export the image itself.")] = False,
    compression: Annotated[str, typer.Option(help="zlib, zstd, lzw or none.")] = "zlib",
) -> None:
    """Stream a label image (or the image) into a BigTIFF / OME-TIFF with physical sizes."""
    from tasks.export import export_tiff

    out = export_tiff(
        store,
        to,
        labels=None if image else labels,
        compression=None if compression == "none" else compression,
    )
    typer.echo(f"wrote {out}")
