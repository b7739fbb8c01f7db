"""Reading a box of a TIFF source (:class:`tasks.tiff.source.TiffSource`) in the calling
thread: uncompressed pages row band by row band straight into the buffer; compressed or
tiled pages decode only the strips or tiles that overlap the box."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tasks.store import (
    is_transient,
)
from tasks.tiff.files import _cached, _OpenTiff
from tasks.tiff.source import TiffSource, _norm
from unet_core.errors import (
    InvalidVolumeError,
    SegflowError,
)

_JPEG = {6, 7, 34892, 33007}
#: Largest row band read whole when a box needs only some of its columns.
_BAND_BYTES = 1 << 20

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------- reading


def read_box(source: TiffSource, box: Sequence[tuple[int, int]]) -> np.ndarray:
    """Voxels of ``box`` (``(start, stop)`` per output axis of ``source.axes``).

    Returns an array in output axis order (a transposed view of the read buffer).
    """
    if len(box) != len(source.axes):
        raise ValueError(f"box has {len(box)} axes, the source {len(source.axes)}")
    ranges: list[tuple[int, int]] = []
    for letter in source.dim_letters:
        ranges.append(box[source.axes.index(letter)] if letter else (0, 1))
    npd = len(source.page_shape)
    buf = np.empty([b - a for a, b in ranges], dtype=source.dtype)
    page_ranges = ranges[:npd]
    within = ranges[npd:]
    for local in np.ndindex(*[b - a for a, b in page_ranges]):
        index = tuple(a + i for (a, _), i in zip(page_ranges, local, strict=True))
        flat = int(np.ravel_multi_index(index, source.page_shape)) if npd else 0
        _read_page(source, flat, within, buf[local])
    kept = [i for i, a in enumerate(source.dim_letters) if a]
    squeezed = buf.reshape([buf.shape[i] for i in kept])
    kept_letters = [source.dim_letters[i] for i in kept]
    return squeezed.transpose([kept_letters.index(a) for a in source.axes])


def _read_page(
    source: TiffSource, flat: int, within: list[tuple[int, int]], out: np.ndarray
) -> None:
    """Read one page's part ``within`` (5 normalised dims) into ``out``."""
    if source.kind == "slices":
        fid, index = source.files[flat], 0
    else:
        fid, index = source.files[0], flat
    handle = _cached(fid)
    try:
        kf = handle.series.keyframe
        if source.contiguous_base is not None:
            _read_contiguous(handle, kf, source.contiguous_base + index * kf.nbytes, within, out)
            return
        page = handle.series[index]
        if page is None:
            raise InvalidVolumeError(f"{fid.url}: page {index} of the image is missing")
        if kf.is_final and kf.imagedepth == 1 and kf.bitspersample in (8, 16, 32, 64):
            _read_contiguous(handle, kf, int(page.dataoffsets[0]), within, out)
        else:
            _read_segments(handle, page, kf, within, out)
    except SegflowError:
        raise
    except Exception as exc:
        if is_transient(exc):
            raise  # the connection, not the file: a retry may pass
        raise InvalidVolumeError(
            f"{fid.url}: cannot read page {index} ({type(exc).__name__}: {str(exc)[:160]})"
        ) from None


def _readinto(handle: _OpenTiff, offset: int, out: np.ndarray) -> None:
    fh = handle.fh
    fh.seek(offset)
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    got = 0
    while got < view.nbytes:
        n = fh.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            raise InvalidVolumeError(
                f"{handle.fid.url}: the TIFF is truncated (expected {view.nbytes} bytes at "
                f"offset {offset}, got {got})"
            )
        got += n


