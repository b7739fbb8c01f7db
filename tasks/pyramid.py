"""Label pyramids that match the image's levels (nearest voxel, never averaged ids)."""

from __future__ import annotations

import dask.array as da
import zarr

from tasks.ngff import compressors, read_multiscale, write_multiscale
from tasks.store import LABELS_GROUP, get_array, open_group
from unet_core.errors import InvalidVolumeError


def image_levels(image_url: str) -> list[tuple[tuple[float, ...], tuple[int, ...]]]:
    """(spatial scale, spatial shape) of every level of an image, level 0 first."""
    root = open_group(image_url, "r")
    ms = read_multiscale(root, image_url)
    spatial = [i for i, a in enumerate(ms.axes) if a.type == "space"]
    out = []
    for ds in ms.datasets:
        arr = get_array(root, ds.path, image_url)
        out.append((tuple(ds.scale[i] for i in spatial), tuple(int(arr.shape[i]) for i in spatial)))
    return out


def write_label_levels(store: str, name: str, image_url: str) -> int:
    """Add levels 1.. to ``labels/<name>`` matching the image's levels; returns their count.

    Each level takes every f-th voxel of the level above (f = the image's scale ratio), so
    ids are never mixed. Level 0 must exist; metadata scales follow the image's.
    """
    levels = image_levels(image_url)
    group = open_group(store, "r+")[f"{LABELS_GROUP}/{name}"]
    if not isinstance(group, zarr.Group):
        raise InvalidVolumeError(f"{store}: {LABELS_GROUP}/{name} is not a group")
    base = get_array(group, "0", store)
    if tuple(base.shape) != levels[0][1]:
        return 0
    prev = base
    for lvl in range(1, len(levels)):
        factors = tuple(
            max(1, round(b / a)) for a, b in zip(levels[lvl - 1][0], levels[lvl][0], strict=True)
        )
        src = da.from_zarr(prev)
        down = src[tuple(slice(None, None, f) for f in factors)]
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, down.shape, strict=True))
        arr = group.create_array(
            str(lvl),
            shape=down.shape,
            chunks=chunks,
            dtype=base.dtype,
            fill_value=0,
            compressors=compressors(),
            dimension_names=getattr(base.metadata, "dimension_names", None),
            overwrite=True,
        )
        da.to_zarr(down.rechunk(chunks), arr)
        prev = arr
    where = f"{store}/{LABELS_GROUP}/{name}"
    ms = read_multiscale(group, where)
    write_multiscale(group, ms.with_scales([s for s, _ in levels]), where)
    return len(levels) - 1
