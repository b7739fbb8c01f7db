"""``segflow segment``: run the U-Net over an OME-Zarr image (or a TIFF, ingested first)."""

from __future__ import annotations

from pathlib import Path
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
from segflow.commands_stitch import LINK_IOU_HELP, METHOD_HELP, stitch_text
from segflow.progress import BlockProgress

if TYPE_CHECKING:
    from tasks.cluster import ClusterSpec


#: ``--min-size`` and ``--connectivity`` of the commands that label objects with --instances.
InstanceMinSize = Annotated[
    int | None,
    typer.Option(help="With --instances: drop smaller objects (default: from the model)."),
]
InstanceConnectivity = Annotated[
    int, typer.Option(min=1, max=3, help="With --instances: 1 faces, 2 edges, 3 corners.")
]


@app.command()
@clean_errors
@output_options
@cluster_options
def segment(
    src: Annotated[str, typer.Argument(help="OME-Zarr image (path or s3:// URL), or a TIFF.")],
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint file.")],
    out: Annotated[
        str | None, typer.Option(help="Write outputs to this store instead of SRC's labels/.")
    ] = None,
    chunks: Annotated[str | None, typer.Option(help="Output chunks, e.g. 64,128,128.")] = None,
    tile: Annotated[
        str | None,
        typer.Option(
            help="Largest tile input shape, e.g. 64,128,128 (default: per model). For a 2D "
            "model on a stack, the in-plane Y,X (e.g. 572,572) or 1,Y,X."
        ),
    ] = None,
    device: Annotated[
        str, typer.Option(help="auto (CUDA when present), cpu or cuda; checked before any work.")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Tiles per forward pass.")] = 4,
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16.")] = "auto",
    fast: Annotated[
        bool,
        typer.Option(
            "--fast",
            help="Tiles planned per block: fewest voxels for the chunks, but the last bits "
            "of the result depend on the chunking (default: the same bits for any chunking).",
        ),
    ] = False,
    reference: Annotated[
        bool,
        typer.Option(
            "--reference",
            help="Bitwise equal to one pass over the whole volume (PyTorch's own CPU "
            "kernels; several times slower). The oracle the default mode is tested against.",
        ),
    ] = False,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write class probabilities.")
    ] = False,
    probabilities_dtype: Annotated[str, typer.Option(help="float16 or float32.")] = "float16",
    channel: Annotated[int | None, typer.Option(help="Use only this channel.")] = None,
    labels_name: Annotated[str, typer.Option(help="Name under labels/.")] = "semantic",
    force: Annotated[bool, typer.Option("--force", help="Recompute finished blocks.")] = False,
    instances: Annotated[
        bool, typer.Option("--instances", help="Then label objects across chunks (stitch).")
    ] = False,
    min_size: InstanceMinSize = None,
    connectivity: InstanceConnectivity = 1,
    instance_method: Annotated[str | None, typer.Option(help=METHOD_HELP)] = None,
    link_iou: Annotated[float | None, typer.Option(min=0.0, max=1.0, help=LINK_IOU_HELP)] = None,
    preview: Annotated[
        bool,
        typer.Option(
            "--preview/--no-preview",
            help="Write <store>.preview.png beside the store: orthogonal middle slices with "
            "the labels outlined (and an object-size histogram with --instances).",
        ),
    ] = True,
    lease_wait: LeaseWait = 0.0,
    cluster: ClusterSpec | None = None,
) -> None:
    """Segment SRC with MODEL; masks land in SRC's labels/ group (or in --out)."""
    from tasks.paths import is_tiff_name, store_beside
    from tasks.segment import (
        SegmentParams,
        check_segment_inputs,
        plan_segmentation,
        segment_image,
    )
    from unet_core.predict import check_device

    if fast and reference:
        raise typer.BadParameter("--fast and --reference exclude each other; pick one")
    local = cluster is None or cluster.kind == "local"
    check_device(device, indexed=False, here=local)

    params = SegmentParams.model_validate(
        {
            "chunks": parse_shape(chunks, "chunks"),
            "tile": parse_shape(tile, "tile"),
            "device": device,
            "batch_size": batch_size,
            "precision": precision,
            "mode": "fast" if fast else "reference" if reference else "invariant",
            "probabilities": probabilities,
            "probabilities_dtype": probabilities_dtype,
            "channel": channel,
            "labels_name": labels_name,
        }
    )
    ingest_to = (out or store_beside(src)) if is_tiff_name(src) else None
    check_segment_inputs(src, str(model), out, params, lease_wait, ingest_to, local)
    image = _ensure_zarr(src, out)
    plan = plan_segmentation(image, str(model), out, params)
    from tasks.cluster import dask_client

    # One cluster for the command: the segmentation and, with --instances, the stitch.
    with BlockProgress() as progress, dask_client(cluster=cluster, device=plan.params.device) as c:
        result = segment_image(
            image,
            str(model),
            out=out,
            params=params,
            client=c,
            force=force,
            progress=progress,
            lease_wait_s=lease_wait,
            plan=plan,
        )
        stitched = None
        if instances:
            from segflow.commands_stitch import run_stitch

            stitched = run_stitch(
                result.out_url,
                labels_name,
                "instances",
                min_size,
                connectivity,
                None,
                cluster,
                client=c,
                method=instance_method,
                link_iou=link_iou,
                progress=progress,
            )
    summary = segment_summary(result)
    if stitched is not None:
        summary["stitch"] = stitched
    shown = "instances" if instances else labels_name
    summary["preview"] = write_preview_or_warn(image, result.out_url, shown) if preview else None
    summary["napari"] = napari_command(result.out_url)
    emit(summary, segment_text(result, stitched, summary))


