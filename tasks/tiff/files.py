"""TIFF files as a source reads them: names (a file, a folder or glob of slices), their
versions (size and times, or ETags), and open handles cached per thread (tifffile's
warnings caught per file, its errors as one sentence naming the file)."""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

import tifffile

from tasks.paths import is_tiff_name, refuse_special, special_file
from tasks.store import (
    check_access,
    filesystem,
    is_remote,
    is_transient,
    translate_storage_error,
)
from unet_core.errors import (
    InvalidVolumeError,
    SegflowError,
    StorageAccessError,
    VolumeNotFoundError,
)

_GLOB_CHARS = re.compile(r"[*?\[]")
#: Number of files a thread keeps open between boxes.
_CACHE_FILES = 4

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ descriptors


@dataclass(frozen=True)
class FileId:
    """One source file: its URL, size and version (local: modification time, inode-change
    time and inode, in ns; S3: the ETag)."""

    url: str
    size: int
    version: str


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
    refuse_special(url, st.st_mode)
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
