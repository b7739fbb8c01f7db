"""TIFF volumes as sources that can be read box by box, in any process.

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
import glob
import hashlib
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import numpy as np
import tifffile

from tasks.paths import is_tiff_name
from tasks.store import (
    check_access,
    filesystem,
    is_remote,
    is_transient,
    translate_storage_error,
)
from unet_core.errors import (
    ConfigError,
    InvalidVolumeError,
    SegflowError,
    StorageAccessError,
    VolumeNotFoundError,
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
_JPEG = {6, 7, 34892, 33007}
_GLOB_CHARS = re.compile(r"[*?\[]")
#: Length units found in OME-XML, ImageJ and TIFF tags, in micrometres.
_UNIT_UM = {
    "micrometer": 1.0,
    "micrometre": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "\\u00b5m": 1.0,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "m": 1e6,
    "angstrom": 1e-4,
    "å": 1e-4,
    "picometer": 1e-6,
    "pm": 1e-6,
}
#: TIFF ResolutionUnit values with a physical meaning for microscopy (inch is mostly "72 dpi").
_RESUNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}
#: Largest row band read whole when a box needs only some of its columns.
_BAND_BYTES = 1 << 20
#: Number of files a thread keeps open between boxes.
_CACHE_FILES = 4


# ------------------------------------------------------------------------ descriptors


@dataclass(frozen=True)
class FileId:
    """One source file: its URL, size and version (local: modification time, inode-change
    time and inode, in ns; S3: the ETag)."""

    url: str
    size: int
    version: str


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


# ------------------------------------------------------------------------- opening


def natural_key(text: str) -> list[Any]:
    """Sort key that orders 'z2' before 'z10'."""
    return [int(p) if p.isdigit() else p.lower() for p in re.split(r"(\d+)", text)]


def open_binary(url: str) -> BinaryIO:
    """A seekable binary file for a local path or an s3:// URL."""
    if is_remote(url):
        fs = filesystem(url)
        f: BinaryIO = fs.open(url, "rb", block_size=1 << 20, cache_type="readahead")
        return f
    return open(url, "rb")


