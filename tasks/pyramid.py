"""Label pyramids that match the image's levels (nearest voxel, never averaged ids)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import zarr

from tasks.blockwise import Runner, Step
from tasks.ngff import compressors, read_multiscale, write_multiscale
from tasks.reads import StrictArray
from tasks.store import LABELS_GROUP, every_chunk, get_array, open_group
from unet_core.errors import InvalidVolumeError
from unet_core.geometry import Box


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


@dataclass(frozen=True)
class LabelLevelPlan:
    """One label level: every f-th voxel of the level above, chunk by chunk."""

    store: str
    group: str  # e.g. labels/semantic
    level: int
    factors: tuple[int, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...]

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(-(-n // c) for n, c in zip(self.shape, self.chunks, strict=True))

    def box(self, index: tuple[int, ...]) -> Box:
        begin = tuple(i * c for i, c in zip(index, self.chunks, strict=True))
        return Box(begin, self.chunks).intersect(Box.of_shape(self.shape))


def label_level_block(plan: LabelLevelPlan, index: tuple[int, ...]) -> int:
    """Write one chunk of a label level from the level above (strided, ids never mixed)."""
    box = plan.box(index)
    root = open_group(plan.store, "r+")
    above = get_array(root, f"{plan.group}/{plan.level - 1}", plan.store)
    src = tuple(
        slice(b * f, e * f, f) for b, e, f in zip(box.begin, box.end, plan.factors, strict=True)
    )
    data = StrictArray(above, plan.store, f"{plan.group}/{plan.level - 1}")[
        tuple(slice(s.start, min(s.stop, n)) for s, n in zip(src, above.shape, strict=True))
    ][tuple(slice(None, None, f) for f in plan.factors)]
    target = every_chunk(get_array(root, f"{plan.group}/{plan.level}", plan.store))
    target[box.to_slices()] = data
    return int(data.size)


def write_label_levels(
    store: str, name: str, image_url: str, key: str = "", runner: Runner | None = None
) -> int:
    """Add levels 1.. to ``labels/<name>`` matching the image's levels; returns their count.

    Each level takes every f-th voxel of the level above (f = the image's scale ratio), so
    ids are never mixed. Level 0 must exist; metadata scales follow the image's. Levels
    are steps of the blockwise runner, resumable under ``key`` (the labels' run key).
    """
    levels = image_levels(image_url)
    path = f"{LABELS_GROUP}/{name}"
    group = open_group(store, "r+")[path]
    if not isinstance(group, zarr.Group):
        raise InvalidVolumeError(f"{store}: {path} is not a group")
    base = get_array(group, "0", store)
    if tuple(base.shape) != levels[0][1]:
        return 0
    runner = runner or Runner()
    shape = tuple(int(n) for n in base.shape)
    for lvl in range(1, len(levels)):
        factors = tuple(
            max(1, round(b / a)) for a, b in zip(levels[lvl - 1][0], levels[lvl][0], strict=True)
        )
        shape = tuple(-(-n // f) for n, f in zip(shape, factors, strict=True))
        chunks = tuple(min(c, n) for c, n in zip(base.chunks, shape, strict=True))
        existing = group.get(str(lvl))
        if not (
            isinstance(existing, zarr.Array)
            and tuple(existing.shape) == shape
            and tuple(existing.chunks) == chunks
            and existing.dtype == base.dtype
        ):
            group.create_array(
                str(lvl),
                shape=shape,
                chunks=chunks,
                dtype=base.dtype,
                fill_value=0,
                compressors=compressors(),
                dimension_names=getattr(base.metadata, "dimension_names", None),
                overwrite=True,
            )
        plan = LabelLevelPlan(str(store), path, lvl, factors, shape, chunks)
        step_key = hashlib.sha256(f"{key}|{lvl}|{factors}|{shape}".encode()).hexdigest()[:32]
        runner.run(
            Step(
                name=f"{name}-level{lvl}",
                store=str(store),
                grid=plan.grid,
                key=step_key,
                process=label_level_block,
                plan=plan,
                box=LabelLevelPlan.box,
            )
        )
    where = f"{store}/{LABELS_GROUP}/{name}"
    ms = read_multiscale(group, where)
    write_multiscale(group, ms.with_scales([s for s, _ in levels]), where)
    return len(levels) - 1
