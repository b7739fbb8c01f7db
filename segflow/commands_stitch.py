"""``segflow stitch`` and ``segflow export``: instances across chunk faces, TIFF export."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.cli import app, clean_errors, cluster_options, emit, output_options
from segflow.progress import BlockProgress

if TYPE_CHECKING:
    from tasks.cluster import ClusterSpec

METHOD_HELP = (
    "components (3D connected components) or slices (2D objects linked across slices by "
    "overlap); default: slices for a stack segmented by a 2D model, else components."
)
LINK_IOU_HELP = "With slices: IoU that links objects of consecutive slices (default: the model's)."


def run_stitch(
    store: str,
    labels: str,
    name: str,
    min_size: int | None,
    connectivity: int,
    foreground: int | None,
    cluster: ClusterSpec | None,
    client: Any = None,
    method: str | None = None,
    link_iou: float | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    from tasks.stitch import stitch

    result = stitch(
        store,
        labels=labels,
        out_name=name,
        foreground=None if foreground is None else (foreground,),
        connectivity=connectivity,
        min_size=min_size,
        cluster=cluster,
        client=client,
        method=method,
        link_iou=link_iou,
        progress=progress,
    )
    return {
        "instances": f"{result.store}/{result.labels_path}",
        "method": result.method,
        "objects": result.objects,
        "dtype": result.dtype,
        "table_csv": result.table_csv,
        "table_parquet": result.table_parquet,
        "seconds": round(result.seconds, 3),
        "reused": result.reused,
    }


def stitch_text(summary: dict[str, Any]) -> str:
    """The human summary of a stitch."""
    how = "reused from an earlier run" if summary["reused"] else f"{summary['seconds']:.1f} s"
    return (
        f"instances: {summary['instances']} ({summary['objects']} objects, {summary['dtype']}, "
        f"{summary['method']}, {how})\nobjects table: {summary['table_csv']}"
    )


@app.command()
@clean_errors
@output_options
@cluster_options
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
    instance_method: Annotated[str | None, typer.Option(help=METHOD_HELP)] = None,
    link_iou: Annotated[float | None, typer.Option(min=0.0, max=1.0, help=LINK_IOU_HELP)] = None,
) -> None:
    """Objects of a semantic mask with global ids across chunks: connected components, or
    for a stack segmented slice by slice, slice objects linked by overlap."""
    from tasks.paths import split_labels_path

    store, named = split_labels_path(store, labels)
    with BlockProgress() as progress:
        summary = run_stitch(
            store,
            named or "semantic",
            name,
            min_size,
            connectivity,
            foreground,
            cluster,
            method=instance_method,
            link_iou=link_iou,
            progress=progress,
        )
    emit(summary, stitch_text(summary))


@app.command()
@clean_errors
@output_options
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
) -> None:
    """Stream a label image (or the image) into a BigTIFF / OME-TIFF with physical sizes."""
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
    )
    emit({"tiff": str(out)}, f"wrote {out}")
