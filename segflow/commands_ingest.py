"""``segflow ingest``: stream a TIFF volume into a chunked OME-Zarr image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.cli import (
    LeaseWait,
    app,
    clean_errors,
    cluster_options,
    emit,
    output_options,
    parse_shape,
    warn,
)
from segflow.progress import BlockProgress

if TYPE_CHECKING:
    from tasks.cluster import ClusterSpec


def _parse_floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{what} must be numbers separated by commas, got {text!r}"
        ) from None
    return values


@app.command()
@clean_errors
@output_options
@cluster_options
def ingest(
    src: Annotated[
        str,
        typer.Argument(
            help="A TIFF / BigTIFF / OME-TIFF file, or a folder or glob of 2D TIFF slices "
            "(natural order); local or s3://."
        ),
    ],
    dst: Annotated[str, typer.Argument(help="The OME-Zarr image to write; local or s3://.")],
    chunks: Annotated[
        str | None,
        typer.Option(help="Chunk shape Z,Y,X (or Y,X); default 64,128,128 (3D), 1024,1024 (2D)."),
    ] = None,
    axes: Annotated[
        str | None,
        typer.Option(
            help="Axes of SRC as tifffile shapes it, e.g. zyx, zcyx, yxc; overrides the "
            "metadata and is needed when it is ambiguous."
        ),
    ] = None,
    compression: Annotated[str, typer.Option(help="zstd, blosc or none.")] = "zstd",
    levels: Annotated[int, typer.Option(min=0, help="Downsampled pyramid levels to add.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a DST that holds other data.")
    ] = False,
    voxel_size: Annotated[
        str | None,
        typer.Option(help="Physical voxel size Z,Y,X (or Y,X) in micrometres; overrides metadata."),
    ] = None,
    scheduler: Annotated[
        str,
        typer.Option(help="Where units run: threads, sync, or a Dask scheduler address."),
    ] = "threads",
    unit_mib: Annotated[
        float, typer.Option(help="Most MiB of the image one task holds at a time.")
    ] = 8.0,
    lease_wait: LeaseWait = 0.0,
    allow_sparse: Annotated[
        bool,
        typer.Option(
            "--allow-sparse",
            help="Accept a TIFF that declares far more pixels than its file holds.",
        ),
    ] = False,
    cluster: ClusterSpec | None = None,
) -> None:
    """Stream SRC into a chunked, compressed OME-Zarr image (zarr v3, NGFF 0.5) at DST.

    Never holds the whole volume in memory; computes global intensity statistics on the
    way; a re-run resumes an interrupted ingest and skips what is already written.
    """
    from tasks.ingest import ingest_volume

    local = cluster is None or cluster.kind == "local"  # then --scheduler says how
    chunk_shape = parse_shape(chunks, "chunks")
    voxels = _parse_floats(voxel_size, "voxel size")
    with BlockProgress() as progress:
        info = ingest_volume(
            src,
            dst,
            chunks=chunk_shape,
            axes=axes,
            compression=compression,
            levels=levels,
            overwrite=overwrite,
            dask_client_or_scheduler=scheduler if local else cluster,
            progress=progress,
            lease_wait_s=lease_wait,
            voxel_size=voxels,
            unit_mib=unit_mib,
            workers=cluster.workers if cluster and local else None,
            allow_sparse=allow_sparse,
        )
    summary: dict[str, Any] = {
        "dst": info.url,
        "axes": info.axes,
        "shape": list(info.shape),
        "chunks": list(info.chunks),
        "dtype": info.dtype,
        "scale": list(info.scale),
        "unit": info.unit,
    }
    if info.stats is not None:
        summary["stats"] = {
            "min": info.stats.min,
            "max": info.stats.max,
            "mean": info.stats.mean,
            "std": info.stats.std,
            "p1": info.stats.percentile(1.0),
            "p99.8": info.stats.percentile(99.8),
            "nonfinite": info.stats.nonfinite,
        }
        if info.stats.nonfinite:
            warn(
                f"{src}: {info.stats.nonfinite} voxels are NaN or ±Inf "
                "(left out of the statistics; segmented as normalised intensity 0)"
            )
    shape = "×".join(map(str, info.shape))
    chunked = "×".join(map(str, info.chunks))
    emit(summary, f"image: {info.url} ({info.axes} {shape} {info.dtype}, chunks {chunked})")
