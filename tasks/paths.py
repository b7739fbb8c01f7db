"""Path conventions: which names are TIFF volumes or zarr stores, and where stores go.

- A **TIFF** is a name ending in one of :data:`TIFF_SUFFIXES` (any case); OME-TIFFs end in
  ``.ome.tif``/``.ome.tiff``. A **zarr store** ends in ``.zarr`` (``.ome.zarr`` for images).
- The **volume name** of a source is its last path element without those suffixes:
  ``/data/a.ome.tif`` -> ``a``, ``s3://b/run/img.ome.zarr`` -> ``img``, ``slices/`` -> ``slices``.
- A TIFF source is ingested **beside** itself, into ``<folder>/<volume name>.ome.zarr``.
- Files beside a store (object tables, previews) are ``<store without .ome.zarr>.<what>``.
- A **nightly** run writes the store of inbox entry ``<entry>`` to
  ``<output>/<entry>.ome.zarr``: the entry's whole name, suffix included, so that ``a.tif``
  and ``a.zarr`` (or ``c.tif`` and ``c.tiff``) in one inbox get different stores
  (``a.tif.ome.zarr``, ``a.zarr.ome.zarr``). Entry names in one folder are unique, so the
  output names are too, and an entry's output name never depends on what else is there.
"""

from __future__ import annotations

import os
import re
import stat

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
ZARR_SUFFIXES = (".ome.zarr", ".zarr")
STORE_SUFFIX = ".ome.zarr"
#: A label image's name: one path element, never ``.`` or ``..`` (checked before any write).
LABEL_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$"

# Longest first, so that ".ome.tif" is stripped whole rather than as ".tif".
_VOLUME_SUFFIXES = (*ZARR_SUFFIXES, *OME_TIFF_SUFFIXES, *TIFF_SUFFIXES)


def is_remote(url: str) -> bool:
    """A URL of a remote store (``s3://...``) rather than a local path."""
    return "://" in str(url) and not str(url).startswith("file://")


def basename(source: str) -> str:
    """The last element of a path or URL (a trailing slash ignored)."""
    return str(source).rstrip("/").rsplit("/", 1)[-1]


def is_tiff_name(name: str) -> bool:
    return str(name).rstrip("/").lower().endswith(TIFF_SUFFIXES)


def is_zarr_name(name: str) -> bool:
    return str(name).rstrip("/").lower().endswith(".zarr")


def _strip(name: str, suffixes: tuple[str, ...]) -> str:
    lowered = name.lower()
    for suffix in suffixes:
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def volume_name(source: str) -> str:
    """A source's name without its TIFF or zarr suffix (see the module docstring)."""
    return _strip(basename(source), _VOLUME_SUFFIXES)


def store_beside(source: str) -> str:
    """Where a TIFF source is ingested: ``<its folder>/<volume name>.ome.zarr``."""
    s = str(source).rstrip("/")
    folder = s[: s.rindex("/") + 1] if "/" in s else ""
    return f"{folder}{volume_name(s)}{STORE_SUFFIX}"


def beside_store(store: str, what: str) -> str:
    """A file beside a store: ``beside_store("d/a.ome.zarr", "preview.png")`` is
    ``d/a.preview.png``."""
    return f"{_strip(str(store).rstrip('/'), ZARR_SUFFIXES)}.{what}"


def table_paths(store: str, name: str) -> tuple[str, str]:
    """Object table files beside the store: ``<store without .ome.zarr>.<name>.csv|parquet``."""
    return beside_store(store, f"{name}.csv"), beside_store(store, f"{name}.parquet")


def nightly_store(output: str, entry: str) -> str:
    """The store of inbox entry ``entry`` in the output location: ``<output>/<entry>.ome.zarr``."""
    return f"{str(output).rstrip('/')}/{basename(entry)}{STORE_SUFFIX}"


def split_labels_path(path: str, name: str | None = None) -> tuple[str, str | None]:
    """A store and the name of one of its label images, from what a user types: ``STORE``
    (the name, if any, given apart), ``STORE/labels/NAME`` or ``STORE/labels/NAME/0`` (the
    array path ``segment`` and ``stitch`` print). A name in the path and a different one
    given apart is an error."""
    text = str(path).rstrip("/")
    match = re.fullmatch(r"(.+)/labels/([^/]+?)(?:/0)?", text)
    if match is None:
        return text, name
    store, found = match.group(1), match.group(2)
    if name is not None and name != found:
        from unet_core.errors import ConfigError, opt

        raise ConfigError(f"{path} names the labels '{found}' but {opt('labels')} says '{name}'")
    return store, found


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
    refuse_special(path, mode)


def refuse_special(url: str, mode: int) -> None:
    """Refuse a file whose ``stat`` mode is that of a FIFO, a device or a socket."""
    from unet_core.errors import InvalidVolumeError

    for test, what in _SPECIAL:
        if test(mode):
            link = f" (a link to {os.path.realpath(url)})" if os.path.islink(url) else ""
            raise InvalidVolumeError(f"{url}: is {what}{link}, not a regular file")
