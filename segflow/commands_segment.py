"""``segflow segment``: run the U-Net over an OME-Zarr image (or a TIFF, ingested first)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.cli import LeaseWait, app, clean_errors, cluster_options, parse_shape
from segflow.commands_stitch import LINK_IOU_HELP, METHOD_HELP
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
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary.")] = False,
    lease_wait: LeaseWait = 0.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
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

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("distributed", "tornado", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
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
    with BlockProgress(quiet=quiet or as_json) as progress:
        result = segment_image(
            image,
            str(model),
            out=out,
            params=params,
            cluster=cluster,
            force=force,
            progress=progress,
            lease_wait_s=lease_wait,
            plan=plan,
        )
    summary: dict[str, Any] = {
        "out": result.out_url,
        "labels": result.labels_path + "/0",
        "probabilities": result.probabilities_path,
        "blocks_total": result.blocks_total,
        "blocks_computed": result.blocks_computed,
        "blocks_skipped": result.blocks_skipped,
        "seconds": round(result.seconds, 3),
        "voxels_per_second": round(result.voxels_per_second, 1),
        "class_voxels": result.class_voxels,
    }
    if instances:
        from segflow.commands_stitch import run_stitch

        summary["stitch"] = run_stitch(
            result.out_url,
            labels_name,
            "instances",
            min_size,
            connectivity,
            None,
            cluster,
            method=instance_method,
            link_iou=link_iou,
        )
    shown = "instances" if instances else labels_name
    summary["preview"] = write_preview_or_warn(image, result.out_url, shown) if preview else None
    summary["napari"] = napari_command(result.out_url)
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        typer.echo(
            f"labels: {result.out_url}/{result.labels_path}/0 "
            f"({result.blocks_computed} blocks computed, {result.blocks_skipped} already done, "
            f"{result.voxels_per_second / 1e6:.2f} Mvox/s)"
        )
        if instances:
            st = summary["stitch"]
            typer.echo(
                f"instances: {st['instances']} ({st['objects']} objects, {st['dtype']}, "
                f"{st['method']})"
            )
            typer.echo(f"objects table: {st['table_csv']}")
        if summary["preview"]:
            typer.echo(f"preview: {summary['preview']}")
        if summary["napari"]:
            typer.echo(f"view: {summary['napari']}")


def write_preview_or_warn(image: str, store: str, labels: str) -> str | None:
    """The preview PNG beside ``store`` (:func:`tasks.report.write_preview`, the one the
    flow writes); a preview that cannot be made is a warning, never a failed run."""
    from segflow.cli import describe_error
    from tasks.report import write_preview

    try:
        return write_preview(image, store, labels)
    except Exception as exc:
        typer.echo(f"segflow: warning: no preview: {describe_error(exc, store)[0]}", err=True)
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
    info = ingest_volume(src, out or store_beside(src), refresh=True)
    return str(info.url)
