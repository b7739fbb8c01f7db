"""The run's preview picture: orthogonal middle slices of the image with the labels
outlined (touching objects in different colours), a scale bar, the voxel size and z
stretch, and an object-size histogram (plain Python; :mod:`tasks.report` writes the text
reports that embed it)."""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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
    write_file(target, lambda f: _save_png(picture, f), binary=True, owner=out_url)
    return target


def png_data_uri(picture: Image.Image, max_side: int | None = None) -> str:
    """A PNG as a ``data:`` URI, to embed in a markdown artifact: as drawn (a preview is at
    most ``max_side`` of :func:`preview_picture` across, a few hundred kB), or shrunk to
    ``max_side``."""
    if max_side is not None and max(picture.size) > max_side:
        info = picture.info
        picture = picture.copy()
        picture.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        picture.info.update(info)
    buf = io.BytesIO()
    _save_png(picture, buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


#: The PNG text entry holding what a preview's scale bar and caption say.
PREVIEW_NOTE = "Description"


def _save_png(picture: Image.Image, f: Any) -> None:
    """``picture`` as PNG, with its :data:`PREVIEW_NOTE` (if any) as a text entry."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    if picture.info.get(PREVIEW_NOTE):
        meta.add_itxt(PREVIEW_NOTE, str(picture.info[PREVIEW_NOTE]))
    picture.save(f, format="PNG", optimize=True, pnginfo=meta)


#: Outline colours: clearly distinct hues; objects that touch in the shown slices never
#: share one while the palette allows (:func:`label_colours`).
PREVIEW_COLOURS = np.array(
    [
        [230, 25, 75],  # red
        [60, 180, 75],  # green
        [255, 225, 25],  # yellow
        [0, 130, 200],  # blue
        [245, 130, 48],  # orange
        [145, 30, 180],  # purple
        [70, 240, 240],  # cyan
        [240, 50, 230],  # magenta
    ],
    dtype=np.float32,
)
#: Pixels between the panels of a preview.
PREVIEW_GAP = 4
#: A small image is enlarged by a whole factor until its panels span at least this many pixels.
PREVIEW_MIN_SIDE = 512
#: Objects this many background pixels apart (or fewer) count as touching when colouring.
TOUCH_GAP = 1

_UNIT_LADDER = (("nanometer", "nm"), ("micrometer", "µm"), ("millimeter", "mm"), ("meter", "m"))
_UNIT_SYMBOLS = {
    **dict(_UNIT_LADDER),
    "angstrom": "Å",
    "picometer": "pm",
    "centimeter": "cm",
    "kilometer": "km",
}


def histogram_height(width: int) -> int:
    """Height in pixels of the object-size histogram under slices ``width`` pixels wide."""
    return min(max(round(0.3 * width), 120), 240)


def preview_zoom(content: float, gap: int, max_side: int = 1024) -> float:
    """How much a preview enlarges (a whole factor) or shrinks its voxels: panels spanning
    ``content`` voxels plus ``gap`` pixels reach :data:`PREVIEW_MIN_SIDE` without passing
    ``max_side``."""
    if content + gap > max_side:
        return (max_side - gap) / content
    whole = max(1, math.ceil((PREVIEW_MIN_SIDE - gap) / max(math.floor(content), 1)))
    return float(min(whole, max(1, math.floor((max_side - gap) / content))))


def touching_pairs(planes: Sequence[np.ndarray], gap: int = TOUCH_GAP) -> np.ndarray:
    """The pairs ``(a, b)``, ``a < b``, of labels that touch in any of ``planes``: pixels at
    most ``gap`` background pixels apart, diagonals included (``gap=0``: 8-neighbours)."""
    reach = gap + 1
    offsets = [(0, dx) for dx in range(1, reach + 1)]
    offsets += [(dy, dx) for dy in range(1, reach + 1) for dx in range(-reach, reach + 1)]
    found = [np.zeros((0, 2), dtype=np.int64)]
    for lab in planes:
        lab = np.asarray(lab).astype(np.int64, copy=False)
        h, w = lab.shape
        for dy, dx in offsets:
            if dy >= h or abs(dx) >= w:
                continue
            a = lab[: h - dy, max(0, -dx) : w - max(0, dx)]
            b = lab[dy:, max(0, dx) : w - max(0, -dx)]
            hit = (a > 0) & (b > 0) & (a != b)
            if hit.any():
                pair = np.stack([a[hit], b[hit]], axis=1)
                found.append(np.sort(pair, axis=1))
    return np.unique(np.concatenate(found), axis=0)


def label_colours(ids: np.ndarray, pairs: np.ndarray, n_colours: int) -> np.ndarray:
    """A colour index per label of ``ids`` such that no two labels of a pair share one
    while ``n_colours`` allow: greedy graph colouring, most-connected labels first, each
    taking the free colour used least so far (so the picture uses all colours). Where no
    colour is free, the one fewest neighbours have. Deterministic for the same labels."""
    index = {int(i): k for k, i in enumerate(ids)}
    neighbours: list[list[int]] = [[] for _ in ids]
    for a, b in pairs:
        ka, kb = index.get(int(a)), index.get(int(b))
        if ka is not None and kb is not None:
            neighbours[ka].append(kb)
            neighbours[kb].append(ka)
    colours = np.full(len(ids), -1, dtype=np.int64)
    used = [0] * n_colours
    for k in sorted(range(len(ids)), key=lambda k: (-len(neighbours[k]), k)):
        clashes = [0] * n_colours
        for n in neighbours[k]:
            if colours[n] >= 0:
                clashes[colours[n]] += 1
        best = min(range(n_colours), key=lambda c: (clashes[c], used[c], c))
        colours[k] = best
        used[best] += 1
    return colours


def nice_length(limit: float) -> float:
    """The longest round length (1, 2 or 5 times a power of ten) not above ``limit``."""
    if not limit > 0:
        raise ValueError(f"a scale bar needs a positive length, not {limit}")
    power = 10.0 ** math.floor(math.log10(limit))
    for mantissa in (5, 2, 1):
        if mantissa * power <= limit * (1 + 1e-9):
            return mantissa * power
    return power / 2  # limit rounded just below a power of ten


def format_length(value: float, unit: str | None) -> str:
    """``value`` in ``unit`` as a person writes it: ``format_length(0.5, "micrometer")`` is
    ``500 nm``; without a unit, pixels (``20 px``)."""
    if unit is None:
        return f"{value:g} px"
    names = [name for name, _ in _UNIT_LADDER]
    if unit in names:
        k = names.index(unit)
        while value >= 1000 * (1 - 1e-9) and k + 1 < len(names):
            value, k = value / 1000, k + 1
        while value < 1 and k > 0:
            value, k = value * 1000, k - 1
        unit = names[k]
    return f"{round(value, 6):g} {_UNIT_SYMBOLS.get(unit, unit)}"


def scale_bar(
    width: int, voxel: float, unit: str | None, fraction: float = 0.3
) -> tuple[float, str]:
    """A scale bar for a panel ``width`` voxels wide of ``voxel``-sized voxels (in ``unit``;
    None: no voxel size, the bar counts pixels): (its length in voxels, its label). The bar
    is the longest round length within ``fraction`` of the panel."""
    size = voxel if unit is not None else 1.0
    length = nice_length(fraction * width * size)
    if unit is None:
        length = max(1.0, length)
    return length / size, format_length(length, unit)


def aspect_note(scale: Sequence[float], unit: str | None, orthogonal: bool) -> str:
    """What a preview says about its voxels (``scale``: their size, z first): the size, and
    for orthogonal views how much z is stretched to its physical aspect, e.g. ``z stretched
    ×4.0 (voxel 2 × 0.5 × 0.5 µm)``; ``no voxel size`` where the image has none."""
    what = "voxel" if orthogonal else "pixel"
    if unit is None and all(s == 1 for s in scale):
        drawn = ": z drawn 1:1" if orthogonal else ""
        return f"no {what} size{drawn}, scale bar in image pixels"
    sizes = " × ".join(f"{s:.4g}" for s in scale)
    voxel = (
        f"{what} {sizes} {_UNIT_SYMBOLS.get(unit, unit)}" if unit else f"{what} {sizes}, no unit"
    )
    if not orthogonal:
        return voxel
    factor = scale[0] / scale[1]
    if math.isclose(factor, 1.0, rel_tol=1e-3):
        return f"z to scale ({voxel})"
    if factor > 1:
        return f"z stretched ×{factor:.1f} ({voxel})"
    return f"z squeezed ×{1 / factor:.1f} ({voxel})"


def caption_height(width: int) -> int:
    """Height in pixels of the line under the slices of a preview ``width`` pixels wide."""
    return round(_text_px(width) * 1.6)


def _text_px(width: int) -> int:
    """The size of a preview's text for slices ``width`` pixels wide."""
    return min(max(13, round(width / 36)), 22)


def preview_picture(image_url: str, out_url: str, labels: str, max_side: int = 1024) -> Image.Image:
    """What a run made, in one picture: orthogonal middle slices with the labels outlined.

    A stack gives three panels, laid out as in a viewer's orthogonal view::

        +-----------+--+
        |  yx at    |zy|    zy: the middle x (z across, drawn to scale with
        |  mid z    |  |        the voxel sizes), beside yx at the middle z
        +-----------+--+
        | zx (mid y)|
        +-----------+
        z stretched ×4.0 (voxel 2 × 0.5 × 0.5 µm)

    a plane (or a one-slice stack) one. Each label is outlined in its colour over the
    image in grey (1st-99.8th percentile) with a faint fill; labels that touch in the
    slices get different colours (:func:`label_colours`). The yx panel carries a scale bar
    in the image's unit (in pixels where it has no voxel size), the line under the panels
    the voxel size and how much z is stretched (:func:`aspect_note`). For instance labels
    with an object table (``stitch``), a histogram of object sizes sits below. Small images
    are enlarged by a whole factor until the panels span :data:`PREVIEW_MIN_SIDE` pixels,
    large ones shrunk so they fit in ``max_side`` (:func:`preview_zoom`).
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
    orthogonal = len(planes) == 3
    scale = info.spatial_scale if orthogonal else info.spatial_scale[-2:]
    z_factor = scale[0] / scale[-2] if orthogonal else 1.0
    height, width = planes[0][1].shape
    thick = max(1.0, spatial[0] * z_factor) if orthogonal else 0.0
    gap = PREVIEW_GAP if orthogonal else 0
    zoom = preview_zoom(max(height, width) + thick, gap, max_side)

    def size(n: float) -> int:
        return max(1, round(n * zoom))

    h, w, t = size(height), size(width), size(thick) if thick else 0
    shapes = [(h, w), (h, t), (t, w)]
    shown = [_resampled(p[2], shape) for p, shape in zip(planes, shapes, strict=False)]
    # touching is judged at the finer of the stored and the drawn resolution
    fine = shown if zoom < 1 else [p[2] for p in planes]
    ids = np.unique(np.concatenate([np.unique(s) for s in shown]))  # every one is drawn
    ids = ids[ids > 0]
    colours = PREVIEW_COLOURS[label_colours(ids, touching_pairs(fine), len(PREVIEW_COLOURS))]
    panels = [
        _outlined(_resampled(p[1], shape), lab, ids, colours, (lo, hi), 2 if zoom >= 2 else 1)
        for p, lab, shape in zip(planes, shown, shapes, strict=False)
    ]
    px = _text_px(w + gap + t)
    font = _font(px)
    line = caption_height(w + gap + t)
    total = (w + gap + t, h + gap + t + line)
    picture = Image.new("RGB", total, (0, 0, 0))
    origins = [(0, 0), (w + gap, 0), (0, h + gap)]
    draw = ImageDraw.Draw(picture)
    for (caption, *_), panel, origin in zip(planes, panels, origins, strict=False):
        picture.paste(panel, origin)
        if caption and panel.size[0] >= 3 * px and panel.size[1] >= px + 4:
            _label(draw, (origin[0] + 4, origin[1] + 3), caption, font)
    bar, text = scale_bar(width, scale[-1], info.unit)
    _scale_bar(draw, h, bar * zoom, text, font, px)
    note = aspect_note(scale, info.unit, orthogonal)
    _label(draw, (4, total[1] - line + (line - px) // 2 - 1), note, font)
    sizes = _object_sizes(out_url, labels)
    if sizes is not None:
        picture = _with_histogram(picture, sizes)
    picture.info[PREVIEW_NOTE] = f"{note}; scale bar {text}"
    return picture


def _resampled(plane: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``plane`` at ``shape`` by nearest-voxel resampling (labels stay labels)."""
    rows = (np.arange(shape[0]) * plane.shape[0] // shape[0]).astype(np.intp)
    cols = (np.arange(shape[1]) * plane.shape[1] // shape[1]).astype(np.intp)
    return np.asarray(plane)[np.ix_(rows, cols)]


def _outlined(
    image: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray,
    colours: np.ndarray,
    window: tuple[float, float],
    line: int = 1,
) -> Image.Image:
    """A grey panel (``window``: the grey values shown black and white) with each label
    outlined ``line`` pixels wide (and faintly filled) in its colour (``colours[k]`` for
    the label ``ids[k]``)."""
    lo, hi = window
    lab = labels.astype(np.int64)
    grey = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-12), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    fg = lab > 0
    colour = np.zeros_like(rgb)
    if ids.size:
        colour[fg] = colours[np.searchsorted(ids, lab[fg])]
    edge = np.zeros_like(fg)
    padded = np.pad(lab, line, mode="edge")
    h, w = lab.shape
    for d in range(-line, line + 1):  # a pixel within ``line`` of another label's, across
        if d:
            edge |= padded[line + d : line + d + h, line : line + w] != lab
            edge |= padded[line : line + h, line + d : line + d + w] != lab
    edge &= fg
    inside = fg & ~edge
    rgb[inside] = 0.75 * rgb[inside] + 0.25 * colour[inside]
    rgb[edge] = colour[edge]
    return Image.fromarray(rgb.astype(np.uint8))


def _font(px: int) -> Any:
    """DejaVu Sans (matplotlib's, which has µ and ×) ``px`` high; Pillow's own if absent."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    try:
        return ImageFont.truetype(path, px)
    except OSError:
        return ImageFont.load_default(size=px)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: Any) -> None:
    """White text with a dark rim, legible on any image."""
    draw.text(xy, text, fill=(255, 255, 255), font=font, stroke_width=2, stroke_fill=(0, 0, 0))


def _scale_bar(
    draw: ImageDraw.ImageDraw, bottom: int, length: float, text: str, font: Any, px: int
) -> None:
    """A bar ``length`` pixels long with ``text`` (``px`` high) above it, in the lower left
    of a panel ``bottom`` pixels high."""
    thick = max(3, px // 3)
    x0, y1 = 8, bottom - 8
    x1, y0 = x0 + max(1, round(length)) - 1, y1 - thick + 1  # both inclusive
    draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), fill=(0, 0, 0))  # a dark rim
    draw.rectangle((x0, y0, x1, y1), fill=(255, 255, 255))
    width = draw.textlength(text, font=font)
    _label(draw, (max(4, (x0 + x1 - width) / 2), y0 - px - 6), text, font)


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
