"""``make demo``: the main job end to end on synthetic data, on this machine.

1. train a small U-Net on a synthetic 2D image with known nuclei (a couple of minutes);
2. write a synthetic z-stack as an OME-TIFF into an inbox: slices 0.75 µm apart, pixels
   0.25 µm, so nuclei span several slices, and many touch another one along z;
3. run the ``segment-volume`` Prefect flow (ephemeral Prefect API, local Dask cluster):
   ingest → exact overlap-tile segmentation, slice by slice → instances across chunks (for
   a 2D model on a stack: objects of each slice linked across slices) → report;
4. check the promise: the tiled result equals one pass over the whole volume, bit for bit;
5. score the instances the pipeline made against the known objects (beside the 3D
   connected components of the same mask) and export them as OME-TIFF.

``SEGFLOW_DEMO_STEPS`` sets the training steps (default 300). ``segflow demo --data-only
DIR`` writes just small synthetic data to try the commands on (the README's quick start).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from segflow.app import app
from segflow.errors import clean_errors
from unet_core.runtime import configure

#: Voxel size of the synthetic stacks (z, y, x) in micrometres: nuclei span several slices.
STACK_VOXEL = (0.75, 0.25, 0.25)


def write_training_pair(folder: Path, shape: tuple[int, ...] = (384, 384)) -> tuple[Path, Path]:
    """A synthetic 2D image with known nuclei and its instance labels, as TIFFs."""
    import tifffile

    from unet_core.synthetic import blobs

    folder.mkdir(parents=True, exist_ok=True)
    image, labels = blobs(shape, rng=1)
    tifffile.imwrite(folder / "image.tif", image)
    tifffile.imwrite(folder / "labels.tif", labels)
    return folder / "image.tif", folder / "labels.tif"


def write_stack(path: Path, shape: tuple[int, int, int], rng: int = 7) -> np.ndarray:
    """A synthetic z-stack as an OME-TIFF with :data:`STACK_VOXEL` sizes; many nuclei touch
    another along z. Returns the true instance labels."""
    import tifffile

    from unet_core.synthetic import blobs

    volume, truth = blobs(shape, rng=rng, spacing=(3, 1, 1), stacked=0.5, overlap=0.1)
    sizes = dict(zip(("PhysicalSizeZ", "PhysicalSizeY", "PhysicalSizeX"), STACK_VOXEL, strict=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, volume, ome=True, metadata={"axes": "ZYX", **sizes})
    return truth


#: The overlap at which a found object counts as a known nucleus in the demo's scores.
IOU = 0.5
SCORES = (
    f"foreground_dice: Dice of the foreground mask; instance_f1_at_iou_{IOU}: F1 of the "
    f"objects matched one to one to the known nuclei at IoU >= {IOU}; ..._3d_components: "
    "the same mask split by 3D connected components instead of the run's instance method"
)


def _pixels(path: Path) -> np.ndarray | None:
    """The pixels of a TIFF, or None when there is none."""
    import tifffile

    return tifffile.imread(path) if path.exists() else None


def _work_done(summary: dict) -> str:
    """What the flow computed and what it reused, in words."""
    computed, reused = summary["blocks_computed"], summary["blocks_reused"]
    instances = "reused" if summary.get("stitch_reused") else "made"
    if computed == 0 and reused and summary.get("stitch_reused"):
        return f"nothing needed recomputing: all {reused} blocks and the instances reused"
    return f"{computed} blocks computed, {reused} reused from the last run; instances {instances}"


@app.command()
@clean_errors
def demo(
    out: Annotated[Path, typer.Argument(help="Folder to write into.")] = Path("demo-output"),
    data_only: Annotated[
        bool,
        typer.Option(
            "--data-only",
            help="Only write small synthetic data: train/image.tif + train/labels.tif "
            "(256x256), stack.tif (12x128x128) and batch/a.tif, batch/b.tif (8x96x96).",
        ),
    ] = False,
) -> None:
    """The demo (as `make demo`), or with --data-only small data to try the commands on.

    Example: segflow demo --data-only data
    """
    if not data_only:
        main(["--out", str(out)])
        return
    write_training_pair(out / "train", (256, 256))
    write_stack(out / "stack.tif", (12, 128, 128))
    for i, name in enumerate(("a", "b")):
        write_stack(out / "batch" / f"{name}.tif", (8, 96, 96), rng=11 + i)
    typer.echo(f"wrote {out}: train/image.tif, train/labels.tif, stack.tif, batch/a.tif, b.tif")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--steps", type=int, default=int(os.environ.get("SEGFLOW_DEMO_STEPS", 300)))
    args = parser.parse_args(argv)
    configure()  # before PyTorch loads
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(out / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # The demo's output is its own lines: Prefect's console shows warnings and errors only
    # (the flow's INFO lines still reach its API, where a Prefect UI would show them).
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    # Dask's own INFO lines (scheduler, worker start-up) drown the flow's log: warnings only.
    # Set before distributed is imported: its logging config overrides a logger's level.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)

    import torch
    import zarr

    from segflow.progress import TrainProgress
    from tasks.training.run import run_training
    from unet_core import load_checkpoint
    from unet_core.metrics import dice, instances_from_mask, match_instances
    from unet_core.predict import predict
    from unet_core.synthetic import touching_along
    from unet_core.training.config import TrainConfig

    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    t_start = time.perf_counter()

    # 1. Train on a synthetic 2D image with known nuclei.
    train_dir = out / "train"
    write_training_pair(train_dir, (384, 384))
    ckpt = out / "model.ckpt"
    again = ckpt.exists()
    print(
        f"[1/5] training a depth-3, 16-channel U-Net for {args.steps} steps"
        + (" (resuming the earlier run's model) ..." if again else " ..."),
        flush=True,
    )
    t0 = time.perf_counter()
    config = TrainConfig(steps=args.steps, seed=0, device="cpu")
    with TrainProgress(config.steps, config.epoch_steps, prefix="      ") as shown:
        result, files = run_training(
            [str(train_dir / "image.tif")],
            [str(train_dir / "labels.tif")],
            ckpt,
            config,
            shown.update,
            resume=str(ckpt) if again else None,
        )
    print(
        f"      best validation Dice {result.best_metric or 0:.3f} "
        f"in {time.perf_counter() - t0:.0f} s "
        f"-> {ckpt}",
        flush=True,
    )

    # 2. A new volume arrives: a synthetic stack as a multi-page TIFF.
    tif = out / "inbox" / "volume.ome.tif"
    before = _pixels(tif)
    truth = write_stack(tif, (24, 256, 256))
    after = _pixels(tif)
    same = before is not None and after is not None and np.array_equal(before, after)
    print(
        f"[2/5] {'the same volume written again' if same else 'new volume'}: "
        f"{tif} {truth.shape} uint16, voxels 0.75×0.25×0.25 µm, "
        f"{touching_along(truth, axis=0):.0%} of {truth.max()} nuclei touch another along z",
        flush=True,
    )

    # 3. The main job: the segment-volume flow.
    from flows.segment import SegmentVolumeParams, segment_volume

    store = out / "volume.ome.zarr"
    print("[3/5] segment-volume flow: ingest -> segment -> stitch -> report ...", flush=True)
    summary = segment_volume(
        **SegmentVolumeParams(
            source=str(tif),
            model=str(ckpt),
            output=str(store),
            chunks=[4, 128, 128],
            instances=True,
            probabilities=True,
            max_regions=6,
            retry_delay_s=1,
        ).flow_parameters()
    )
    print(f"      {_work_done(summary)}", flush=True)

    # 4. The exactness promise: chunked on Dask == the same tile lattice over the whole
    # volume in memory (the default mode: the same bits for any chunking).
    model, meta = load_checkpoint(ckpt)
    root = zarr.open_group(str(store), mode="r")
    from tasks.store import get_array, read_image_info

    info = read_image_info(str(store))
    norm = meta.normalization.affine(info.stats)
    whole = predict(model, np.asarray(get_array(root, "0")[...]), batch_size=4, normalization=norm)
    semantic = np.asarray(get_array(root, "labels/semantic/0")[...])
    exact = bool(np.array_equal(semantic, whole.argmax(0)))
    print(f"[4/5] chunked result equals the in-memory pass bit for bit: {exact}", flush=True)

    # 5. Quality against the known objects, and a TIFF for other tools.
    instances = np.asarray(get_array(root, "labels/instances/0")[...])
    fg_dice = dice(semantic, (truth > 0).astype(np.uint8), 2)[1]
    scores = match_instances(instances, truth, IOU)
    min_size = summary.get("min_size") or 1  # the stitch's, in voxels of the stack
    fg = semantic == meta.foreground_class
    components = match_instances(instances_from_mask(fg, min_size), truth, IOU)
    from tasks.export import export_labels_once
    from tasks.paths import beside_store

    # a file beside the store, owned by it: written again only when the instances changed
    tiff_out = beside_store(str(store), "instances.ome.tif")
    kept = export_labels_once(str(store), tiff_out, "instances")
    print(f"[5/5] {'kept' if kept else 'exported'} {tiff_out}", flush=True)
    report = {
        "store": str(store),
        "labels": summary["labels"],
        "instances": summary.get("instances"),
        "objects": summary.get("objects"),
        "objects_table": summary.get("objects_table"),
        "preview": summary.get("preview"),
        "tiff": str(tiff_out),
        "foreground_dice": round(float(fg_dice), 4),
        "instance_method": summary.get("instance_method"),
        f"instance_f1_at_iou_{IOU}": round(float(scores.f1), 4),
        f"instance_f1_at_iou_{IOU}_3d_components": round(float(components.f1), 4),
        "scores": SCORES,
        "tiled_equals_whole_volume": exact,
        "seconds": round(time.perf_counter() - t_start, 1),
        "loss_curve": str(files.loss_curve),
    }
    print(json.dumps(report, indent=2))
    if not exact:
        raise SystemExit("the tiled result differs from the whole-volume pass")


if __name__ == "__main__":
    main()
