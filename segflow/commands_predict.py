"""``segflow predict``: label TIFFs for TIFFs, one command for one file or a whole batch.

Each input goes through the steps the other commands run, with the same task functions
(so the same engine and the same bits): ingest (``segflow ingest``) -> segment
(``segflow segment``) -> instances (``segflow stitch``, with ``--instances``) -> label
OME-TIFF (``segflow export``) -> preview. Outputs follow the inbox convention of the
nightly run (:func:`tasks.paths.nightly_store`): input ``a.tif`` gives

    OUT/a.tif.ome.zarr          the image, its labels (and instances)
    OUT/a.tif.labels.ome.tif    the labels (instance ids with --instances, else class ids)
    OUT/a.tif.preview.png       orthogonal middle slices with the labels outlined

A failed input is reported and the others go on; re-running skips what is complete (the
ingest's unit markers, the segmentation's block markers under the run key, the stitch's
key, the export's record).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from segflow.app import app
from segflow.errors import ExitCode, clean_errors, describe_error
from segflow.options import EXTRAS, PANELS, RUN_MODELS, with_models
from segflow.output import is_quiet, output_options, wants_json, warn
from segflow.progress import BlockProgress, blocks_text
from tasks.cluster import ClusterSpec
from tasks.options import PipelineOptions

if TYPE_CHECKING:
    from tasks.pipeline import Request


@dataclass
class Row:
    """The outcome for one input: ``ok`` or ``failed`` with one sentence."""

    input: str
    status: str = "failed"
    error: str | None = None
    exit_code: int = 0
    store: str | None = None
    labels_tiff: str | None = None
    preview: str | None = None
    blocks_computed: int = 0
    blocks_reused: int = 0
    objects: int | None = None
    reused: bool = False
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def expand_inputs(inputs: list[str]) -> tuple[list[str], list[Row]]:
    """TIFF files named by ``inputs`` (files, folders of TIFFs, globs), in order and once
    each, and a failed row for each input that names none.

    A path that exists is taken as it is (a folder named ``run[2]``); only a path that does
    not exist is expanded as a glob."""
    from tasks.paths import is_tiff_name
    from tasks.tiff import is_glob_pattern, list_tiff_files

    files: list[str] = []
    bad: list[Row] = []
    seen: set[str] = set()

    def fail(name: str, problem: str) -> None:
        bad.append(Row(name, error=f"{name}: {problem}", exit_code=int(ExitCode.BAD_INPUT)))

    for name in inputs:
        if os.path.isdir(name):
            found = list_tiff_files(name)
            if not found:
                fail(name, "this folder holds no TIFF files (.tif, .tiff)")
        elif os.path.exists(name):
            found = [name]
            if not is_tiff_name(name):
                fail(name, "not a TIFF file (predict reads .tif/.tiff files)")
                found = []
        elif is_glob_pattern(name):
            found = [f for f in list_tiff_files(name) if is_tiff_name(f) and os.path.isfile(f)]
            if not found:
                fail(name, "no TIFF file matches this pattern")
        else:
            fail(name, "no such file or folder")
            found = []
        for f in found:
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                files.append(f)
    return files, bad


def predict_one(request: Request, client: Any, cluster: ClusterSpec, quiet: bool) -> Row:
    """The pipeline for one TIFF (:func:`tasks.pipeline.run`); never raises for a bad input."""
    from tasks import pipeline

    t0 = time.perf_counter()
    row = Row(request.source, store=request.out_store)
    try:
        # every input checked before it is ingested (model fits, outputs ours and free)
        pipeline.check(request, local=not cluster.is_job_cluster)
        with BlockProgress(quiet=quiet) as progress:
            result = pipeline.run(
                request, client=client, cluster=cluster, progress=progress, checked=True
            )
        seg = result.segment
        row.blocks_computed, row.blocks_reused = seg.blocks_computed, seg.blocks_skipped
        if result.instances is not None:
            row.objects = int(result.instances["objects"])
        row.labels_tiff, row.preview = result.labels_tiff, result.preview
        row.status, row.reused = "ok", result.reused
        row.warnings = list(result.warnings)
    except Exception as exc:  # one input's failure is its row; the others go on
        message, code = describe_error(exc, request.source)
        row.error, row.exit_code = message, int(code)
    row.seconds = round(time.perf_counter() - t0, 2)
    return row


@app.command()
@clean_errors
@output_options
@with_models(*RUN_MODELS, extras=EXTRAS, panels=PANELS)
def predict(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="TIFF files, folders of TIFFs or quoted globs ('raw/*.tif'); each TIFF is "
            "one volume (or plane).",
            show_default=False,
        ),
    ],
    model: Annotated[Path, typer.Option("--model", "-m", help="Checkpoint file.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")],
    *,
    options: PipelineOptions,
    cluster: ClusterSpec,
) -> None:
    """Label TIFFs for TIFFs: each input is ingested, segmented (with --instances also split
    into objects) and exported as OUT/<name>.labels.ome.tif beside its OUT/<name>.ome.zarr.

    The output folder may not hold, or be, an input (the next run would take the outputs
    for inputs). A failed input does not stop the others; the summary lists each input,
    and the exit status is that of the first failure. Re-running skips inputs already
    complete.
    """
    from tasks.cluster import dask_client
    from tasks.outputs import RunInputs, check_folder_target
    from tasks.paths import nightly_store
    from tasks.pipeline import Request
    from unet_core import read_checkpoint_header
    from unet_core.devices import check_device

    quiet, as_json = is_quiet(), wants_json()
    check_device(options.device, indexed=False, here=not cluster.is_job_cluster)
    read_checkpoint_header(model)  # a missing or unusable model fails before any work
    # the output folder: never an input, inside one, or holding one
    check_folder_target(out, RunInputs.of(*inputs, str(model)), hint="choose another --out")
    files, rows = expand_inputs(inputs)
    taken: dict[str, str] = {}
    todo: list[Request] = []
    for f in files:  # two inputs named alike would share their outputs
        store = nightly_store(out, f)
        if store in taken:
            rows.append(
                Row(
                    f,
                    error=f"{f}: its outputs would be {store}, which {taken[store]} writes; "
                    "run them into different --out folders",
                    exit_code=int(ExitCode.CONFLICT),
                )
            )
        else:
            taken[store] = f
            todo.append(Request(f, str(model), None, options, ingest_to=store, export_tiff=True))
    if todo and "://" not in out:
        os.makedirs(out, exist_ok=True)
    done: list[Row] = []
    if todo:
        with dask_client(cluster=cluster, device=options.device) as client:
            for i, request in enumerate(todo, 1):
                if not (quiet or as_json):
                    typer.echo(f"[{i}/{len(todo)}] {request.source}")
                row = predict_one(request, client, cluster, quiet or as_json)
                if row.status != "ok" and not as_json:
                    typer.echo(f"segflow: error: {row.error}", err=True)
                for message in row.warnings:
                    warn(message)
                done.append(row)
    order = {f: i for i, f in enumerate(files)}
    rows = sorted(done, key=lambda r: order.get(r.input, -1)) + rows
    failed = [r for r in rows if r.status != "ok"]
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "out": out,
                    "ok": len(rows) - len(failed),
                    "failed": len(failed),
                    "inputs": [asdict(r) for r in rows],
                }
            )
        )
    elif not quiet:
        _print_summary(rows, out)
    if failed:
        raise typer.Exit(failed[0].exit_code or int(ExitCode.OTHER))


def _print_summary(rows: list[Row], out: str) -> None:
    from segflow.commands_segment import napari_command

    ok = [r for r in rows if r.status == "ok"]
    typer.echo(f"predict: {len(ok)} ok, {len(rows) - len(ok)} failed ({out})")
    for r in rows:
        if r.status == "ok":
            what = (
                "complete already, nothing recomputed"
                if r.reused
                else f"{blocks_text(r.blocks_computed)} computed, {r.blocks_reused} reused"
            )
            if r.objects is not None:
                what += f"; {r.objects} objects"
            typer.echo(f"  ok      {r.input} -> {r.labels_tiff} ({what}, {r.seconds:.1f} s)")
            if r.preview:
                typer.echo(f"          preview: {r.preview}")
        else:
            typer.echo(f"  failed  {r.error}")
    if ok and ok[0].store and (view := napari_command(ok[0].store)):
        typer.echo(f"view: {view}")
