"""``segflow stitch`` and ``segflow export``: instances across chunk faces, TIFF export."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from segflow.app import app
from segflow.errors import clean_errors
from segflow.options import EXTRAS, PANELS, with_models
from segflow.output import emit, output_options
from segflow.progress import BlockProgress
from tasks import pipeline
from tasks.cluster import ClusterSpec
from tasks.options import InstanceOptions, RunOptions
from tasks.pipeline import INSTANCES


def stitch_text(summary: dict[str, Any]) -> str:
    """The human summary of a stitch."""
    how = "reused from an earlier run" if summary["reused"] else f"{summary['seconds']:.1f} s"
    size = f"{summary['min_size']} {summary['min_size_unit']}"
    whose = "the model's suggestion" if summary["min_size_from"] == "model" else "--min-size"
    return (
        f"instances: {summary['instances']} ({summary['objects']} objects, {summary['dtype']}, "
        f"{summary['method']}, {how})\n"
        f"minimum size: {size} ({whose}); {summary['removed']} smaller objects removed\n"
        f"objects table: {summary['table_csv']}"
    )


@app.command()
@clean_errors
@output_options
@with_models(
    ("options", InstanceOptions),
    ("cluster", ClusterSpec),
    exclude=("instances",),
    extras=EXTRAS,
    panels=PANELS,
)
def stitch(
    store: Annotated[
        str,
        typer.Argument(
            help="Store holding labels/<NAME> (path or s3://), or the labels' path as segment "
            "prints it (STORE/labels/NAME/0)."
        ),
    ],
    labels: Annotated[
        str | None, typer.Option(help="Semantic label image to read (default: semantic).")
    ] = None,
    name: Annotated[str, typer.Option(help="Name of the instance label image.")] = INSTANCES,
    foreground: Annotated[
        int | None, typer.Option(help="Class id to split into objects (default: the model's).")
    ] = None,
    *,
    options: InstanceOptions,
    cluster: ClusterSpec,
) -> None:
    """Objects of a semantic mask with global ids across chunks: connected components, or
    for a stack segmented slice by slice, slice objects linked by overlap."""
    from tasks.paths import split_labels_path

    store, named = split_labels_path(store, labels)
    with BlockProgress() as progress:
        summary = pipeline.instances(
            store,
            named or "semantic",
            options,
            cluster=cluster,
            progress=progress,
            foreground=foreground,
            name=name,
        )
    summary.pop("table")
    emit(summary, stitch_text(summary))


@app.command()
@clean_errors
@output_options
@with_models(("run", RunOptions), exclude=("force", "lease_wait_s", "preview"))
def export(
    store: Annotated[
        str,
        typer.Argument(help="OME-Zarr store, or a label image's path STORE/labels/NAME/0."),
    ],
    to: Annotated[str, typer.Option("--to", help="Output .tif (BigTIFF, OME metadata).")],
    labels: Annotated[
        str | None,
        typer.Option(help="Label image to export (default: instances; omit with --image)."),
    ] = None,
    image: Annotated[bool, typer.Option("--image", help="Export the image itself.")] = False,
    compression: Annotated[str, typer.Option(help="zlib, zstd, lzw or none.")] = "zlib",
    *,
    run: RunOptions,
) -> None:
    """Stream a label image (or the image) into a BigTIFF / OME-TIFF with physical sizes.

    TO is never a file of the store or an input it came from, and a file there is replaced
    only with --overwrite and only when segflow wrote it."""
    from tasks.export import export_tiff
    from tasks.paths import split_labels_path

    store, named = split_labels_path(store, labels)
    if image and named:
        raise typer.BadParameter(f"--image exports the image itself, not the labels '{named}'")
    out = export_tiff(
        store,
        to,
        labels=None if image else named or "instances",
        compression=None if compression == "none" else compression,
        overwrite=run.overwrite,
    )
    emit({"tiff": str(out)}, f"wrote {out}")
