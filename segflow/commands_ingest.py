"""``segflow ingest``: stream a TIFF volume into a chunked OME-Zarr image."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from segflow.app import app
from segflow.errors import clean_errors
from segflow.options import EXTRAS, PANELS, with_models
from segflow.output import emit, output_options, warn
from segflow.progress import BlockProgress
from tasks.cluster import ClusterSpec
from tasks.options import IngestParams, RunOptions


@app.command()
@clean_errors
@output_options
@with_models(
    ("params", IngestParams),
    ("run", RunOptions),
    ("cluster", ClusterSpec),
    exclude=("force", "preview"),
    extras=EXTRAS,
    panels=PANELS,
)
def ingest(
    src: Annotated[
        str,
        typer.Argument(
            help="A TIFF / BigTIFF / OME-TIFF file, or a folder or glob of 2D TIFF slices "
            "(natural order); local or s3://."
        ),
    ],
    dst: Annotated[str, typer.Argument(help="The OME-Zarr image to write; local or s3://.")],
    scheduler: Annotated[
        str,
        typer.Option(help="Where units run: threads, sync, or a Dask scheduler address."),
    ] = "threads",
    *,
    params: IngestParams,
    run: RunOptions,
    cluster: ClusterSpec,
) -> None:
    """Stream SRC into a chunked, compressed OME-Zarr image (zarr v3, NGFF 0.5) at DST.

    Never holds the whole volume in memory; computes global intensity statistics on the
    way; a re-run resumes an interrupted ingest and skips what is already written.
    """
    from tasks.ingest import ingest_volume

    local = cluster.kind == "local"  # then --scheduler says how
    with BlockProgress() as progress:
        info = ingest_volume(
            src,
            dst,
            chunks=params.chunks,
            axes=params.axes,
            compression=params.compression,
            levels=params.levels,
            overwrite=run.overwrite,
            scheduler=scheduler if local else cluster,
            progress=progress,
            lease_wait_s=run.lease_wait_s,
            voxel_size=params.voxel_size,
            unit_mib=params.unit_mib,
            workers=cluster.workers if local else None,
            allow_sparse=params.allow_sparse,
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
