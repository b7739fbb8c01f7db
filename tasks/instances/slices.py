"""Instances of a stack segmented slice by slice: slice objects linked by overlap, blockwise.

The algorithm is :mod:`unet_core.slicelink` (its :func:`~unet_core.slicelink.link_instances`
is the whole-volume reference); this module runs it on a chunked store and gives the same
partition for any chunking, because everything it decides from is a sum over voxels:

1. **label** — :func:`tasks.instances.components.label_chunk` with an in-plane structure:
   every chunk labels the 2D components of each of its slices (local ids) into the scratch
   array.
2. **faces** — :func:`tasks.instances.components.face_pairs` along y and x: fragments of one slice
   object in neighbouring chunks. **tables** — :func:`slice_tables` per chunk: each local
   object's slice, area, intensity sum and key, and the voxels shared by objects of
   consecutive slices inside the chunk and across its upper z face (its last slice
   against the next chunk's first slice, read from the scratch array).
3. **link** — on the client: the face pairs join fragments into slice objects, whose
   tables add up; :func:`unet_core.slicelink.link` decides the links and the cuts at
   waists. The kept links (between representatives) and the face pairs go through the
   same sparse union as the component stitch.
4. **relabel** — :func:`tasks.instances.components.relabel_chunk` writes consecutive final ids.

Per-chunk steps have the form ``fn(plan, index) -> small result`` over a frozen plan of
descriptors. The client holds one row per slice object (not per voxel).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from tasks.instances.components import (
    StitchPlan,
    _image_url,
    _union,
    final_ids,
    plan_stitch,
    segmentation_meta,
)
from tasks.store import (
    ImageInfo,
    get_array,
    open_group,
    open_level,
    read_image_info,
)
from unet_core.errors import ConfigError, SegflowError
from unet_core.slicelink import (
    DEFAULT_LINK_IOU,
    LinkParams,
    Overlaps,
    SliceObjects,
    link,
    slice_objects,
    slice_overlaps,
    sum_pairs,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkPlan:
    """What every chunk step needs: the stitch plan (in-plane structure), the image whose
    intensities the waist test reads (None: area only) and the thresholds."""

    stitch: StitchPlan
    image: ImageInfo | None
    params: LinkParams

    def meta(self) -> dict[str, Any]:
        """What the instance labels record about the linking."""
        p = self.params
        return {
            "link_iou": p.iou,
            "area_depth": p.area_depth,
            "intensity_depth": p.intensity_depth,
            "background": p.background,
        }


@dataclass(frozen=True)
class SliceTables:
    """One chunk's slice objects (local ids 1..n in order) and their overlaps.

    ``inside``: local id pairs of consecutive slices within the chunk; ``across``: local id
    in the chunk's last slice and local id in the first slice of the next chunk along z.
    """

    index: tuple[int, ...]
    objects: SliceObjects
    inside: tuple[np.ndarray, np.ndarray, np.ndarray]
    across: tuple[np.ndarray, np.ndarray, np.ndarray]


def plan_link(
    store: str,
    labels: str = "semantic",
    out_name: str = "instances",
    foreground: Sequence[int] | None = None,
    connectivity: int = 1,
    min_size: int | None = None,
    link_iou: float | None = None,
    id_offset: int = 0,
    params: LinkParams | None = None,
) -> LinkPlan:
    """The stitch plan for slice objects and the linking parameters (``link_iou`` overrides
    ``params.iou``; default: the labels' metadata, recorded from the checkpoint at
    segmentation, else the module default)."""
    params = params or LinkParams()
    if link_iou is None:
        link_iou = segmentation_meta(store, labels).get("link_iou", DEFAULT_LINK_IOU)
    params = replace(params, iou=float(link_iou))
    plan = plan_stitch(store, labels, out_name, foreground, connectivity, min_size, id_offset)
    if len(plan.shape) < 3:
        raise ConfigError(
            f"{store}: labels/{labels} is a single 2D image; linking objects across slices "
            "needs a stack (use the components method)"
        )
    image = None
    if params.intensity_depth > 0:
        image = _intensity_image(plan, labels)
        if image is None:
            params = replace(params, intensity_depth=0.0)
        else:
            params = replace(params, background=background_level(image))
    key = hashlib.sha256(f"{plan.key}|slices|{params}".encode()).hexdigest()[:32]
    return LinkPlan(stitch=replace(plan, slices=True, key=key), image=image, params=params)


def _intensity_image(plan: StitchPlan, labels: str) -> ImageInfo | None:
    url = _image_url(plan, labels)
    info = read_image_info(url) if url else None
    if info is None or info.spatial_shape != plan.shape:
        log.warning("no image of shape %s for labels/%s: waists by area only", plan.shape, labels)
        return None
    return info


def background_level(image: ImageInfo) -> float:
    """The intensity the waist test measures above: the image's median (recorded at
    ingest; summed over channels like the intensities), else 0."""
    stats = image.stats
    if stats is None or "50" not in stats.percentiles:
        log.warning("%s has no recorded median: mean intensities are taken as they are", image.url)
        return 0.0
    return float(stats.percentile(50)) * image.n_channels


def slice_tables(plan: LinkPlan, index: tuple[int, ...]) -> SliceTables:
    """Per-object sums of one chunk and its overlaps, from the scratch array (pass 1)."""
    sp = plan.stitch
    box = sp.chunk_box(index)
    root = open_group(sp.store, "r")
    scratch = get_array(root, sp.scratch_path, sp.store)
    end_z = min(box.end[0] + 1, sp.shape[0])  # one slice of the next chunk, if any
    region = (slice(box.begin[0], end_z), *box.to_slices()[1:])
    both = np.asarray(scratch[region])
    local = both[: box.shape[0]]
    n = int(local.max(initial=0))
    image = None
    if plan.image is not None:
        arr = open_level(plan.image)
        lead = (slice(None),) if plan.image.channel_axis is not None else ()
        image = np.asarray(arr[(*lead, *box.to_slices())])
    objects = slice_objects(local, n, image, box.begin, sp.shape)
    across = slice_overlaps(both[box.shape[0] - 1 :])  # empty in the last chunk along z
    return SliceTables(tuple(index), objects, slice_overlaps(local), across)


def links_between_slices(
    tables: list[SliceTables],
    faces: list[np.ndarray],
    offsets: np.ndarray,
    total: int,
    id_offset: int,
    params: LinkParams,
) -> np.ndarray:
    """Kept links ``(2, k)`` as pairs of provisional ids (the slice objects' smallest)."""
    # Slice objects = provisional ids joined across y/x faces, numbered 0..s-1.
    merged_ids, merged_final, absorbed = _union(faces, total)
    n_slice = total - absorbed.size - id_offset

    def slice_index(prov: np.ndarray) -> np.ndarray:
        g = prov.astype(np.uint64)
        return (final_ids(g, merged_ids, merged_final, absorbed) - np.uint64(id_offset + 1)).astype(
            np.int64
        )

    z = np.zeros(n_slice, dtype=np.int64)
    area = np.zeros(n_slice, dtype=np.int64)
    integer = all(t.objects.intensity.dtype.kind in "iu" for t in tables)
    intensity = np.zeros(n_slice, dtype=np.int64 if integer else np.float64)
    key = np.full(n_slice, np.iinfo(np.int64).max, dtype=np.int64)
    rep = np.full(n_slice, np.iinfo(np.uint64).max, dtype=np.uint64)
    pa, pb, pc = [], [], []
    grid = offsets.shape
    for t in tables:
        o = t.objects
        off = int(offsets[t.index])
        prov = np.arange(1, o.z.size + 1, dtype=np.uint64) + np.uint64(off)
        s = slice_index(prov)
        z[s] = o.z
        np.add.at(area, s, o.area)
        np.add.at(intensity, s, o.intensity)
        np.minimum.at(key, s, o.key)
        np.minimum.at(rep, s, prov)
        a, b, count = t.inside
        pa.append(slice_index(a + off))
        pb.append(slice_index(b + off))
        pc.append(count)
        a, b, count = t.across
        if count.size:
            nxt = (t.index[0] + 1, *t.index[1:])
            if nxt[0] >= grid[0]:
                raise SegflowError(f"chunk {t.index} has overlaps across the last z face")
            pa.append(slice_index(a + off))
            pb.append(slice_index(b + int(offsets[nxt])))
            pc.append(count)
    a, b, count = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (pa, pb, pc))
    objects = SliceObjects(z=z, area=area, intensity=intensity, key=key)
    overlaps = Overlaps(*sum_pairs(a, b, count))  # a pair's parts in several chunks add up
    kept = link(objects, overlaps, params)
    return np.stack([rep[kept[0]], rep[kept[1]]])


def default_method(store: str, labels: str) -> str:
    """``slices`` for a stack segmented by a 2D model, else ``components``."""
    ndim = len(get_array(open_group(store, "r"), f"labels/{labels}/0", store).shape)
    model_ndim = segmentation_meta(store, labels).get("model_ndim")
    return "slices" if ndim == 3 and model_ndim == 2 else "components"


__all__ = [
    "LinkPlan",
    "SliceTables",
    "default_method",
    "links_between_slices",
    "plan_link",
    "segmentation_meta",
    "slice_tables",
]
