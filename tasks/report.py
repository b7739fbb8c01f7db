"""Run reports: a preview picture and a markdown summary (plain Python; flows publish them)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from tasks.outputs import write_file
from tasks.paths import beside_store
from tasks.reads import StrictArray
from tasks.runstate import require_complete
from tasks.store import (
    LABELS_GROUP,
    filesystem,
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
    """The preview PNG (:func:`preview_picture`, unless given) beside the store
    (:func:`preview_path`); returns its path."""
    if picture is None:
        picture = preview_picture(image_url, out_url, labels, max_side)
    target = path or preview_path(out_url)
    write_file(target, lambda f: picture.save(f, format="PNG"), binary=True, owner=out_url)
    return target


def png_data_uri(picture: Image.Image, max_side: int = 320) -> str:
    """A small PNG as a ``data:`` URI, to embed in a markdown artifact (a few tens of kB)."""
    small = picture.copy()
    small.thumbnail((max_side, max_side), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    small.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: Pixels between the panels of a preview.
PREVIEW_GAP = 4
#: A small image is enlarged by a whole factor until its panels span at least this many pixels.
PREVIEW_MIN_SIDE = 512


def histogram_height(width: int) -> int:
    """Height in pixels of the object-size histogram under slices ``width`` pixels wide."""
    return min(max(round(0.3 * width), 120), 240)


def preview_picture(image_url: str, out_url: str, labels: str, max_side: int = 1024) -> Image.Image:
    """What a run made, in one picture: orthogonal middle slices with the labels outlined.

    A stack gives three panels, laid out as in a viewer's orthogonal view::

        +-----------+--+
        |  yx at    |zy|    zy: the middle x (z across, drawn to scale with
        |  mid z    |  |        the voxel sizes), beside yx at the middle z
        +-----------+--+
        | zx (mid y)|
        +-----------+

    a plane (or a one-slice stack) one. Each label is outlined in its colour over the
    image in grey (1st-99.8th percentile) with a faint fill; for instance labels with an
    object table (``stitch``), a histogram of object sizes sits below. Small images are
    enlarged by a whole factor, large ones shrunk so the slices fit in ``max_side``.
    """
    info = read_image_info(image_url)
    arr = open_level(info)
    require_complete(out_url, f"{LABELS_GROUP}/{labels}", f"'{labels}' labels")
    lab_arr = StrictArray(
        get_array(open_group(out_url, "r"), f"{LABELS_GROUP}/{labels}/0", out_url),
        out_url,
        f"{LABELS_GROUP}/{labels}/0",
    )
    spatial = info.spatial_shape
    channel: tuple[Any, ...] = (0,) if "c" in info.axes else ()
    planes: list[tuple[str, np.ndarray, np.ndarray]] = []  # (caption, image, labels)
    if len(spatial) == 3 and spatial[0] > 1:
        nz, ny, nx = spatial
        cuts: tuple[tuple[str, tuple[Any, ...]], ...] = (
            (f"z {nz // 2}", (nz // 2, slice(None), slice(None))),
            (f"x {nx // 2}", (slice(None), slice(None), nx // 2)),
            (f"y {ny // 2}", (slice(None), ny // 2, slice(None))),
        )
        for caption, sel in cuts:
            planes.append((caption, np.asarray(arr[(*channel, *sel)]), lab_arr[sel]))
        # zy is drawn with z across: beside the yx panel, sharing its y.
        planes[1] = (planes[1][0], planes[1][1].T, planes[1][2].T)
    else:
        plane: tuple[Any, ...] = (0,) if len(spatial) == 3 else ()
        planes.append(("", np.asarray(arr[(*channel, *plane)]), lab_arr[plane]))
    if info.stats is not None and info.stats.percentiles:
        lo, hi = info.stats.percentile(1.0), info.stats.percentile(99.8)
    else:
        values = np.concatenate([p[1].ravel() for p in planes]).astype(np.float64)
        lo, hi = float(np.percentile(values, 1)), float(np.percentile(values, 99.8))
    z_factor = info.spatial_scale[0] / info.spatial_scale[-2] if len(planes) == 3 else 1.0
    height, width = planes[0][1].shape
    thick = max(1.0, spatial[0] * z_factor) if len(planes) == 3 else 0.0
    extent = max(height, width) + (thick + PREVIEW_GAP if thick else 0)
    zoom = (
        max_side / extent
        if extent > max_side
        else float(max(1, PREVIEW_MIN_SIDE // max(extent, 1)))
    )

    def size(n: float) -> int:
        return max(1, round(n * zoom))

    h, w, t = size(height), size(width), size(thick) if thick else 0
    panels = [
        _outlined(planes[0][1], planes[0][2], (h, w), lo, hi),
    ]
    if thick:
        panels.append(_outlined(planes[1][1], planes[1][2], (h, t), lo, hi))
        panels.append(_outlined(planes[2][1], planes[2][2], (t, w), lo, hi))
    total = (w + PREVIEW_GAP + t, h + PREVIEW_GAP + t) if thick else (w, h)
    picture = Image.new("RGB", total, (0, 0, 0))
    origins = [(0, 0), (w + PREVIEW_GAP, 0), (0, h + PREVIEW_GAP)]
    draw = ImageDraw.Draw(picture)
    for (caption, *_), panel, origin in zip(planes, panels, origins, strict=False):
        picture.paste(panel, origin)
        if caption and panel.size[0] >= 40 and panel.size[1] >= 14:
            x, y = origin[0] + 3, origin[1] + 2
            draw.text((x + 1, y + 1), caption, fill=(0, 0, 0))
            draw.text((x, y), caption, fill=(255, 255, 255))
    sizes = _object_sizes(out_url, labels)
    if sizes is not None:
        picture = _with_histogram(picture, sizes)
    return picture


def _outlined(
    image: np.ndarray, labels: np.ndarray, shape: tuple[int, int], lo: float, hi: float
) -> Image.Image:
    """A grey panel of ``shape`` with each label outlined (and faintly filled) in colour."""
    rows = (np.arange(shape[0]) * image.shape[0] // shape[0]).astype(np.intp)
    cols = (np.arange(shape[1]) * image.shape[1] // shape[1]).astype(np.intp)
    img = image[np.ix_(rows, cols)].astype(np.float32)  # nearest-voxel resampling
    lab = labels[np.ix_(rows, cols)].astype(np.int64)
    grey = np.clip((img - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    colours = _PALETTE[(lab - 1) % len(_PALETTE)]
    fg = lab > 0
    edge = np.zeros_like(fg)
    padded = np.pad(lab, 1, mode="edge")
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[dy : dy + lab.shape[0], dx : dx + lab.shape[1]] != lab
    edge &= fg
    inside = fg & ~edge
    rgb[inside] = 0.8 * rgb[inside] + 0.2 * colours[inside]
    rgb[edge] = colours[edge]
    return Image.fromarray(rgb.astype(np.uint8))


def _object_sizes(out_url: str, labels: str) -> np.ndarray | None:
    """Voxels per object from the object table ``stitch`` wrote for ``labels``, if any."""
    from tasks.paths import table_paths

    _, parquet = table_paths(out_url, labels)
    fs = filesystem(parquet)
    if not fs.exists(parquet):
        return None
    import pandas as pd

    with fs.open(parquet, "rb") as f:
        return np.asarray(pd.read_parquet(f, columns=["voxels"])["voxels"], dtype=np.int64)


def _with_histogram(picture: Image.Image, sizes: np.ndarray) -> Image.Image:
    """``picture`` above a histogram of object sizes (log-spaced bins, as many as fit)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = picture.size[0]
    height = histogram_height(width)
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_subplot()
    sizes = sizes[sizes > 0]
    if sizes.size:
        top = max(int(sizes.max()), 2)
        bins = np.unique(np.geomspace(max(int(sizes.min()), 1), top + 1, 25).round())
        ax.hist(sizes, bins=list(bins), color="#3c82c8")
        ax.set_xscale("log")
    small = width < 400
    ax.set_title(f"{sizes.size:,} objects", fontsize=7 if small else 9)
    ax.set_xlabel("voxels per object", fontsize=7 if small else 8)
    ax.tick_params(labelsize=6 if small else 7)
    fig.tight_layout(pad=0.4)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    chart = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    both = Image.new("RGB", (width, picture.size[1] + height), (255, 255, 255))
    both.paste(picture, (0, 0))
    both.paste(chart.resize((width, height)), (0, picture.size[1]))
    return both


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
        lines += ["", "## Preview (middle slices)", "", f"![preview]({summary['preview_uri']})"]
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
        "min_size",
        "min_size_unit",
        "small_objects_removed",
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
