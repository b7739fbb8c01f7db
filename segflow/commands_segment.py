"""``segflow segment``: run the pipeline on one image (an OME-Zarr image, or a TIFF that is
ingested first) — a thin door over :func:`tasks.pipeline.run`; its options are generated
from the same models as the ``segment-volume`` flow's parameters (:mod:`segflow.options`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.app import app
from segflow.errors import clean_errors
from segflow.options import EXTRAS, PANELS, RUN_MODELS, with_models
from segflow.output import emit, output_options, warn
from segflow.progress import BlockProgress
from tasks.cluster import ClusterSpec
from tasks.options import PipelineOptions

if TYPE_CHECKING:
    from tasks.pipeline import Result


@app.command()
@clean_errors
@output_options
@with_models(*RUN_MODELS, extras=EXTRAS, panels=PANELS)
def segment(
    src: Annotated[str, typer.Argument(help="OME-Zarr image (path or s3:// URL), or a TIFF.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint file.")],
    out: Annotated[
        str | None,
        typer.Option(
            help="Write the outputs to this store instead of SRC's labels/ (a TIFF source is "
            "ingested into it)."
        ),
    ] = None,
    *,
    options: PipelineOptions,
    cluster: ClusterSpec,
) -> None:
    """Segment SRC with MODEL; masks land in SRC's labels/ group (or in --out)."""
    from tasks import pipeline

    request = pipeline.Request(str(src), str(model), out, options)
    pipeline.check(request, local=cluster.kind == "local")
    with BlockProgress() as progress:
        result = pipeline.run(request, cluster=cluster, progress=progress, checked=True)
    for message in result.warnings:
        warn(message)
    summary = segment_summary(result)
    emit(summary, segment_text(result, summary))


def segment_summary(result: Result) -> dict[str, Any]:
    """The JSON summary of a run: rates and class counts only for work this run did
    (``null`` when it reused every block)."""
    seg = result.segment
    computed = seg.blocks_computed > 0
    summary: dict[str, Any] = {
        "out": seg.out_url,
        "labels": seg.labels_path + "/0",
        "probabilities": seg.probabilities_path,
        "blocks_total": seg.blocks_total,
        "blocks_computed": seg.blocks_computed,
        "blocks_skipped": seg.blocks_skipped,
        "seconds": round(seg.seconds, 3),
        "voxels_per_second": round(seg.voxels_per_second, 1) if computed else None,
        "class_voxels": seg.class_voxels or None,
    }
    if result.instances is not None:
        summary["stitch"] = {k: v for k, v in result.instances.items() if k != "table"}
    summary["preview"] = result.preview
    summary["napari"] = napari_command(seg.out_url)
    return summary


def segment_text(result: Result, summary: dict[str, Any]) -> str:
    """The human summary of a run: where the labels are, what was done."""
    from segflow.commands_stitch import stitch_text

    seg = result.segment
    if seg.blocks_computed == 0:
        what = f"{seg.blocks_total} of {seg.blocks_total} blocks reused from an earlier run"
    else:
        what = (
            f"{seg.blocks_computed} block{'s' * (seg.blocks_computed != 1)} computed"
            + (f", {seg.blocks_skipped} reused" if seg.blocks_skipped else "")
            + f", {seg.voxels_per_second / 1e6:.2f} Mvox/s in {seg.compute_seconds:.1f} s"
        )
    lines = [f"labels: {seg.out_url}/{seg.labels_path}/0 ({what})"]
    if summary.get("stitch") is not None:
        lines.append(stitch_text(summary["stitch"]))
    if summary.get("preview"):
        lines.append(f"preview: {summary['preview']}")
    if summary.get("napari"):
        lines.append(f"view: {summary['napari']}")
    return "\n".join(lines)


def napari_command(store: str) -> str | None:
    """How to open ``store`` in napari, when napari and its OME-Zarr reader are installed."""
    from importlib.util import find_spec

    if find_spec("napari") is None or find_spec("napari_ome_zarr") is None:
        return None
    import shlex

    return f"napari --plugin napari-ome-zarr {shlex.quote(store)}"
