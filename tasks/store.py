"""Where segflow keeps things in an OME-Zarr store, and how it opens stores.

Layout of an image store (zarr v3, OME-NGFF 0.5)::

    image.ome.zarr/                 group: ome.multiscales (axes, scales), segflow.* metadata
      0/ 1/ ...                     image pyramid, axes ([c,] [z,] y, x), channel first
      labels/                       group: ome.labels = ["semantic", "instances", ...]
        semantic/0 ...              argmax class ids (uint8), ome.image-label
        instances/0 ...             connected components (uint32/uint64)
      probabilities/0               class probabilities (c, [z,] y, x), when asked
      segflow-done/<step>           done markers, one zarr chunk per block (tasks.blockwise)

The image group's ``segflow`` attribute holds ``source`` (identity of what was ingested),
``stats`` (global intensity statistics, :class:`unet_core.IntensityStats`) and ``ingest``
parameters. Stores are local paths or ``s3://bucket/prefix`` URLs (s3fs); S3 settings
come from the usual ``AWS_*`` environment variables (``AWS_ENDPOINT_URL`` included).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
import zarr.errors

from tasks.ngff import Multiscale, add_label, compressors, image_ome, is_image, label_ome
from tasks.paths import is_remote, is_tiff_name, is_zarr_name, volume_name
from tasks.records import OWNER, OutputRecord, StoreRecord
from tasks.storage_errors import (
    _brief,
    _chain,
    _store_error,
    is_transient,
    translate_storage_error,
)
from unet_core.errors import (
    InvalidVolumeError,
    SegflowError,
    VolumeNotFoundError,
)
from unet_core.normalize import IntensityStats

SPACE_AXES = ("z", "y", "x")
DONE_GROUP = "segflow-done"
LABELS_GROUP = "labels"
PROBABILITIES_GROUP = "probabilities"


def storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options for a URL: S3 endpoint/credentials from the environment."""
    if not str(url).startswith("s3://"):
        return None
    opts: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def filesystem(url: str) -> Any:
    """The fsspec filesystem for a URL (local or s3)."""
    import fsspec

    protocol = str(url).split("://", 1)[0] if is_remote(url) else "file"
    return fsspec.filesystem(protocol, **(storage_options(url) or {}))


def join(url: str, *parts: str) -> str:
    base = str(url).rstrip("/")
    return "/".join([base, *(p.strip("/") for p in parts if p)])


def read_region(arr: zarr.Array, selection: tuple[slice, ...], url: str) -> np.ndarray:
    """``arr[selection]`` as NumPy; a failure names the store and the damaged chunk.

    A transient failure is raised unchanged (the runner retries it); any other storage
    failure becomes a segflow error naming ``url``/``<array path>/<chunk key>`` of the
    first chunk of the selection that cannot be read.
    """
    try:
        return np.asarray(arr[selection])
    except Exception as exc:
        if isinstance(exc, SegflowError) or is_transient(exc):
            raise
        where = join(url, arr.path) if arr.path else str(url)
        key = _unreadable_chunk(arr, selection)
        if key is not None:
            where = join(where, key)
        err = translate_storage_error(exc, where)
        if err is None:
            raise
        raise err from exc


