"""The destination of an ingest: ownership, resume, re-ingest in place, partials, sizes."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import numpy as np
import zarr

from tasks.ingest.plan import FORMAT_VERSION, SPARSE_MIN_BYTES, SPARSE_RATIO, IngestPlan
from tasks.ngff import compressors
from tasks.outputs import canonical, delete_owned_store, owned_by_segflow, store_exists
from tasks.records import KEY, OWNER, StoreRecord
from tasks.store import (
    DONE_GROUP,
    attributes,
    check_access,
    every_chunk,
    filesystem,
    is_remote,
    join,
    open_group,
    storage_options,
)
from unet_core.errors import (
    InvalidVolumeError,
    SegflowError,
    StorageError,
    StoreConflictError,
    opt,
)
from unet_core.normalize import (
    IntensityStats,
)

log = logging.getLogger(__name__)


def _compressors(compression: str, dtype: str) -> Any:
    from zarr.codecs import BloscCodec

    if compression == "zstd":
        return compressors()
    if compression == "blosc":
        itemsize = np.dtype(dtype).itemsize
        return BloscCodec(
            cname="zstd",
            clevel=5,
            shuffle="bitshuffle" if itemsize == 1 else "shuffle",
            typesize=itemsize,
        )
    return None


def _is_zarr(url: str) -> bool:
    return bool(filesystem(url).exists(join(url, "zarr.json")))


def _previous_ingest(url: str) -> StoreRecord | None:
    """The root record of DST, when there is a zarr group there."""
    try:
        return StoreRecord.of(open_group(url, "r"))
    except SegflowError:
        return None


def destination(plan: IngestPlan, overwrite: bool, refresh: bool = False) -> str:
    """What an ingest does with DST, decided without writing (before the lease is taken,
    and again under it): ``create`` (absent or empty), ``resume`` (an ingest of the same
    data), ``restart`` (``refresh``: segflow's ingest of this same source, whose file
    changed since: ingested again in place; its labels stay, and their run keys hold the
    image's identity, so they are recomputed only if the content really changed) or
    ``replace`` (``overwrite`` of a store segflow made). Anything else is refused."""
    dst = plan.dst
    check_access(dst)
    if not store_exists(dst):
        return "create"
    previous = _previous_ingest(dst) if owned_by_segflow(dst) else None
    done = (previous.ingest or {}) if previous is not None else {}
    same = previous is not None and done.get("data_key") == plan.data_key
    if same and not overwrite:
        group = open_group(dst, "r")
        arr = group.get("0")
        if (
            isinstance(arr, zarr.Array)
            and tuple(arr.shape) == plan.level0.shape
            and tuple(arr.chunks) == plan.level0.chunks
        ):
            return "resume"
    same_source = (
        previous is not None
        and previous.ingest is not None
        and canonical(previous.source_location or "") == canonical(plan.source.url)
    )
    if refresh and same_source and not overwrite:
        return "restart"
    if not owned_by_segflow(dst):
        what = "a zarr store" if _is_zarr(dst) else "other files"
        raise StoreConflictError(
            f"{dst}: already holds {what} that segflow did not make; it is never "
            f"replaced, not even with {opt('overwrite')}: choose another destination"
        )
    if not overwrite:
        what = "other segflow outputs"
        if previous is not None and previous.source_url:
            what = f"an image ingested from {previous.source_url}"
            if same:
                what = "a damaged ingest of this source"
            elif same_source:
                what = "an ingest of this source with other settings or an older version"
        raise StoreConflictError(
            f"{dst}: already holds {what}; pass {opt('overwrite')} to replace it"
        )
    return "replace"


def _prepare_store(plan: IngestPlan, overwrite: bool, refresh: bool = False) -> bool:
    """Create DST, resume it, ingest again in place or replace it (:func:`destination`).
    True = resume."""
    action = destination(plan, overwrite, refresh)
    if action == "resume":
        return True
    if action == "restart":
        _restart_in_place(plan)
        return False
    if action == "replace":
        delete_owned_store(plan.dst)
    root = open_group(plan.dst, "a")  # "w" would delete the lease beside it
    ingest_record(plan, "incomplete", 0).write(root)
    _create_level0(root, plan)
    return False


def _create_level0(root: zarr.Group, plan: IngestPlan) -> None:
    root.create_array(
        "0",
        shape=plan.level0.shape,
        chunks=plan.level0.chunks,
        dtype=plan.dtype,
        compressors=_compressors(plan.compression, plan.dtype),
        fill_value=0,
        dimension_names=list(plan.axes),
        overwrite=True,
    )


def _restart_in_place(plan: IngestPlan) -> None:
    """Mark DST as an unfinished ingest of the new data, keeping what else it holds."""
    root = open_group(plan.dst, "r+")
    attrs = attributes(root)
    attrs.pop("ome", None)  # not an image again until the new ingest has finished
    before = StoreRecord.of(attrs)
    record = ingest_record(plan, "incomplete", 0)
    if before.image_digest:  # to say at the end whether the pixels changed
        record = record.updated(ingest={**(record.ingest or {}), "replaces": before.image_digest})
    attrs[KEY] = record.updated(files=before.files).dump()  # the files beside it stay
    root.attrs.put(attrs)
    arr = root.get("0")
    if not (
        isinstance(arr, zarr.Array)
        and tuple(arr.shape) == plan.level0.shape
        and tuple(arr.chunks) == plan.level0.chunks
        and arr.dtype == np.dtype(plan.dtype)
    ):
        _create_level0(root, plan)
    log.info(
        "%s: the source file changed since it was ingested (size or time); reading it again",
        plan.dst,
    )


def ingest_record(
    plan: IngestPlan,
    status: str,
    levels: int,
    stats: IntensityStats | None = None,
    digest: str | None = None,
) -> StoreRecord:
    """The root record of an image store: its source, the ingest, and once complete its
    statistics and content digest."""
    src = plan.source
    return StoreRecord(
        created_by=OWNER,
        source={
            **src.identity(),
            "location": canonical(src.url),
            "series_kind": src.series_kind,
            "axes_from": src.axes_from,
            "scale": list(src.scale),
            "unit": src.unit,
        },
        ingest={
            "status": status,
            "data_key": plan.data_key,
            "key": plan.key,
            "chunks": list(plan.level0.chunks),
            "compression": plan.compression,
            "levels": levels,
            "unit_chunks": list(plan.level0.unit_chunks),
            "format": FORMAT_VERSION,
        },
        **({"stats": stats.model_dump()} if stats is not None else {}),
        **({"image_digest": digest} if digest is not None else {}),
    )


def _array(url: str, path: str, mode: str = "r+") -> zarr.Array:
    full = join(url, path)
    return every_chunk(zarr.open_array(full, mode=mode, storage_options=storage_options(full)))


def _partials(dst: str, name: str, shape: tuple[int, ...], dtype: str, key: str) -> zarr.Array:
    """A per-unit side array under segflow-done/, reset when its key or shape changes."""
    root = open_group(dst, "r+")
    group = root.require_group(DONE_GROUP)
    existing = group.get(name)
    if (
        isinstance(existing, zarr.Array)
        and tuple(existing.shape) == shape
        and attributes(existing).get("key") == key
    ):
        return existing
    return group.create_array(
        name,
        shape=shape,
        chunks=(1, shape[1]),
        dtype=dtype,
        fill_value=0,
        compressors=compressors(),
        overwrite=True,
        attributes={"key": key},
    )


def check_sizes(plan: IngestPlan, levels: int = 0, allow_sparse: bool = False) -> None:
    """Refuse, before anything is written, a source that declares far more data than its
    files hold (a crafted or sparse TIFF; ``allow_sparse`` accepts it) and a local
    destination without the free space the image needs (a resumed ingest is not checked).
    """
    src = plan.source
    declared = src.nbytes
    held = sum(f.size for f in src.files)
    if not allow_sparse and declared > max(SPARSE_MIN_BYTES, SPARSE_RATIO * held):
        dims = "×".join(str(n) for n in src.shape)
        raise InvalidVolumeError(
            f"{src.url}: declares {dims} {src.dtype} ({_size(declared)}) but its file"
            f"{'s hold' if len(src.files) > 1 else ' holds'} only {_size(held)}, "
            f"more than {SPARSE_RATIO}:1; pass {opt('allow_sparse')} if the image really is that "
            "sparse"
        )
    if is_remote(plan.dst):
        return
    previous = _previous_ingest(plan.dst) if _is_zarr(plan.dst) else None
    if previous is not None and (previous.ingest or {}).get("data_key") == plan.data_key:
        return
    need = declared if plan.compression == "none" else min(declared, held)
    if levels:
        need = need * 4 // 3  # each level adds at most a quarter of the one above
    parent = os.path.abspath(plan.dst)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise StorageError(
            f"{plan.dst}: the image needs about {_size(need)} but only {_size(free)} are "
            "free there; free space or choose another destination"
        )


def _size(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"
