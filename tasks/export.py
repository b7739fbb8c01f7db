"""Stream a label image (or the image) from an OME-Zarr store into a BigTIFF / OME-TIFF."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tifffile
import zarr

from tasks.blockwise import injected_delay
from tasks.ngff import label_names, read_multiscale
from tasks.outputs import (
    RunInputs,
    adopt_file,
    check_file_target,
    owned_by_segflow,
    owns_file,
)
from tasks.reads import StrictArray
from tasks.runstate import require_complete, set_complete
from tasks.store import LABELS_GROUP, OWNER, filesystem, get_array, is_remote, open_group
from unet_core.errors import InvalidVolumeError

_UNITS = {"micrometer": "µm", "nanometer": "nm", "millimeter": "mm", "angstrom": "Å"}


def export_tiff(
    store: str,
    to: str,
    labels: str | None = "instances",
    compression: str | None = "zlib",
    progress: Callable[[int, int], None] | None = None,
    *,
    owner: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write ``labels/<labels>/0`` (or the image itself when ``labels`` is None) to ``to``.

    Pages are written one z-slab of chunks at a time, so memory stays at one slab however
    large the volume. The file is an OME-TIFF (BigTIFF) with the physical voxel sizes and
    segflow's Software tag (:func:`tasks.outputs.made_by_segflow`), written under a
    temporary name and renamed. ``owner``: the store the file belongs to (a file beside
    it, recorded there, replaced with it); otherwise a file at ``to`` is replaced only
    with ``overwrite`` and only when segflow wrote it. ``to`` is never the store's source
    or inside a store (:func:`tasks.outputs.check_file_target`, before anything is read).
    """
    check_file_target(
        to,
        "beside" if owner else "tiff",
        RunInputs.of(store),
        overwrite=overwrite,
        owner=owner,
        what="export",
    )
    root = open_group(store, "r")
    path = f"{LABELS_GROUP}/{labels}" if labels else ""
    group = root.get(path) if path else root
    if group is None:
        labels_group = root.get(LABELS_GROUP)
        names = label_names(labels_group) if isinstance(labels_group, zarr.Group) else []
        have = f"it has {', '.join(map(str, names))}" if names else "it has no labels"
        raise InvalidVolumeError(f"{store}: there is no label image '{labels}' ({have})")
    if labels:
        require_complete(store, path, f"'{labels}' labels")
    ms = read_multiscale(group, f"{store}/{path}" if path else store)
    arr0 = get_array(root, f"{path}/0" if path else "0", store)
    arr = StrictArray(arr0, store, f"{path}/0" if path else "0")
    axes = ms.axis_names.upper()
    ome: dict[str, Any] = {"axes": axes}
    for axis, s in zip(ms.axes, ms.scale, strict=True):
        if axis.type == "space":
            a = axis.name.upper()
            ome[f"PhysicalSize{a}"] = s
            if axis.unit:
                ome[f"PhysicalSize{a}Unit"] = _UNITS.get(axis.unit, axis.unit)

    def pages() -> Iterator[np.ndarray]:
        depth = arr.shape[0] if arr.ndim == 2 else int(arr.chunks[0])
        if arr.ndim == 2:
            yield arr[...]
            return
        for z in range(0, arr.shape[0], depth):
            injected_delay()
            slab = arr[z : z + depth]
            yield from slab.reshape(-1, *arr.shape[-2:])
            if progress is not None:
                progress(min(z + depth, arr.shape[0]), arr.shape[0])

    local = to
    tmpdir = None
    if is_remote(to):
        tmpdir = tempfile.mkdtemp(prefix="segflow-export-")
        local = os.path.join(tmpdir, os.path.basename(to))
    else:
        os.makedirs(os.path.dirname(os.path.abspath(to)), exist_ok=True)
    partial = f"{local}.partial-{uuid.uuid4().hex[:8]}"  # two exports never share one
    try:
        try:
            with tifffile.TiffWriter(partial, bigtiff=True, ome=True) as tif:
                tif.write(
                    pages(),
                    shape=tuple(arr.shape),
                    dtype=arr.dtype,
                    metadata=ome,
                    compression=compression,
                    software=OWNER,
                )
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(partial)  # never leave a half-written file behind
            raise
        os.replace(partial, local)
        if tmpdir is not None:
            filesystem(to).put(local, to)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    if owner is not None:
        adopt_file(owner, to)
    return to


def export_labels_once(
    store: str,
    to: str,
    labels: str,
    compression: str | None = "zlib",
    progress: Callable[[int, int], None] | None = None,
) -> bool:
    """:func:`export_tiff` of ``labels/<labels>``, skipped when ``to`` already holds it.

    After writing, the label group records the export (its target, the labels' run key,
    the compression and the file's size and modification time). A later call finds that
    record and a file that still matches it, and writes nothing; labels recomputed under
    another key, another compression or a changed or missing file export again. Returns
    whether the existing file was reused. (Only for local files in stores segflow made;
    anything else is exported every time.)"""
    path = f"{LABELS_GROUP}/{labels}"
    made = require_complete(store, path, f"'{labels}' labels")
    record = {"key": made.key, "compression": compression}
    local = not is_remote(to) and owned_by_segflow(store)
    if local and made.key is not None:
        done = made.exports.get(os.path.abspath(to))
        if done is not None and done == {**record, **_file_id(to)} and owns_file(store, to):
            return True
    export_tiff(store, to, labels=labels, compression=compression, progress=progress, owner=store)
    if local and made.key is not None:
        exports = {**made.exports, os.path.abspath(to): {**record, **_file_id(to)}}
        set_complete(store, path, True, exports=exports)
    return False


def _file_id(path: str) -> dict[str, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return {}
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
