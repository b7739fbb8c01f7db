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
import stat
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
#: What a voxel size from the metadata that is not finite and positive becomes.
FALLBACK_VOXEL_SIZE = 1.0

log = logging.getLogger(__name__)


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
    _refuse_special(url, st.st_mode)
    # mtime can be set back (rsync -t, touch -r, coarse timestamps); the inode-change time
    # and the inode cannot: an edited or replaced file has a new version even at equal size
    return FileId(url, int(st.st_size), f"{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")


#: Kinds of file that are neither regular files nor folders, by their ``stat`` test.
_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def special_file(path: str) -> str | None:
    """What a local PATH is when it is neither a regular file nor a folder (``"a FIFO
    (named pipe)"``, ``"a character device"``, ...), or None (also when it does not exist).
    Looks at ``os.stat`` only, so it never blocks on a pipe or reads a device."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return next((what for test, what in _SPECIAL if test(mode)), None)


def check_regular_file(path: str) -> None:
    """Refuse a local PATH that is a FIFO, a device or a socket, in one sentence naming
    it, before anything opens it (opening a pipe blocks; reading a device never ends)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return  # the caller names a missing or unreadable file
    _refuse_special(path, mode)


def _refuse_special(url: str, mode: int) -> None:
    for test, what in _SPECIAL:
        if test(mode):
            link = f" (a link to {os.path.realpath(url)})" if os.path.islink(url) else ""
            raise InvalidVolumeError(f"{url}: is {what}{link}, not a regular file")


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
            # FIFOs and devices stay in, to be refused by name (_stat), not skipped
            names = [n for n in names if os.path.isfile(n) or special_file(n) is not None]
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
    return dataclasses.replace(source, scale=scale, unit="micrometer")


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
                f"{url}: {opt('axes')} '{user_axes}' names {len(ua)} axes but the image has "
                f"{len(saxes)} (tifffile reads it as '{saxes}' with shape "
                f"{(*page_shape, *kf.shape)})"
            )
        if ua[npd:] != expected_page:
            raise ConfigError(
                f"{url}: {opt('axes')} '{user_axes}' must end with '{expected_page}' (the axes "
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
            if letter is None and meta_kind == "none" and npd == 1 and expected_page == "yx":
                # a stack of single-channel planes with no axis metadata at all (a plain
                # tifffile.imwrite(path, volume)): the planes are z-slices
                letter = "z"
                logging.getLogger(__name__).warning(
                    "%s: no axis metadata; its %d pages are read as z-slices (ZYX); name "
                    "the axes to say otherwise",
                    url,
                    n,
                )
            if letter is None:
                raise InvalidVolumeError(
                    f"{url}: the axes are ambiguous ({n} pages along '{a}' could be z-slices, "
                    f"channels or time points; the file reads as '{saxes}'), pass {opt('axes')}, "
                    f"e.g. {opt('axes')} z{expected_page}"
                )
            page_letters.append(letter)
        from_ = meta_kind if npd else "page"
    for a in page_letters:
        if a not in "cz":
            what = "time series are not supported" if a == "t" else f"unknown axis '{a}'"
            raise InvalidVolumeError(
                f"{url}: {what} (axes '{saxes}'); pass {opt('axes')} to name each axis z or c"
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


def _physical_sizes(url: str, tif: Any, series: Any, kf: Any) -> dict[str, float]:
    """Voxel size in micrometres per axis letter z/y/x, where the metadata states it.

    A stated size that is not a finite positive number (OME ``PhysicalSizeX="INF"``, 0, a
    negative or NaN size, a resolution tag of 0) is left out, so the axis gets
    :data:`FALLBACK_VOXEL_SIZE`, with one warning naming the file, the axis and the value."""
    sizes: dict[str, float] = {}

    def take(axis: str, value: Any, factor: float, where: str) -> None:
        try:
            size = float(value) * factor
        except (TypeError, ValueError, OverflowError):
            size = math.nan
        if math.isfinite(size) and size > 0:
            sizes[axis] = size
        else:
            log.warning(
                "%s: the metadata gives voxel size %s for axis %s (%s), which is not a "
                "finite positive number; using %s µm",
                url,
                value,
                axis,
                where,
                FALLBACK_VOXEL_SIZE,
            )

    with contextlib.suppress(Exception):
        if tif.is_ome and tif.ome_metadata:
            ome = tifffile.xml2dict(tif.ome_metadata).get("OME", {})
            images = ome.get("Image", [])
            images = images if isinstance(images, list) else [images]
            pixels = images[min(int(getattr(series, "_index", 0)), len(images) - 1)]["Pixels"]
            for axis in "XYZ":
                value = pixels.get(f"PhysicalSize{axis}")
                unit = str(pixels.get(f"PhysicalSize{axis}Unit", "µm")).lower()
                if value is not None and unit in _UNIT_UM:
                    take(axis.lower(), value, _UNIT_UM[unit], f"OME PhysicalSize{axis}")
            return sizes
    with contextlib.suppress(Exception):
        if tif.is_imagej and tif.imagej_metadata is not None:
            meta = tif.imagej_metadata
            unit = str(meta.get("unit", "")).lower()
            factor = _UNIT_UM.get(unit)
            if factor is not None:
                for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                    _take_resolution(take, axis, kf, tag, factor)
                if "spacing" in meta:
                    take("z", meta["spacing"], factor, "ImageJ spacing")
            return sizes
    with contextlib.suppress(Exception):
        resunit = int(kf.tags["ResolutionUnit"].value) if "ResolutionUnit" in kf.tags else 2
        factor = _RESUNIT_UM.get(resunit)
        if factor is not None:
            for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                _take_resolution(take, axis, kf, tag, factor)
    return sizes


def _take_resolution(take: Any, axis: str, kf: Any, tag: str, factor: float) -> None:
    """Voxel size from a resolution tag (pixels per unit): ``factor / resolution``."""
    if tag not in kf.tags:
        return
    value = kf.tags[tag].value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.float64(num) / np.float64(den)
        size = np.float64(factor) / res
    take(axis, size, 1.0, f"{tag} {num}/{den}")


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