def _stat(url: str) -> FileId:
    if is_remote(url):
        try:
            info = filesystem(url).info(url)
        except FileNotFoundError:
            raise VolumeNotFoundError(f"{url}: no such file") from None
        version = str(info.get("ETag") or info.get("LastModified") or "").strip('"')
        return FileId(url, int(info.get("size") or 0), version)
    try:
        st = os.stat(url)
    except OSError as exc:
        raise _os_error(url, exc) from None
    # mtime can be set back (rsync -t, touch -r, coarse timestamps); the inode-change time
    # and the inode cannot: an edited or replaced file has a new version even at equal size
    return FileId(url, int(st.st_size), f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")


def _os_error(url: str, exc: OSError) -> SegflowError:
    return translate_storage_error(exc, url) or InvalidVolumeError(
        f"{url}: cannot be read ({exc.strerror or type(exc).__name__})"
    )


def list_tiff_files(src: str) -> list[str]:
    """Files of a folder (TIFF suffixes only) or of a glob, in natural order.

    A path that exists is a folder, even if its name holds glob characters ('stack[2]');
    only a path that does not exist is expanded as a pattern."""
    remote = is_remote(src)
    if is_glob_pattern(src):
        if remote:
            scheme = src.split("://", 1)[0]
            names = [f"{scheme}://{p}" for p in filesystem(src).glob(src)]
        else:
            names = glob.glob(src)
        names = [n for n in names if not n.endswith("/")]
    else:
        if remote:
            scheme = src.split("://", 1)[0]
            entries = filesystem(src).ls(src, detail=True)
            names = [f"{scheme}://{e['name']}" for e in entries if e.get("type") == "file"]
        else:
            names = [os.path.join(src, n) for n in os.listdir(src)]
            names = [n for n in names if os.path.isfile(n)]
        names = [n for n in names if is_tiff_name(n)]
    return sorted(names, key=natural_key)


def is_glob_pattern(src: str) -> bool:
    """Whether SRC is to be expanded as a glob: it has glob characters and no such path."""
    if not _GLOB_CHARS.search(src):
        return False
    if is_remote(src):
        return not filesystem(src).exists(src)
    return not os.path.lexists(src)


def _resolve(src: str) -> tuple[Literal["tiff", "slices"], list[str]]:
    if is_remote(src):
        check_access(src)
        if is_glob_pattern(src):
            kind: Literal["tiff", "slices"] = "slices"
        else:
            fs = filesystem(src)
            try:
                if fs.isfile(src):
                    return "tiff", [src]
                isdir = fs.isdir(src)
            except PermissionError as exc:
                raise StorageAccessError(f"{src}: access denied ({exc})") from None
            if not isdir:
                raise VolumeNotFoundError(f"{src}: no such file or folder")
            kind = "slices"
    elif is_glob_pattern(src):
        kind = "slices"
    elif os.path.isfile(src):
        return "tiff", [src]
    elif os.path.isdir(src):
        kind = "slices"
    else:
        if os.path.lexists(src):
            _stat(src)  # names why it cannot be used (a symlink loop, no permission)
        raise VolumeNotFoundError(f"{src}: no such file or folder")
    try:
        names = list_tiff_files(src)
    except OSError as exc:
        raise _os_error(src, exc) from None
    if not names:
        what = (
            "matches"
            if kind == "slices" and is_glob_pattern(src)
            else "TIFF files (.tif/.tiff) in the folder"
        )
        raise VolumeNotFoundError(f"{src}: no {what}")
    return kind, names


class _TiffWarnings(logging.Handler):
    """Collects tifffile's warnings in this thread (it logs, rather than raises, on damage)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())

    def damage(self) -> str | None:
        for m in self.messages:
            low = m.lower()
            if any(k in low for k in ("offset", "corrupt", "truncat", "invalid", "eof")):
                return m
        return None


@contextlib.contextmanager
def _watch_tifffile() -> Iterator[_TiffWarnings]:
    log = logging.getLogger("tifffile")
    handler = _TiffWarnings()
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)


class _OpenTiff:
    """One open TIFF file (a thread's private handle) and its first series."""

    def __init__(self, fid: FileId) -> None:
        self.fid = fid
        if fid.size == 0:
            raise InvalidVolumeError(f"{fid.url}: the file is empty (0 bytes)")
        try:
            self.fh = open_binary(fid.url)
        except FileNotFoundError:
            raise VolumeNotFoundError(f"{fid.url}: no such file") from None
        except OSError as exc:
            if is_transient(exc):
                raise
            raise _os_error(fid.url, exc) from None
        try:
            self.tif = tifffile.TiffFile(self.fh, name=os.path.basename(fid.url))
            self.series = self.tif.series[0]
        except Exception as exc:
            self.fh.close()
            raise _tiff_error(fid.url, exc) from None

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.tif.close()
        with contextlib.suppress(Exception):
            self.fh.close()


def _tiff_error(url: str, exc: BaseException) -> SegflowError:
    if isinstance(exc, SegflowError):
        return exc
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("not a TIFF file"):
        return InvalidVolumeError(f"{url}: not a TIFF file")
    if isinstance(exc, PermissionError):
        return StorageAccessError(f"{url}: access denied ({text[:120]})")
    return InvalidVolumeError(f"{url}: the TIFF is truncated or corrupted ({text[:160]})")


_local = threading.local()


def _cached(fid: FileId) -> _OpenTiff:
    cache: OrderedDict[FileId, _OpenTiff] | None = getattr(_local, "files", None)
    if cache is None:
        cache = OrderedDict()
        _local.files = cache
    if fid in cache:
        cache.move_to_end(fid)
        return cache[fid]
    handle = _OpenTiff(fid)
    cache[fid] = handle
    while len(cache) > _CACHE_FILES:
        _, old = cache.popitem(last=False)
        old.close()
    return handle


def release_files() -> None:
    """Close the files this thread keeps open."""
    cache: OrderedDict[FileId, _OpenTiff] | None = getattr(_local, "files", None)
    while cache:
        _, old = cache.popitem(last=False)
        old.close()


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
        source = _with_voxel_size(source, voxel_size)
    return source


def _describe_file(src: str, fid: FileId, axes: str | None) -> TiffSource:
    with _watch_tifffile() as warnings:
        handle = _OpenTiff(fid)
        try:
            series = handle.series
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
            sizes = _physical_sizes(handle.tif, series, kf)
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
                    sizes = _physical_sizes(handle.tif, series, kf)
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
        contiguous_base=contiguous_base,
        series_kind=series_kind,
    )


def _with_voxel_size(source: TiffSource, voxel_size: Sequence[float]) -> TiffSource:
    spatial = [a for a in source.axes if a != "c"]
    values = [float(v) for v in voxel_size]
    if len(values) != len(spatial) or any(not v > 0 for v in values):
        raise ConfigError(
            f"voxel size {tuple(values)} must give {len(spatial)} positive values "
            f"({','.join(spatial)}) in micrometres"
        )
    given = dict(zip(spatial, values, strict=True))
    scale = tuple(1.0 if a == "c" else given[a] for a in source.axes)
    return dataclasses.replace(source, scale=scale, unit="micrometer")


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


def _axes_source(tif: Any, series: Any) -> str:
    kind = str(series.kind)
    if kind in ("ome", "imagej"):
        return kind
    if kind == "shaped" and "Q" not in str(series.axes):
        return "tifffile"  # axes written by tifffile's shaped metadata
    if kind in ("lsm", "stk", "fluoview", "mmstack", "ndtiff", "scanimage", "nih"):
        return kind
    return "none"


_PAGE_LEVEL = {"Y": "y", "X": "x", "S": "c", "Z": "z"}
_META_LETTERS = {"Z": "z", "C": "c", "S": "c", "T": "t"}


def _map_axes(
    url: str,
    saxes: str,
    page_shape: tuple[int, ...],
    kf: Any,
    norm: tuple[int, int, int, int, int],
    user_axes: str | None,
    meta_kind: str,
) -> tuple[tuple[str, ...], str, str]:
    """Output letter of each source dim, the output axes and where they came from."""
    npd = len(page_shape)
    page_level = str(kf.axes)
    expected_page = "".join(_PAGE_LEVEL.get(a, "?") for a in page_level)
    if user_axes is not None:
        ua = user_axes.strip().lower()
        if len(ua) != len(saxes):
            raise ConfigError(
                f"{url}: --axes '{user_axes}' names {len(ua)} axes but the image has "
                f"{len(saxes)} (tifffile reads it as '{saxes}' with shape "
                f"{(*page_shape, *kf.shape)})"
            )
        if ua[npd:] != expected_page:
            raise ConfigError(
                f"{url}: --axes '{user_axes}' must end with '{expected_page}' (the axes "
                f"within one TIFF page, '{page_level}')"
            )
        page_letters = list(ua[:npd])
        from_ = "--axes"
    else:
        page_letters = []
        for a, n in zip(saxes[:npd], page_shape, strict=True):
            letter = _META_LETTERS.get(a) if meta_kind not in ("none",) else None
            if meta_kind == "slices":
                letter = "z"
            if n == 1 and letter in (None, "t"):
                letter = ""  # one page along an unknown axis or one time point: no axis
            if letter is None:
                raise InvalidVolumeError(
                    f"{url}: the axes are ambiguous ({n} pages along '{a}' could be z-slices, "
                    f"channels or time points; the file reads as '{saxes}'), pass --axes, "
                    f"e.g. --axes z{expected_page}"
                )
            page_letters.append(letter)
        from_ = meta_kind if npd else "page"
    for a in page_letters:
        if a not in "cz":
            what = "time series are not supported" if a == "t" else f"unknown axis '{a}'"
            raise InvalidVolumeError(
                f"{url}: {what} (axes '{saxes}'); pass --axes to name each axis z or c"
            )
    s_sep, depth, _rows, _cols, s_contig = norm
    letters = (
        *page_letters,
        "c" if s_sep > 1 else "",
        "z" if depth > 1 else "",
        "y",
        "x",
        "c" if s_contig > 1 else "",
    )
    named = [a for a in letters if a]
    if len(set(named)) != len(named):
        raise InvalidVolumeError(
            f"{url}: axes '{saxes}' name {'channels' if named.count('c') > 1 else 'z'} "
            "twice, which segflow cannot store"
        )
    out_axes = "".join(a for a in "czyx" if a in named)
    return letters, out_axes, from_


def _physical_sizes(tif: Any, series: Any, kf: Any) -> dict[str, float]:
    """Voxel size in micrometres per axis letter z/y/x, where the metadata states it."""
    sizes: dict[str, float] = {}
    with contextlib.suppress(Exception):
        if tif.is_ome and tif.ome_metadata:
            ome = tifffile.xml2dict(tif.ome_metadata).get("OME", {})
            images = ome.get("Image", [])
            images = images if isinstance(images, list) else [images]
            pixels = images[min(int(getattr(series, "_index", 0)), len(images) - 1)]["Pixels"]
            for axis in "XYZ":
                value = pixels.get(f"PhysicalSize{axis}")
                unit = str(pixels.get(f"PhysicalSize{axis}Unit", "µm")).lower()
                if value is not None and unit in _UNIT_UM and float(value) > 0:
                    sizes[axis.lower()] = float(value) * _UNIT_UM[unit]
            return sizes
    with contextlib.suppress(Exception):
        if tif.is_imagej and tif.imagej_metadata is not None:
            meta = tif.imagej_metadata
            unit = str(meta.get("unit", "")).lower()
            factor = _UNIT_UM.get(unit)
            if factor is not None:
                for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                    value = _resolution(kf, tag)
                    if value:
                        sizes[axis] = factor / value
                if meta.get("spacing"):
                    sizes["z"] = float(meta["spacing"]) * factor
            return sizes
    with contextlib.suppress(Exception):
        resunit = int(kf.tags["ResolutionUnit"].value) if "ResolutionUnit" in kf.tags else 2
        factor = _RESUNIT_UM.get(resunit)
        if factor is not None:
            for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                value = _resolution(kf, tag)
                if value:
                    sizes[axis] = factor / value
    return sizes


def _resolution(kf: Any, tag: str) -> float | None:
    if tag not in kf.tags:
        return None
    value = kf.tags[tag].value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    if not num or not den:
        return None
    res = float(num) / float(den)
    return res if res > 0 else None


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
