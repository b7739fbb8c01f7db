"""TIFF volumes as sources that can be read box by box, in any process: what a source is
(:class:`TiffSource`) and how one is found (files, series, axes, voxel sizes).

A :class:`TiffSource` is a small, picklable description of a TIFF image: its files, how
its pages map onto the output axes ``[c][z]yx`` and where its physical voxel size came
from. It holds no open file: :func:`read_box` opens the file it needs in the calling
thread (a few are cached per thread), so a Dask task receives only the description and
reads exactly the pages and rows of its box::

    file pages (OME/ImageJ order, e.g. Z then C)      one page, normalised by tifffile
    ┌─────┬─────┬─────┬─────┐                        (separate samples, depth, rows, cols,
    │ z0  │ z1  │ z2  │ ... │  ── page-index dims ── contiguous samples)
    └─────┴─────┴─────┴─────┘
                 │ read rows y0:y1 (and columns x0:x1) of each page in the box
                 ▼
    buffer (page-index dims..., S, D, rows, cols, S)  ── transposed view ──▶  [c][z]yx box

Uncompressed pages are read row band by row band straight into the buffer; compressed or
tiled pages decode only the strips or tiles that overlap the box.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from tasks.tiff.files import (
    FileId,
    _OpenTiff,
    _resolve,
    _stat,
    _tiff_error,
    _watch_tifffile,
)
from tasks.tiff.metadata import (
    _axes_source,
    _map_axes,
    _physical_sizes,
    warn_once,
)
from unet_core.errors import (
    ConfigError,
    InvalidVolumeError,
    opt,
)

SUPPORTED_DTYPES = (
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "float16",
    "float32",
    "float64",
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ descriptors


@dataclass(frozen=True)
class TiffSource:
    """What :func:`read_box` needs to read any box of a TIFF image (picklable, no handles).

    The source array has the *page-index* dims (``page_shape``, e.g. Z and C of an OME-TIFF,
    or one dim over the files of a slice folder) followed by tifffile's five normalised page
    dims ``(separate samples, depth, rows, columns, contiguous samples)``. ``dim_letters``
    names, for each of those dims, the output axis it becomes ('' for a dim of length 1).
    """

    url: str
    kind: Literal["tiff", "slices"]
    files: tuple[FileId, ...]
    page_shape: tuple[int, ...]
    page_norm: tuple[int, int, int, int, int]
    dim_letters: tuple[str, ...]
    axes: str
    shape: tuple[int, ...]
    dtype: str
    source_axes: str
    axes_from: str
    scale: tuple[float, ...]
    unit: str | None
    #: the spatial axes whose voxel size the metadata state
    stated: tuple[str, ...] = ()
    #: for a series stored as one run of equal pages (e.g. ImageJ > 4 GiB): offset of page 0
    contiguous_base: int | None = None
    series_kind: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def npages(self) -> int:
        return math.prod(self.page_shape)

    def identity(self) -> dict[str, Any]:
        """What makes this source this source: URL, files (size + version), layout."""
        ident: dict[str, Any] = {
            "url": self.url,
            "kind": self.kind,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "axes": self.axes,
            "source_axes": self.source_axes,
        }
        if self.kind == "tiff":
            f = self.files[0]
            ident.update({"size": f.size, "version": f.version})
        else:
            h = hashlib.sha256()
            for f in self.files:
                h.update(f"{f.url}\0{f.size}\0{f.version}\n".encode())
            ident.update(
                {
                    "files": len(self.files),
                    "first": self.files[0].url,
                    "last": self.files[-1].url,
                    "size": sum(f.size for f in self.files),
                    "digest": h.hexdigest(),
                }
            )
        return ident


# ------------------------------------------------------------------ discovering


def open_source(
    src: str,
    axes: str | None = None,
    voxel_size: Sequence[float] | None = None,
) -> TiffSource:
    """Describe SRC (a TIFF file, a folder or glob of 2D slices; local or s3://).

    Checks everything that can be checked without reading pixels: that every file is a
    TIFF, that no page lies beyond the end of its file, that slices agree in shape and
    dtype, and that the axes are known (from OME/ImageJ/tifffile metadata, else ``axes``).
    ``axes``, when given, overrides the metadata and names the axes of the image as
    tifffile shapes it (e.g. ``zyx``, ``zcyx``, ``yxc`` for RGB).
    """
    kind, names = _resolve(str(src))
    if kind == "tiff":
        source = _describe_file(str(src), _stat(names[0]), axes)
    else:
        source = _describe_slices(str(src), names, axes)
    if voxel_size is not None:
        return _with_voxel_size(source, voxel_size)
    unstated = [a for a in source.axes if a != "c" and a not in source.stated]
    if unstated:
        spatial = ",".join(a.upper() for a in source.axes if a != "c")
        kept = "1 µm" if source.unit else "1 without a unit"
        warn_once(
            source.url,
            f"%s: no voxel size along {', '.join(unstated)} in its metadata; stored as "
            f"{kept}; set it with {opt('voxel_size')} {spatial} (micrometres)",
            source.url,
        )
    return source


def _describe_file(src: str, fid: FileId, axes: str | None) -> TiffSource:
    with _watch_tifffile() as warnings:
        handle = _OpenTiff(fid)
        try:
            series = handle.series
            check_one_image(fid.url, handle.tif)
            kf = series.keyframe
            dtype = _check_dtype(fid.url, series.dtype)
            norm = _norm(kf)
            n_page_level = len(kf.shape)
            sshape, saxes = tuple(series.shape), str(series.axes)
            page_shape = sshape[: len(sshape) - n_page_level]
            if tuple(sshape[len(page_shape) :]) != tuple(kf.shape) or (
                math.prod(page_shape) != len(series) and not series.is_truncated
            ):
                raise InvalidVolumeError(
                    f"{fid.url}: unsupported TIFF layout (series shape {sshape} "
                    f"axes '{saxes}' over {len(series)} pages of shape {tuple(kf.shape)})"
                )
            contiguous_base = None
            if series.is_truncated and math.prod(page_shape) > 1:
                # one IFD describes a run of equal pages (ImageJ hyperstacks > 4 GiB)
                contiguous_base = series.dataoffset
                if contiguous_base is None:
                    raise InvalidVolumeError(f"{fid.url}: unsupported truncated TIFF series")
                end = contiguous_base + series.nbytes
                if end > fid.size:
                    raise InvalidVolumeError(
                        f"{fid.url}: the TIFF is truncated (image data ends at byte {end}, "
                        f"the file has {fid.size})"
                    )
            else:
                _check_pages(fid, series)
            meta_kind = _axes_source(handle.tif, series)
            letters, out_axes, from_ = _map_axes(
                fid.url, saxes, page_shape, kf, norm, axes, meta_kind
            )
            sizes = _physical_sizes(fid.url, handle.tif, series, kf)
        except Exception as exc:
            handle.close()
            raise _tiff_error(fid.url, exc) from None
        handle.close()
        problem = warnings.damage()
    if problem:
        raise InvalidVolumeError(f"{fid.url}: the TIFF is truncated or corrupted ({problem})")
    return _finish(
        src,
        "tiff",
        (fid,),
        page_shape,
        norm,
        letters,
        out_axes,
        dtype,
        saxes,
        from_,
        sizes,
        contiguous_base,
        series.kind,
    )


def _describe_slices(src: str, names: list[str], axes: str | None) -> TiffSource:
    fids: list[FileId] = []
    first: tuple[FileId, tuple[int, ...], str, tuple[int, int, int, int, int]] | None = None
    sizes: dict[str, float] = {}
    kf_axes = ""
    kf0: Any = None
    with _watch_tifffile() as warnings:
        for name in names:
            fid = _stat(name)
            handle = _OpenTiff(fid)
            try:
                series = handle.series
                if len(series) != 1 or len(handle.tif.series) != 1:
                    raise InvalidVolumeError(
                        f"{name}: holds {len(series)} pages; a slice folder needs one 2D "
                        "image per file"
                    )
                kf = series.keyframe
                dtype = _check_dtype(name, series.dtype)
                norm = _norm(kf)
                _check_pages(fid, series)
                if first is None:
                    first = (fid, tuple(kf.shape), dtype, norm)
                    kf_axes = str(kf.axes)
                    kf0 = kf
                    sizes = _physical_sizes(fid.url, handle.tif, series, kf)
                elif tuple(kf.shape) != first[1]:
                    raise InvalidVolumeError(
                        f"{name}: slice shape {tuple(kf.shape)} differs from "
                        f"{first[1]} of {os.path.basename(first[0].url)}"
                    )
                elif dtype != first[2]:
                    raise InvalidVolumeError(
                        f"{name}: slice dtype {dtype} differs from {first[2]} of "
                        f"{os.path.basename(first[0].url)}"
                    )
            except Exception as exc:
                handle.close()
                raise _tiff_error(name, exc) from None
            handle.close()
            fids.append(fid)
            problem = warnings.damage()
            if problem:
                raise InvalidVolumeError(f"{name}: the TIFF is truncated or corrupted ({problem})")
    assert first is not None
    page_shape = (len(fids),) if len(fids) > 1 else ()
    saxes = ("Z" if page_shape else "") + kf_axes
    letters, out_axes, from_ = _map_axes(
        src, saxes, page_shape, kf0, first[3], axes, "slices" if page_shape else "page"
    )
    sizes.pop("z", None)  # slice spacing is not stored in 2D files
    return _finish(
        src,
        "slices",
        tuple(fids),
        page_shape,
        first[3],
        letters,
        out_axes,
        first[2],
        saxes,
        from_,
        sizes,
        None,
        "slices",
    )


def _finish(
    src: str,
    kind: Literal["tiff", "slices"],
    files: tuple[FileId, ...],
    page_shape: tuple[int, ...],
    norm: tuple[int, int, int, int, int],
    letters: tuple[str, ...],
    out_axes: str,
    dtype: str,
    source_axes: str,
    axes_from: str,
    sizes: dict[str, float],
    contiguous_base: int | None,
    series_kind: str,
) -> TiffSource:
    dims = (*page_shape, *norm)
    shape = tuple(dims[letters.index(a)] for a in out_axes)
    scale = tuple(1.0 if a == "c" else float(sizes.get(a, 1.0)) for a in out_axes)
    unit = "micrometer" if any(a in sizes for a in out_axes) else None
    return TiffSource(
        url=src,
        kind=kind,
        files=files,
        page_shape=page_shape,
        page_norm=norm,
        dim_letters=letters,
        axes=out_axes,
        shape=shape,
        dtype=dtype,
        source_axes=source_axes,
        axes_from=axes_from,
        scale=scale,
        unit=unit,
        stated=tuple(a for a in out_axes if a in sizes),
        contiguous_base=contiguous_base,
        series_kind=series_kind,
    )


def _with_voxel_size(source: TiffSource, voxel_size: Sequence[float]) -> TiffSource:
    spatial = [a for a in source.axes if a != "c"]
    values = [float(v) for v in voxel_size]
    given = ",".join(f"{v:g}" for v in values)
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ConfigError(
            f"--voxel-size {given}: {bad[0]:g} is not a voxel size (each value must be "
            "finite and > 0, in micrometres)"
        )
    if len(values) != len(spatial):
        raise ConfigError(
            f"--voxel-size {given} must give {len(spatial)} positive values "
            f"({','.join(spatial)}) in micrometres"
        )
    per_axis = dict(zip(spatial, values, strict=True))
    scale = tuple(1.0 if a == "c" else per_axis[a] for a in source.axes)
    return dataclasses.replace(source, scale=scale, unit="micrometer", stated=tuple(spatial))


def check_one_image(url: str, tif: Any) -> None:
    """Refuse a file that holds more than one image: tifffile's first series would be read
    and the rest left out. Series of reduced-resolution copies (LSM thumbnails) do not
    count; pyramid levels are not series. The sentence says what differs: a page of another
    shape or type than page 0, else why the equal pages are several series."""
    main = [s for s in tif.series if not _is_reduced(s)]
    if len(main) <= 1:
        return
    first = main[0].keyframe
    for series in main[1:]:
        kf = series.keyframe
        if tuple(kf.shape) != tuple(first.shape) or kf.dtype != first.dtype:
            raise InvalidVolumeError(
                f"{url}: page {_page_index(kf)} is {_page_text(kf)} but page "
                f"{_page_index(first)} is {_page_text(first)}; segflow reads one image of "
                "equal pages per file"
            )
    kinds = {str(s.kind) for s in main}
    fix = "write the stack with one write() call, or as a folder of 2D slices"
    if kinds == {"ome"}:
        why, fix = "its OME metadata describes that many images", "save one image per file"
    elif kinds <= {"shaped", "uniform"}:
        why = "tifffile wrote each write() call as its own series"
    else:
        why = "its pages differ in how they are stored, e.g. compression or tiles"
    raise InvalidVolumeError(
        f"{url}: holds {len(main)} series ({why}) of {_page_text(first)} pages, and segflow "
        f"reads one image per file; {fix}"
    )


def _is_reduced(series: Any) -> bool:
    with contextlib.suppress(Exception):
        return bool(series.keyframe.is_reduced)
    return False


def _page_index(kf: Any) -> str:
    index = getattr(kf, "index", "?")
    return ".".join(map(str, index)) if isinstance(index, tuple) else str(index)


def _page_text(kf: Any) -> str:
    return f"{'×'.join(map(str, kf.shape))} {np.dtype(kf.dtype) if kf.dtype else '?'}"


def _check_dtype(url: str, dtype: Any) -> str:
    name = str(np.dtype(dtype)) if dtype is not None else "unknown"
    if name not in SUPPORTED_DTYPES:
        raise InvalidVolumeError(
            f"{url}: pixel type {name} is not supported (use one of {', '.join(SUPPORTED_DTYPES)})"
        )
    return name


def _norm(kf: Any) -> tuple[int, int, int, int, int]:
    s = tuple(int(n) for n in kf.shaped)
    if len(s) != 5:
        raise InvalidVolumeError(f"unexpected page shape {s}")
    return (s[0], s[1], s[2], s[3], s[4])


def _check_pages(fid: FileId, series: Any) -> None:
    """Every page is present and its data lies inside the file."""
    for i, page in enumerate(series):
        if page is None:
            raise InvalidVolumeError(f"{fid.url}: page {i} of the image is missing")
        ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
        if not page.dataoffsets or (ends and max(ends) > fid.size):
            raise InvalidVolumeError(
                f"{fid.url}: the TIFF is truncated (page {i} needs bytes up to "
                f"{max(ends) if ends else '?'}, the file has {fid.size})"
            )