def _read_contiguous(
    handle: _OpenTiff, kf: Any, offset: int, within: list[tuple[int, int]], out: np.ndarray
) -> None:
    """Uncompressed page stored in one piece: read the row band, then keep the columns."""
    (s0, s1), _, (y0, y1), (x0, x1), (c0, c1) = within
    _, _, rows, cols, n_contig = _norm(kf)
    dtype = np.dtype(out.dtype)
    row_bytes = cols * n_contig * dtype.itemsize
    swap = handle.tif.byteorder != ("<" if np.little_endian else ">") and dtype.itemsize > 1
    full_row = x0 == 0 and x1 == cols and c0 == 0 and c1 == n_contig
    for i, s in enumerate(range(s0, s1)):
        start = offset + s * rows * row_bytes + y0 * row_bytes
        target = out[i, 0]
        if full_row:
            _readinto(handle, start, target)
            if swap:
                target.byteswap(inplace=True)
        elif (y1 - y0) * row_bytes <= _BAND_BYTES:
            band = np.empty((y1 - y0, cols, n_contig), dtype=dtype)
            _readinto(handle, start, band)
            if swap:
                band.byteswap(inplace=True)
            target[...] = band[:, x0:x1, c0:c1]
        else:  # wide rows: read just the columns of the box, row by row
            row = np.empty((x1 - x0, n_contig), dtype=dtype)
            skip = x0 * n_contig * dtype.itemsize
            for r in range(y1 - y0):
                _readinto(handle, start + r * row_bytes + skip, row)
                if swap:
                    row.byteswap(inplace=True)
                target[r] = row[:, c0:c1]


def _read_segments(
    handle: _OpenTiff, page: Any, kf: Any, within: list[tuple[int, int]], out: np.ndarray
) -> None:
    """Compressed, tiled or packed page: decode only the strips/tiles that overlap."""
    (s0, s1), (d0, d1), (y0, y1), (x0, x1), (c0, c1) = within
    _, depth, rows, cols, _ = _norm(kf)
    offsets, counts = page.dataoffsets, page.databytecounts
    needed: list[int] = []
    if kf.is_tiled:
        tl, tw, td = int(kf.tilelength), int(kf.tilewidth), max(int(kf.tiledepth), 1)
        nw, nl, nd = math.ceil(cols / tw), math.ceil(rows / tl), math.ceil(depth / td)
        area, volume = nw * nl, nw * nl * nd
        for s in range(s0, s1):
            for dz in range(d0 // td, (d1 - 1) // td + 1):
                for ty in range(y0 // tl, (y1 - 1) // tl + 1):
                    for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                        needed.append(s * volume + dz * area + ty * nw + tx)
    else:
        rps = max(1, min(int(kf.rowsperstrip), rows))
        nl = math.ceil(rows / rps)
        for s in range(s0, s1):
            for d in range(d0, d1):
                for strip in range(y0 // rps, (y1 - 1) // rps + 1):
                    needed.append(s * nl * depth + d * nl + strip)
    if needed and max(needed) >= len(offsets):
        raise InvalidVolumeError(
            f"{handle.fid.url}: page has {len(offsets)} strips/tiles, expected more"
        )
    decode = kf.decode
    jpeg = kf.compression in _JPEG
    fh = handle.fh
    for i in needed:
        data: bytes | None = None
        if counts[i] and offsets[i]:
            fh.seek(offsets[i])
            data = fh.read(counts[i])
            if len(data) != counts[i]:
                raise InvalidVolumeError(
                    f"{handle.fid.url}: the TIFF is truncated (a strip/tile at offset "
                    f"{offsets[i]} is cut short)"
                )
        kwargs: dict[str, Any] = {}
        if jpeg:
            kwargs = {"jpegtables": getattr(page, "jpegtables", None), "jpegheader": kf.jpegheader}
        seg, (s, d, y, x, _), shape = decode(data, i, **kwargs)
        h, w = (seg.shape[1], seg.shape[2]) if seg is not None else (shape[1], shape[2])
        dn = seg.shape[0] if seg is not None else shape[0]
        oy0, oy1 = max(y, y0), min(y + h, y1, rows)
        ox0, ox1 = max(x, x0), min(x + w, x1, cols)
        od0, od1 = max(d, d0), min(d + dn, d1)
        if oy0 >= oy1 or ox0 >= ox1 or od0 >= od1:
            continue
        target = out[s - s0, od0 - d0 : od1 - d0, oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0]
        if seg is None:
            target[...] = kf.nodata
        else:
            target[...] = seg[od0 - d : od1 - d, oy0 - y : oy1 - y, ox0 - x : ox1 - x, c0:c1]
