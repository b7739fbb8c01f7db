"""Instances from a semantic mask: connected components chunk by chunk, merged across faces.

Three passes, each a set of independent Dask tasks over the output chunks:

1. **label** — every chunk labels its foreground with ``scipy.ndimage.label`` (local ids
   1..n) into a scratch array, and returns n plus per-object sums (voxels, bounding box,
   coordinate sums). Provisional global id = local id + the chunk's offset (an exclusive
   cumulative sum of the n's, computed on the client).
2. **faces** — for every chunk and axis, the two voxel planes on either side of the chunk's
   upper boundary (plus a one-voxel margin on the other axes, so edge and corner contacts
   count with full connectivity) give the pairs of provisional ids that touch.
3. **relabel** — union-find over those pairs (scipy's connected components over only the
   ids that touch a face) gives, for merged ids, their representative; final ids are made
   consecutive by subtracting the number of absorbed ids below them. Objects under the
   minimum size (from the object table) are dropped, and the ids above each dropped one move
   down by one, so the ids stay consecutive: 1..N after any offset. Each chunk receives only
   the part of that sparse table in its own id range, and writes ``labels/<name>/0``.

Nothing is capped: ids are uint32 while the provisional count fits and uint64 beyond, and
neither the number of chunks nor of objects is bounded by a dense table in memory.
The partition equals ``scipy.ndimage.label`` on the whole volume (same structure).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from scipy import ndimage, sparse

from tasks.blockwise import Step
from tasks.ngff import Multiscale, add_label, compressors, is_image, label_ome, label_source
from tasks.outputs import write_file
from tasks.paths import table_paths
from tasks.reads import StrictArray
from tasks.records import KEY, OutputRecord, StoreRecord
from tasks.runstate import require_complete
from tasks.store import (
    LABELS_GROUP,
    attributes,
    every_chunk,
    get_array,
    open_group,
)
from unet_core.errors import ConfigError, SegflowError
from unet_core.geometry import Box
from unet_core.sizes import MinSize, default_min_size, size_unit
from unet_core.slicelink import planar_structure

log = logging.getLogger(__name__)

SCRATCH = "segflow-scratch"
#: What instance labels mean, part of the stitch key, so that labels an earlier version
#: made are made again rather than reused. 1: until this was recorded (ids kept the gaps of
#: the objects under the minimum size); 2: ids consecutive after the size filter, and the
#: default minimum size in the units of the labels (areas of 2D labels, voxels of 3D ones).
INSTANCES_REVISION = 2


@dataclass(frozen=True)
class StitchPlan:
    store: str
    semantic_path: str  # e.g. labels/semantic/0
    out_name: str  # e.g. instances
    foreground: tuple[int, ...]
    connectivity: int
    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    scale: tuple[float, ...]
    axes: str
    unit: str | None
    min_size: int
    key: str = ""
    min_size_unit: str = "voxels"  # or pixels (2D labels)
    min_size_from: str = "option"  # or model (its suggestion, unet_core.sizes)
    id_offset: int = 0
    slices: bool = False  # connect within slices only (slice objects, tasks/instances/slices.py)

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True))

    @property
    def scratch_path(self) -> str:
        return f"{SCRATCH}/{self.out_name}-local"

    @property
    def out_path(self) -> str:
        return f"{LABELS_GROUP}/{self.out_name}/0"

    def chunk_box(self, index: Sequence[int]) -> Box:
        begin = tuple(i * c for i, c in zip(index, self.chunks, strict=True))
        return Box(begin, self.chunks).intersect(Box.of_shape(self.shape))

    def structure(self) -> np.ndarray:
        if self.slices:
            return planar_structure(len(self.shape), self.connectivity)
        return ndimage.generate_binary_structure(len(self.shape), self.connectivity)

    def step(self, name: str, process: Any, plan: Any, grid: tuple[int, ...]) -> Step:
        """A pass of the stitch as a step of the blockwise runner."""
        return Step(
            name=f"stitch-{self.out_name}-{name}",
            store=self.store,
            grid=grid,
            key=self.key,
            process=process,
            plan=plan,
            box=_pass_box,
            resumable=name == "relabel",
            outputs=(f"{LABELS_GROUP}/{self.out_name}",),
        )


def _pass_box(plan: Any, index: tuple[int, ...]) -> Box:
    base: StitchPlan = plan if isinstance(plan, StitchPlan) else plan.plan
    return base.chunk_box(index[: len(base.shape)])


@dataclass
class StitchResult:
    store: str
    labels_path: str
    objects: int
    dtype: str
    table_csv: str | None
    table_parquet: str | None
    seconds: float
    table: pd.DataFrame
    reused: bool = False
    method: str = "components"  # or "slices" (tasks/instances/slices.py)
    min_size: int = 0  # objects of fewer voxels (pixels in 2D) were removed
    min_size_unit: str = "voxels"
    min_size_from: str = "option"  # or model
    removed: int = 0  # objects under the minimum size


def id_dtype(n: int) -> np.dtype:
    """uint32 while ids fit, uint64 beyond."""
    return np.dtype(np.uint32 if n < 2**32 else np.uint64)


# ------------------------------------------------------------------------- pass 1


def label_chunk(plan: StitchPlan, index: tuple[int, ...]) -> dict[str, Any]:
    """Label one chunk's foreground into the scratch array; per-object sums for the table."""
    box = plan.chunk_box(index)
    root = open_group(plan.store, "r+")
    semantic = StrictArray(
        get_array(root, plan.semantic_path, plan.store), plan.store, plan.semantic_path
    )[box.to_slices()]
    mask = np.isin(semantic, plan.foreground)
    local, n = ndimage.label(mask, structure=plan.structure())
    del semantic, mask
    scratch = every_chunk(get_array(root, plan.scratch_path, plan.store))
    scratch[box.to_slices()] = local.view(np.uint32)
    return {"index": index, "n": int(n), "objects": _object_sums(local, int(n), box)}