def segment_summary(result: Any) -> dict[str, Any]:
    """The JSON summary of a segmentation (a :class:`tasks.segment.SegmentResult`): rates
    and class counts only for work this run did (``null`` when it reused every block)."""
    computed = result.blocks_computed > 0
    return {
        "out": result.out_url,
        "labels": result.labels_path + "/0",
        "probabilities": result.probabilities_path,
        "blocks_total": result.blocks_total,
        "blocks_computed": result.blocks_computed,
        "blocks_skipped": result.blocks_skipped,
        "seconds": round(result.seconds, 3),
        "voxels_per_second": round(result.voxels_per_second, 1) if computed else None,
        "class_voxels": result.class_voxels or None,
    }


def segment_text(result: Any, stitched: dict[str, Any] | None, extra: dict[str, Any]) -> str:
    """The human summary of a segmentation: where the labels are, what was done."""
    if result.blocks_computed == 0:
        what = f"{result.blocks_total} of {result.blocks_total} blocks reused from an earlier run"
    else:
        what = (
            f"{result.blocks_computed} block{'s' * (result.blocks_computed != 1)} computed"
            + (f", {result.blocks_skipped} reused" if result.blocks_skipped else "")
            + f", {result.voxels_per_second / 1e6:.2f} Mvox/s in {result.compute_seconds:.1f} s"
        )
    lines = [f"labels: {result.out_url}/{result.labels_path}/0 ({what})"]
    if stitched is not None:
        lines.append(stitch_text(stitched))
    if extra.get("preview"):
        lines.append(f"preview: {extra['preview']}")
    if extra.get("napari"):
        lines.append(f"view: {extra['napari']}")
    return "\n".join(lines)


def write_preview_or_warn(image: str, store: str, labels: str) -> str | None:
    """The preview PNG beside ``store`` (:func:`tasks.report.write_preview`, the one the
    flow writes); a preview that cannot be made is a warning, never a failed run."""
    from segflow.cli import describe_error
    from tasks.report import write_preview

    try:
        return write_preview(image, store, labels)
    except Exception as exc:
        warn(f"no preview: {describe_error(exc, store)[0]}")
        return None


def napari_command(store: str) -> str | None:
    """How to open ``store`` in napari, when napari and its OME-Zarr reader are installed."""
    from importlib.util import find_spec

    if find_spec("napari") is None or find_spec("napari_ome_zarr") is None:
        return None
    import shlex

    return f"napari --plugin napari-ome-zarr {shlex.quote(store)}"


def _ensure_zarr(src: str, out: str | None) -> str:
    """A TIFF source is ingested first (next to it, or into --out); zarr passes through."""
    from tasks.ingest import ingest_volume
    from tasks.paths import is_tiff_name, store_beside

    if not is_tiff_name(src):
        return src
    # A store made earlier from this TIFF is ingested again if the file changed since.
    with BlockProgress() as progress:
        info = ingest_volume(src, out or store_beside(src), refresh=True, progress=progress)
    return str(info.url)