def _unreadable_chunk(arr: zarr.Array, selection: tuple[slice, ...]) -> str | None:
    """Key of the first chunk under ``selection`` that cannot be read (at most 256 tried)."""
    ranges = []
    for sl, n, c in zip(selection, arr.shape, arr.chunks, strict=False):
        start, stop, _ = sl.indices(n)
        ranges.append(range(start // c, max(stop - 1, start) // c + 1))
    for tried, index in enumerate(itertools.product(*ranges)):
        if tried >= 256:
            break
        box = tuple(
            slice(i * c, min((i + 1) * c, n))
            for i, c, n in zip(index, arr.chunks, arr.shape, strict=False)
        )
        try:
            arr[box]
        except Exception:
            return str(arr.metadata.encode_chunk_key(index))
    return None


def open_group(url: str, mode: str = "r") -> zarr.Group:
    """Open a zarr v3 group at a local path or URL with clear errors.

    ``mode`` as in :func:`zarr.open_group`; with ``"r"`` and ``"r+"`` the group must exist.
    """
    url = str(url)
    if mode in ("r", "r+") and not is_remote(url) and not os.path.exists(url):
        raise VolumeNotFoundError(f"{url}: no such store")
    try:
        return zarr.open_group(url, mode=mode, storage_options=storage_options(url))  # type: ignore[arg-type]
    except Exception as exc:
        if isinstance(exc, SegflowError):
            raise
        if isinstance(exc, FileNotFoundError | zarr.errors.GroupNotFoundError):
            raise VolumeNotFoundError(f"{url}: no such store") from exc
        raise _node_error(url, "", exc) from exc


def check_access(url: str) -> None:
    """Fail early with one clear sentence if a remote location cannot be reached."""
    if not is_remote(url):
        return
    fs = filesystem(url)
    path = str(url).split("://", 1)[1]
    bucket = path.split("/", 1)[0]
    try:
        fs.ls(bucket, refresh=True)
    except Exception as exc:
        raise _store_error(url, exc) from exc


@dataclass(frozen=True)
class ImageInfo:
    """What the engine needs to know about an OME-Zarr image (a descriptor, no data)."""

    url: str
    axes: str  # e.g. "czyx", "zyx", "yx"
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    scale: tuple[float, ...]  # physical size per axis of level 0
    unit: str | None
    stats: IntensityStats | None

    @property
    def spatial_axes(self) -> str:
        return "".join(a for a in self.axes if a in SPACE_AXES)

    @property
    def channel_axis(self) -> int | None:
        return self.axes.index("c") if "c" in self.axes else None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(n for a, n in zip(self.axes, self.shape, strict=True) if a in SPACE_AXES)

    @property
    def spatial_scale(self) -> tuple[float, ...]:
        return tuple(s for a, s in zip(self.axes, self.scale, strict=True) if a in SPACE_AXES)

    @property
    def n_channels(self) -> int:
        c = self.channel_axis
        return 1 if c is None else self.shape[c]

    @property
    def name(self) -> str:
        return volume_name(self.url)


def read_image_info(url: str) -> ImageInfo:
    """Read the NGFF metadata of an image group and describe its level 0."""
    group = open_group(url, "r")
    attrs = attributes(group)
    record = StoreRecord.of(attrs)
    if not is_image(group) and record.ingest_status == "incomplete":
        raise InvalidVolumeError(
            f"{url}: the ingest into this store has not finished "
            "(run `segflow ingest` again to complete it)"
        )
    ms = Multiscale.from_attrs(attrs, url)
    axes = ms.axis_names
    allowed = set("czyx")
    if set(axes) - allowed or len(set(axes)) != len(axes):
        raise InvalidVolumeError(
            f"{url}: unsupported axes '{axes}' "
            "(segflow reads c, z, y, x; time series are not supported)"
        )
    if axes.replace("c", "") not in ("zyx", "yx") or ("c" in axes and axes[0] != "c"):
        raise InvalidVolumeError(f"{url}: unsupported axis order '{axes}' (expected [c][z]yx)")
    path = ms.datasets[0].path
    try:
        arr = group[path]
    except KeyError:
        raise InvalidVolumeError(
            f"{url}: level '{path}' named in the metadata is missing"
        ) from None
    except Exception as exc:
        raise _node_error(url, path, exc) from exc
    if not isinstance(arr, zarr.Array):
        raise InvalidVolumeError(f"{url}: '{path}' is not an array")
    if arr.ndim != len(axes):
        raise InvalidVolumeError(
            f"{url}: array has {arr.ndim} axes but the metadata names {len(axes)}"
        )
    stats = record.stats
    return ImageInfo(
        url=str(url),
        axes=axes,
        shape=tuple(int(n) for n in arr.shape),
        chunks=tuple(int(c) for c in arr.chunks),
        dtype=str(arr.dtype),
        scale=ms.scale,
        unit=ms.unit,
        stats=IntensityStats.model_validate(stats) if stats else None,
    )


def attributes(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """A node's attributes as a plain dict (JSON values, typed loosely)."""
    return dict(node.attrs.asdict())


def _node_error(url: str, path: str, exc: BaseException) -> SegflowError:
    """The error of opening node ``path`` of the store at ``url`` (a damaged zarr.json is
    named as such)."""
    if any(isinstance(e, json.JSONDecodeError) for e in _chain(exc)):
        return InvalidVolumeError(
            f"{join(url, path, 'zarr.json')}: the zarr metadata is damaged ({_brief(exc)})"
        )
    return _store_error(join(url, path), exc)


def get_array(group: zarr.Group, path: str, url: str = "") -> zarr.Array:
    """``group[path]`` as an array, with a clear error if it is missing or a group."""
    where = url or str(group.store)
    try:
        node = group[path]
    except KeyError:
        raise InvalidVolumeError(f"{where}: '{path}' is missing") from None
    except Exception as exc:
        raise _node_error(where, path, exc) from exc
    if not isinstance(node, zarr.Array):
        raise InvalidVolumeError(f"{url or group.store}: '{path}' is not an array")
    return node


def every_chunk(arr: zarr.Array) -> zarr.Array:
    """The array, configured to store every chunk it writes, even one of only zeros.

    segflow writes every chunk of its outputs, so a missing chunk means damage (see
    :class:`tasks.reads.StrictArray`), never "empty"; it also spares zarr a comparison
    of each chunk with the fill value."""
    return arr.with_config({"write_empty_chunks": True})


def open_level(info: ImageInfo, level: str = "0", mode: str = "r") -> zarr.Array:
    return get_array(open_group(info.url, mode), level, info.url)


def listing_digest(url: str, path: str = "0") -> str:
    """Identity of an array as it is stored now: its chunk names and sizes with their
    modification times in ns (local) or ETags (S3). Times and sizes only: a store copied
    with its times kept (``cp -a``, ``rsync -a``, a restore) is the same store, while any
    write through zarr (or another tool) changes the time of the chunks it wrote."""
    base = join(url, path)
    h = hashlib.sha256()
    if is_remote(url):
        fs = filesystem(url)
        try:
            entries = fs.find(base, detail=True)
        except FileNotFoundError:
            entries = {}
        for name in sorted(entries):
            e = entries[name]
            rel = name[len(base.split("://", 1)[-1]) :]
            stamp = e.get("ETag") or e.get("etag") or e.get("LastModified") or ""
            h.update(f"{rel}\t{e.get('size')}\t{stamp}\n".encode())
    else:
        for rel, st in sorted(_walk(base)):
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return "list-" + h.hexdigest()[:32]


def _walk(base: str, rel: str = "") -> list[tuple[str, os.stat_result]]:
    out: list[tuple[str, os.stat_result]] = []
    try:
        entries = list(os.scandir(os.path.join(base, rel) if rel else base))
    except (FileNotFoundError, NotADirectoryError):
        return out
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_dir(follow_symlinks=False):
            out += _walk(base, name)
        else:
            out.append((name, entry.stat(follow_symlinks=False)))
    return out


def is_tiff_source(source: str) -> bool:
    """A TIFF file, slice folder or glob (to ingest first) rather than a zarr group."""
    s = str(source).rstrip("/")
    if is_zarr_name(s):
        return False
    if "*" in s or is_tiff_name(s):
        return True
    return not filesystem(s).exists(f"{s}/zarr.json")


def data_digest(data: np.ndarray) -> str:
    """Identity of an in-memory image (written by :func:`tasks.store.write_image`)."""
    h = hashlib.sha256()
    h.update(f"{data.shape}|{data.dtype.str}".encode())
    h.update(np.ascontiguousarray(data).data)
    return "data-" + h.hexdigest()[:32]


def write_image(
    url: str,
    data: np.ndarray,
    axes: str,
    chunks: Sequence[int] | None = None,
    scale: Sequence[float] | None = None,
    unit: str | None = "micrometer",
    with_stats: bool = True,
) -> ImageInfo:
    """Write an in-memory array as a single-level OME-Zarr image (replacing ``url``).

    For arrays that fit in memory (tests, examples, small results); TIFF volumes of any
    size go through the streaming ingest instead.
    """
    from unet_core.normalize import compute_stats

    if len(axes) != data.ndim:
        raise InvalidVolumeError(f"{url}: axes '{axes}' do not match an array of {data.ndim} axes")
    chunks = tuple(chunks) if chunks else tuple(min(n, 64) for n in data.shape)
    if "c" in axes and len(chunks) == data.ndim - 1:
        chunks = (data.shape[axes.index("c")], *chunks)
    root = open_group(url, "w")
    root.create_array(
        "0",
        shape=data.shape,
        chunks=chunks,
        dtype=data.dtype,
        fill_value=0,
        compressors=compressors(),
        dimension_names=list(axes),
    )[...] = data
    full_scale = list(scale) if scale else [1.0] * len(axes)
    record = StoreRecord(
        created_by=OWNER,
        image_digest=data_digest(data),
        image_listing=listing_digest(url),
        stats=compute_stats(data).model_dump() if with_stats else None,
    )
    root.attrs.update({"ome": image_ome(Multiscale.build(axes, full_scale, unit=unit))})
    record.write(root)
    return read_image_info(url)


def write_labels(
    url: str,
    name: str,
    data: np.ndarray,
    chunks: Sequence[int] | None = None,
    key: str = "in-memory",
) -> None:
    """Write an in-memory label image ``name`` (complete, under ``key``) into the image
    store at ``url``, as :func:`write_image` writes an image (tests, examples)."""
    root = open_group(url, "r+")
    labels = root.require_group(LABELS_GROUP)
    add_label(labels, name)
    group = labels.require_group(name)
    ms = Multiscale.from_attrs(attributes(root), url)
    group.attrs.update({"ome": label_ome(ms, {"image": "../../"})})
    OutputRecord(key=key, complete=True).write(group)
    axes = ms.axis_names.replace("c", "")
    arr = group.create_array(
        "0",
        shape=data.shape,
        chunks=tuple(chunks) if chunks else tuple(min(n, 64) for n in data.shape),
        dtype=data.dtype,
        fill_value=0,
        compressors=compressors(),
        dimension_names=list(axes[-data.ndim :]),
        overwrite=True,
    )
    every_chunk(arr)[...] = data