def _object_sums(local: np.ndarray, n: int, box: Box) -> dict[str, np.ndarray]:
    """Voxel counts, coordinate sums and bounding boxes of local objects 1..n (global coords).

    Works on the foreground voxels only, so memory follows the objects, not the chunk.
    """
    if n == 0:
        return {"count": np.zeros(0, np.int64)}
    coords = np.nonzero(local)
    ids = local[coords]
    count = np.bincount(ids, minlength=n + 1)[1:].astype(np.int64)
    out: dict[str, np.ndarray] = {"count": count}
    slices = ndimage.find_objects(local, max_label=n)
    for axis in range(local.ndim):
        sums = np.bincount(ids, weights=coords[axis], minlength=n + 1)[1:]
        out[f"sum{axis}"] = sums + count * float(box.begin[axis])
        out[f"min{axis}"] = np.array([s[axis].start + box.begin[axis] for s in slices], np.int64)
        out[f"max{axis}"] = np.array([s[axis].stop + box.begin[axis] for s in slices], np.int64)
    return out


# ------------------------------------------------------------------------- pass 2


@dataclass(frozen=True)
class FacePlan:
    """Pass 2: the stitch plan and the provisional id offset of every chunk."""

    plan: StitchPlan
    offsets: np.ndarray
    first_axis: int = 0  # 1: slice objects, joined across y and x faces only


def face_block(fp: FacePlan, index: tuple[int, ...]) -> np.ndarray:
    """Pass 2 block: ``index`` is a chunk index followed by the axis of its upper face."""
    return face_pairs(fp.plan, index[:-1], index[-1] + fp.first_axis, fp.offsets)


