"""Run reports: a preview picture and a markdown summary (plain Python; flows publish them)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from tasks.paths import beside_store
from tasks.runstate import StrictArray, require_complete, write_beside
from tasks.store import (
    LABELS_GROUP,
    get_array,
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
    return beside_store(out_url, "preview.png")


def write_preview(
    image_url: str,
    out_url: str,
    labels: str,
    path: str | None = None,
    max_side: int = 1024,
    picture: Image.Image | None = None,
) -> str:
    """PNG of the middle slice (:func:`preview_picture`, unless given) beside the store."""
    if picture is None:
        picture = preview_picture(image_url, out_url, labels, max_side)
    target = path or preview_path(out_url)
    write_beside(target, lambda f: picture.save(f, format="PNG"), binary=True)
    return target


def png_data_uri(picture: Image.Image, max_side: int = 320) -> str:
    """A small PNG as a ``data:`` URI, to embed in a markdown artifact (a few tens of kB)."""
    small = picture.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def preview_picture(image_url: str, out_url: str, labels: str, max_side: int = 1024) -> Image.Image:
    """The middle slice in grey with the labels overlaid in colour (at most ``max_side``)."""
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
    require_complete(out_url, f"{LABELS_GROUP}/{labels}", f"'{labels}' labels")
    lab_arr = StrictArray(
        get_array(open_group(out_url, "r"), f"{LABELS_GROUP}/{labels}/0", out_url),
        out_url,
        f"{LABELS_GROUP}/{labels}/0",
    )
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
    return picture


def size_histogram(sizes: Sequence[int] | np.ndarray) -> list[dict[str, int]]:
    """Objects per size class (powers of two, in voxels): rows of from/to/objects."""
    values = np.asarray(sizes, dtype=np.int64)
    values = values[values > 0]
    if values.size == 0:
        return []
    exponents = np.floor(np.log2(values)).astype(np.int64)
    rows = []
    for e in range(int(exponents.min()), int(exponents.max()) + 1):
        rows.append({"from": 2**e, "to": 2 ** (e + 1) - 1, "objects": int(np.sum(exponents == e))})
    return rows


def _where(value: str) -> str:
    """A copyable path, or a link where it is a web address."""
    if value.startswith(("http://", "https://")):
        return f"[{value}]({value})"
    return f"`{value}`"


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
            lines.append(f"| {key.replace('_', ' ')} | {_where(str(summary[key]))} |")
    if summary.get("failed_regions"):
        lines += _failed_section(summary)
    if summary.get("preview_uri"):
        lines += ["", "## Preview (middle slice)", "", f"![preview]({summary['preview_uri']})"]
    if summary.get("size_histogram"):
        lines += ["", "## Object sizes", "", "| voxels | objects | |", "|---|---|---|"]
        top = max(r["objects"] for r in summary["size_histogram"])
        for r in summary["size_histogram"]:
            bar = "█" * max(1, round(20 * r["objects"] / top)) if r["objects"] else ""
            lines.append(f"| {r['from']:,}-{r['to']:,} | {r['objects']:,} | {bar} |")
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
        lines += [json.dumps(summary["parameters"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def _failed_section(summary: dict[str, Any]) -> list[str]:
    """Where each failed region is, its first error, and how to re-run exactly those."""
    rows = summary["failed_regions"]
    lines = [
        "",
        f"## Failed regions ({len(rows)})",
        "",
        "| region | blocks (grid index) | voxel box (z, y, x ranges) | physical box "
        "| first error |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        error = str(r["error"]).replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(
            f"| {r['region']} | {r['blocks']} | {r['voxel_box']} | {r['physical_box']} | {error} |"
        )
    rerun = summary.get("rerun_parameters")
    if rerun:
        text = json.dumps(rerun)
        lines += [
            "",
            "### Re-run exactly these regions",
            "",
            "Retry this flow run (it recomputes only unfinished blocks), or start a new run "
            "of `segment-volume/on-demand` with these parameters:",
            "",
            "```json",
            json.dumps(rerun, indent=2),
            "```",
            "",
            "```",
            f"prefect deployment run 'segment-volume/on-demand' --params '{text}'",
            "```",
        ]
    return lines
