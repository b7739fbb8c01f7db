"""Run reports: a preview picture and a markdown summary (plain Python; flows publish them)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from tasks.store import (
    LABELS_GROUP,
    filesystem,
    get_array,
    is_remote,
    open_group,
    open_level,
    read_image_info,
)

_PALETTE = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ],
    dtype=np.float32,
)


def preview_path(out_url: str) -> str:
    base = str(out_url).rstrip("/")
    for suffix in (".ome.zarr", ".zarr"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return f"{base}.preview.png"


def write_preview(
    image_url: str, out_url: str, labels: str, path: str | None = None, max_side: int = 1024
) -> str:
    """PNG of the middle slice: the image in grey with the labels overlaid in colour."""
    info = read_image_info(image_url)
    arr = open_level(info)
    spatial = info.spatial_shape
    sel: list[Any] = []
    for a in info.axes:
        if a == "c":
            sel.append(0)
        elif a == "z":
            sel.append(spatial[0] // 2)
        else:
            sel.append(slice(None))
    img = np.asarray(arr[tuple(sel)]).astype(np.float32)
    lab_arr = get_array(open_group(out_url, "r"), f"{LABELS_GROUP}/{labels}/0", out_url)
    lab_sel = (spatial[0] // 2,) if len(spatial) == 3 else ()
    lab = np.asarray(lab_arr[lab_sel]).astype(np.int64)
    if info.stats is not None and info.stats.percentiles:
        lo, hi = info.stats.percentile(1.0), info.stats.percentile(99.8)
    else:
        lo, hi = float(np.percentile(img, 1)), float(np.percentile(img, 99.8))
    grey = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colours = _PALETTE[(lab - 1) % len(_PALETTE)]
    fg = lab > 0
    rgb[fg] = 0.55 * rgb[fg] + 0.45 * colours[fg]
    picture = Image.fromarray(rgb.astype(np.uint8))
    scale = max(picture.size) / max_side
    if scale > 1:
        picture = picture.resize(
            (int(picture.size[0] / scale), int(picture.size[1] / scale)), Image.Resampling.NEAREST
        )
    target = path or preview_path(out_url)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    if is_remote(target):
        with filesystem(target).open(target, "wb") as f:
            f.write(buffer.getvalue())
    else:
        with open(target, "wb") as f:
            f.write(buffer.getvalue())
    return target


def markdown_report(summary: dict[str, Any]) -> str:
    """The per-volume report shown in the Prefect UI."""
    lines = [f"# segflow: {summary['volume']}", ""]
    lines += ["| | |", "|---|---|"]
    for key in (
        "source",
        "image",
        "model",
        "model_digest",
        "outputs",
        "labels",
        "instances",
        "objects_table",
        "preview",
    ):
        if summary.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | `{summary[key]}` |")
    if summary.get("preview"):
        target = str(summary["preview"])
        url = target if "://" in target else "file://" + target
        lines += ["", f"Preview of the middle slice: [{target}]({url})"]
    lines += ["", "## Work", "", "| | |", "|---|---|"]
    for key in (
        "regions",
        "regions_computed",
        "regions_skipped",
        "regions_failed",
        "blocks",
        "voxels",
        "seconds",
        "voxels_per_second",
        "objects",
        "instance_method",
    ):
        if summary.get(key) is not None:
            value = summary[key]
            text = f"{value:,.1f}" if isinstance(value, float) else f"{value}"
            lines.append(f"| {key.replace('_', ' ')} | {text} |")
    if summary.get("timings"):
        lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in summary["timings"].items()]
    if summary.get("class_voxels"):
        lines += ["", "## Voxels per class", "", "| class | voxels |", "|---|---|"]
        lines += [f"| {k} | {v:,} |" for k, v in summary["class_voxels"].items()]
    if summary.get("parameters"):
        lines += ["", "## Parameters", "", "```json"]
        import json

        lines += [json.dumps(summary["parameters"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"