def face_pairs(
    plan: StitchPlan, index: tuple[int, ...], axis: int, offsets: np.ndarray
) -> np.ndarray:
    """Pairs (2, k) of provisional global ids touching across the chunk's upper face."""
    box = plan.chunk_box(index)
    boundary = box.end[axis]
    if boundary >= plan.shape[axis]:
        return np.zeros((2, 0), dtype=np.uint64)
    begin = [max(b - 1, 0) for b in box.begin]
    end = [min(e + 1, n) for e, n in zip(box.end, plan.shape, strict=True)]
    begin[axis], end[axis] = boundary - 1, boundary + 1
    region = Box.from_bounds(begin, end)
    root = open_group(plan.store, "r")
    scratch = StrictArray(
        get_array(root, plan.scratch_path, plan.store), plan.store, plan.scratch_path
    )
    local = scratch[region.to_slices()]
    ids = _globalize(local, region, plan, offsets)
    a_plane = np.take(ids, 0, axis=axis)
    b_plane = np.take(ids, 1, axis=axis)
    pairs = []
    structure = plan.structure()
    others = [a for a in range(len(plan.shape)) if a != axis]
    for d in np.argwhere(structure):
        delta = d - 1
        if delta[axis] != 1:
            continue
        shift = [int(delta[a]) for a in others]
        a_sl, b_sl = [], []
        for s, n in zip(shift, a_plane.shape, strict=True):
            a_sl.append(slice(max(0, -s), n - max(0, s)))
            b_sl.append(slice(max(0, s), n - max(0, -s)))
        a = a_plane[tuple(a_sl)].reshape(-1)
        b = b_plane[tuple(b_sl)].reshape(-1)
        keep = (a > 0) & (b > 0)
        pairs.append(np.stack([a[keep], b[keep]]))
    if not pairs:
        return np.zeros((2, 0), dtype=np.uint64)
    both = np.concatenate(pairs, axis=1)
    return np.unique(both, axis=1) if both.size else both.astype(np.uint64)


def _globalize(local: np.ndarray, region: Box, plan: StitchPlan, offsets: np.ndarray) -> np.ndarray:
    """Local ids -> provisional global ids (uint64) for a region spanning several chunks."""
    chunk_idx = [
        (np.arange(b, e) // c).reshape([-1 if a == ax else 1 for a in range(local.ndim)])
        for ax, (b, e, c) in enumerate(zip(region.begin, region.end, plan.chunks, strict=True))
    ]
    off = offsets[tuple(np.broadcast_arrays(*chunk_idx))]
    ids = local.astype(np.uint64)
    return np.where(ids > 0, ids + off.astype(np.uint64), np.uint64(0))


# ------------------------------------------------------------------------- pass 3


@dataclass(frozen=True)
class RelabelPlan:
    """Pass 3: the sparse tables every chunk takes its part of (shipped once)."""

    plan: StitchPlan
    offsets: np.ndarray
    counts: np.ndarray
    merged_ids: np.ndarray
    merged_final: np.ndarray
    absorbed: np.ndarray
    dropped: np.ndarray
    dtype: str


def relabel_block(rp: RelabelPlan, index: tuple[int, ...]) -> int:
    """Pass 3 block: this chunk's slice of the sparse tables, then :func:`relabel_chunk`."""
    lo = int(rp.offsets[index])
    hi = lo + int(rp.counts[index])
    a, b = np.searchsorted(rp.merged_ids, [lo + 1, hi + 1])
    return relabel_chunk(
        rp.plan,
        index,
        lo,
        rp.merged_ids[a:b],
        rp.merged_final[a:b],
        rp.absorbed[: np.searchsorted(rp.absorbed, hi + 1)],
        rp.dropped,
        rp.dtype,
    )


def final_ids(
    g: np.ndarray, merged_ids: np.ndarray, merged_final: np.ndarray, absorbed: np.ndarray
) -> np.ndarray:
    """Final ids of provisional ids ``g`` (same dtype) from the sparse tables of
    :func:`_union`: merged ids take their component's id, the others move down by the
    number of absorbed ids below them (consecutive numbering)."""
    final = g - np.searchsorted(absorbed, g, side="left").astype(g.dtype)
    if merged_ids.size:
        pos = np.minimum(np.searchsorted(merged_ids, g), merged_ids.size - 1)
        hit = merged_ids[pos] == g
        final[hit] = merged_final[pos[hit]].astype(g.dtype)
    return final


def without_dropped(final: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """Final ids once the ids ``dropped`` (sorted) are gone: those become 0, the others move
    down by the number of dropped ids below them, so the ids stay consecutive (same dtype)."""
    if not dropped.size:
        return final
    below = np.searchsorted(dropped, final, side="left")
    gone = dropped[np.minimum(below, dropped.size - 1)] == final
    out = final - below.astype(final.dtype)
    out[gone] = 0
    return out


def relabel_chunk(
    plan: StitchPlan,
    index: tuple[int, ...],
    offset: int,
    merged_ids: np.ndarray,
    merged_final: np.ndarray,
    absorbed: np.ndarray,
    dropped: np.ndarray,
    dtype: str,
) -> int:
    """Write final ids for one chunk. ``merged_ids``/``merged_final`` is the part of the
    sparse merge table in this chunk's id range; ``absorbed`` the absorbed ids below it;
    ``dropped`` the (sorted) final ids of objects under the minimum size, whose voxels
    become 0 while the ids above them close the gaps (:func:`without_dropped`)."""
    box = plan.chunk_box(index)
    root = open_group(plan.store, "r+")
    scratch = StrictArray(
        get_array(root, plan.scratch_path, plan.store), plan.store, plan.scratch_path
    )
    out = scratch[box.to_slices()].astype(dtype)
    fg = out > 0
    g = out[fg]  # local ids of the foreground, in the output dtype
    g += g.dtype.type(offset)  # provisional global ids
    out[fg] = without_dropped(final_ids(g, merged_ids, merged_final, absorbed), dropped)
    target = every_chunk(get_array(root, plan.out_path, plan.store))
    target[box.to_slices()] = out
    return int(fg.sum())


# ------------------------------------------------------------------------ the whole


def plan_stitch(
    store: str,
    labels: str = "semantic",
    out_name: str = "instances",
    foreground: Sequence[int] | None = None,
    connectivity: int = 1,
    min_size: int | None = None,
    id_offset: int = 0,
) -> StitchPlan:
    store = str(store).rstrip("/")
    root = open_group(store, "r")
    semantic_path = f"{LABELS_GROUP}/{labels}/0"
    arr = get_array(root, semantic_path, store)
    made = require_complete(store, f"{LABELS_GROUP}/{labels}", f"'{labels}' labels")
    group_attrs = attributes(root[f"{LABELS_GROUP}/{labels}"])
    ndim = arr.ndim
    if not 1 <= connectivity <= ndim:
        raise ConfigError(f"connectivity must be between 1 and {ndim} for a {ndim}D mask")
    fg = tuple(foreground) if foreground else (made.foreground_class,)
    ms = Multiscale.from_attrs(group_attrs, f"{store}/{LABELS_GROUP}/{labels}")
    if out_name == labels:
        raise ConfigError(f"the instance labels cannot overwrite '{labels}'")
    size = labels_min_size(store, labels, min_size, ms.scale[-ndim:])
    min_size = size.size
    key_fields = {
        "revision": INSTANCES_REVISION,
        "from": labels,
        "source_key": made.key,
        "out": out_name,
        "foreground": list(fg),
        "connectivity": connectivity,
        "min_size": min_size,
        "id_offset": int(id_offset),
        "shape": list(arr.shape),
        "chunks": list(arr.chunks),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    return StitchPlan(
        store=str(store),
        semantic_path=semantic_path,
        out_name=out_name,
        foreground=fg,
        connectivity=connectivity,
        shape=tuple(int(n) for n in arr.shape),
        chunks=tuple(int(c) for c in arr.chunks),
        scale=ms.scale,
        axes=ms.axis_names,
        unit=ms.unit,
        min_size=min_size,
        key=key,
        id_offset=int(id_offset),
        min_size_unit=size.unit,
        min_size_from=size.source,
    )


def labels_min_size(
    store: str, labels: str, min_size: int | None, spacing: Sequence[float]
) -> MinSize:
    """The minimum object size for instances of ``labels`` (voxel sizes ``spacing``):
    ``min_size`` as given, in voxels (pixels for a 2D image), else the suggestion of the
    model that made the labels in those units (:func:`unet_core.sizes.default_min_size`)."""
    if min_size is not None:
        return MinSize(max(int(min_size), 0), size_unit(len(spacing)), "option")
    made = OutputRecord.of(open_group(store, "r")[f"{LABELS_GROUP}/{labels}"])
    model_ndim = segmentation_meta(store, labels).get("model_ndim")
    return default_min_size(made.suggested_min_size, model_ndim, spacing)


def segmentation_meta(store: str, labels: str) -> dict[str, Any]:
    """What the labels' metadata says about the model that made them: ``model_ndim`` and
    ``link_iou`` (recorded at segmentation; read from the checkpoint, when it is still
    there, for labels made before they were recorded). Empty for labels from elsewhere."""
    made = OutputRecord.of(open_group(store, "r")[f"labels/{labels}"])
    out: dict[str, Any] = {}
    if made.model_ndim is not None:
        out["model_ndim"] = made.model_ndim
    if made.link_iou is not None:
        out["link_iou"] = made.link_iou
    model = made.model
    if len(out) < 2 and model and Path(str(model)).is_file():
        from unet_core.checkpoint import read_checkpoint_header

        try:
            config, meta = read_checkpoint_header(str(model))
        except SegflowError as exc:
            log.warning("labels/%s: model %s unreadable (%s)", labels, model, exc)
        else:
            out.setdefault("model_ndim", config.ndim)
            out.setdefault("link_iou", meta.link_iou)
    return out


def _image_url(plan: StitchPlan, labels: str) -> str | None:
    """The image the labels belong to (for pyramid levels), if it can be found."""
    root = open_group(plan.store, "r")
    if is_image(root):
        return plan.store
    return StoreRecord.of(root).source_image


def _union(pairs: list[np.ndarray], total: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(merged ids sorted, their final ids, absorbed ids sorted) from touching pairs."""
    allp = [p for p in pairs if p.size]
    if not allp:
        empty = np.zeros(0, dtype=np.uint64)
        return empty, empty, empty
    edges = np.concatenate(allp, axis=1).astype(np.uint64)
    ids, inverse = np.unique(edges.reshape(-1), return_inverse=True)
    inverse = inverse.reshape(2, -1)
    graph = sparse.coo_matrix(
        (np.ones(inverse.shape[1], dtype=np.int8), (inverse[0], inverse[1])),
        shape=(ids.size, ids.size),
    )
    _, comp = sparse.csgraph.connected_components(graph, directed=False)
    # Representative = smallest provisional id of each component.
    rep = np.full(comp.max() + 1, np.iinfo(np.uint64).max, dtype=np.uint64)
    np.minimum.at(rep, comp, ids)
    representative = rep[comp]
    absorbed = np.sort(ids[representative != ids])
    final_of_rep = representative - np.searchsorted(absorbed, representative).astype(np.uint64)
    return ids, final_of_rep, absorbed


def _object_table(
    plan: StitchPlan,
    sums: dict[tuple[int, ...], dict[str, np.ndarray]],
    offsets: np.ndarray,
    merged_ids: np.ndarray,
    merged_final: np.ndarray,
    absorbed: np.ndarray,
) -> pd.DataFrame:
    ndim = len(plan.shape)
    frames = []
    for idx, s in sums.items():
        count = s["count"]
        if not count.size:
            continue
        g = np.arange(1, count.size + 1, dtype=np.uint64) + np.uint64(offsets[idx])
        data = {"id": final_ids(g, merged_ids, merged_final, absorbed), "voxels": count}
        for a in range(ndim):
            data[f"sum{a}"] = s[f"sum{a}"]
            data[f"min{a}"] = s[f"min{a}"]
            data[f"max{a}"] = s[f"max{a}"]
        frames.append(pd.DataFrame(data))
    names = plan.axes[-ndim:]
    columns = ["id", "voxels", "volume"]
    columns += [f"centroid_{n}" for n in names]
    columns += [f"bbox_min_{n}" for n in names] + [f"bbox_max_{n}" for n in names]
    columns += ["extent_z"] if "z" in names else []  # slices spanned
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="float64") for c in columns})
    raw = pd.concat(frames, ignore_index=True)
    agg: dict[str, str] = {"voxels": "sum"}
    for a in range(ndim):
        agg.update({f"sum{a}": "sum", f"min{a}": "min", f"max{a}": "max"})
    grouped = raw.groupby("id", sort=True).agg(agg).reset_index()
    table = pd.DataFrame({"id": grouped["id"].astype(np.uint64), "voxels": grouped["voxels"]})
    table["volume"] = grouped["voxels"] * float(np.prod(plan.scale))
    for a, name in enumerate(names):
        table[f"centroid_{name}"] = grouped[f"sum{a}"] / grouped["voxels"]
    for a, name in enumerate(names):
        table[f"bbox_min_{name}"] = grouped[f"min{a}"]
    for a, name in enumerate(names):
        table[f"bbox_max_{name}"] = grouped[f"max{a}"]
    if "z" in names:
        table["extent_z"] = table["bbox_max_z"] - table["bbox_min_z"]
    return table[columns]


def _prepare_instances(plan: StitchPlan, dtype: np.dtype, source_labels: str) -> None:
    root = open_group(plan.store, "r+")
    labels_group = root.require_group(LABELS_GROUP)
    add_label(labels_group, plan.out_name)
    group = labels_group.require_group(plan.out_name)
    ms = Multiscale.build(plan.axes, plan.scale, unit=plan.unit, name=plan.out_name)
    source_group = root[f"{LABELS_GROUP}/{source_labels}"]
    record = OutputRecord(
        complete=False,
        key=plan.key,
        made_from=source_labels,
        source_key=OutputRecord.of(source_group).key,
        method="slices" if plan.slices else "components",
        foreground=list(plan.foreground),
        connectivity=plan.connectivity,
        min_size=plan.min_size,
        min_size_unit=plan.min_size_unit,
        min_size_from=plan.min_size_from,
    )
    group.attrs.update({"ome": label_ome(ms, label_source(source_group)), KEY: record.dump()})
    existing = group.get("0")
    if (
        isinstance(existing, zarr.Array)
        and tuple(existing.shape) == plan.shape
        and tuple(existing.chunks) == plan.chunks
        and existing.dtype == dtype
    ):
        return  # resumed: relabelled chunks marked under this key are kept
    group.create_array(
        "0",
        shape=plan.shape,
        chunks=plan.chunks,
        dtype=dtype,
        fill_value=0,
        compressors=compressors(),
        dimension_names=list(plan.axes[-len(plan.shape) :]),
        overwrite=True,
    )


def _finish_instances(plan: StitchPlan, max_id: int, objects: int, removed: int) -> None:
    group = open_group(plan.store, "r+")[f"{LABELS_GROUP}/{plan.out_name}"]
    OutputRecord.of(group).updated(
        complete=True, key=plan.key, objects=objects, max_id=max_id, removed=removed
    ).write(group)


def write_object_table(plan: StitchPlan, table: pd.DataFrame) -> tuple[str, str]:
    """CSV and Parquet beside the store, each written under a temporary name and renamed."""
    csv_path, parquet_path = table_paths(plan.store, plan.out_name)
    write_file(csv_path, lambda f: table.to_csv(f, index=False), owner=plan.store)
    write_file(
        parquet_path, lambda f: table.to_parquet(f, index=False), binary=True, owner=plan.store
    )
    return csv_path, parquet_path
