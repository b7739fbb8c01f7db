"""OME-Zarr (NGFF 0.5) metadata: the one place it is built and parsed.

An image group carries ``ome.multiscales`` (one :class:`Multiscale`: axes with their types
and units, one dataset per pyramid level with its path and scale); the ``labels`` group
carries ``ome.labels`` (the names of its label images); each label image carries
``ome.multiscales`` and ``ome.image-label`` (colours, properties, the image it labels).
Every array segflow writes into a store is compressed with :func:`compressors` unless a
caller asks for another codec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import zarr

from unet_core.errors import InvalidVolumeError

NGFF_VERSION = "0.5"
#: The default zstd level of every array segflow writes.
ZSTD_LEVEL = 3

_PALETTE = (
    (0, 0, 0, 0),
    (255, 64, 64, 160),
    (64, 160, 255, 160),
    (64, 255, 96, 160),
    (255, 200, 0, 160),
    (200, 64, 255, 160),
)


def compressors(level: int = ZSTD_LEVEL) -> Any:
    """The codec for ``create_array(compressors=...)``: zstd at ``level``."""
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=level)


@dataclass(frozen=True)
class Axis:
    name: str
    type: str  # "space", "channel" or "time"
    unit: str | None = None

    @classmethod
    def of(cls, name: str, unit: str | None = "micrometer") -> Axis:
        """The axis ``name`` (c, t, z, y or x); space axes get ``unit``."""
        kind = {"c": "channel", "t": "time"}.get(name, "space")
        return cls(name, kind, unit if kind == "space" else None)

    def to_json(self) -> dict[str, str]:
        out = {"name": self.name, "type": self.type}
        if self.unit:
            out["unit"] = self.unit
        return out


@dataclass(frozen=True)
class Dataset:
    """One pyramid level: its array's path in the group and its physical scale per axis."""

    path: str
    scale: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "coordinateTransformations": [{"type": "scale", "scale": list(self.scale)}],
        }


@dataclass(frozen=True)
class Multiscale:
    """One ``multiscales`` entry: a name, the axes and the levels (level 0 first)."""

    name: str
    axes: tuple[Axis, ...]
    datasets: tuple[Dataset, ...]

    @classmethod
    def build(
        cls,
        axes: str,
        scale: Sequence[float],
        factors: Sequence[Sequence[int]] = (),
        unit: str | None = "micrometer",
        name: str = "image",
    ) -> Multiscale:
        """Levels ``0..len(factors)``; level i is scaled by the product of ``factors[:i]``."""
        current = tuple(float(s) for s in scale)
        levels = [current]
        for f in factors:
            current = tuple(c * int(k) for c, k in zip(current, f, strict=True))
            levels.append(current)
        return cls(name, tuple(Axis.of(a, unit) for a in axes), ()).with_scales(levels)

    def with_scales(self, scales: Sequence[Sequence[float]]) -> Multiscale:
        """The same image with levels ``0, 1, ...`` at ``scales``."""
        return replace(
            self,
            datasets=tuple(
                Dataset(str(i), tuple(float(v) for v in s)) for i, s in enumerate(scales)
            ),
        )

    @property
    def axis_names(self) -> str:
        return "".join(a.name for a in self.axes)

    @property
    def unit(self) -> str | None:
        """The unit shared by all space axes (None if there is none or they differ)."""
        units = {a.unit for a in self.axes if a.type == "space"}
        return units.pop() if len(units) == 1 else None

    @property
    def scale(self) -> tuple[float, ...]:
        """The scale of level 0."""
        return self.datasets[0].scale

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "axes": [a.to_json() for a in self.axes],
            "datasets": [d.to_json() for d in self.datasets],
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any], where: str) -> Multiscale:
        """The first multiscale of a node's attributes; ``where`` names the node in errors."""
        ome = _ome(attrs, where)
        entries = ome.get("multiscales")
        if not entries:
            raise InvalidVolumeError(f"{where}: not an OME-Zarr image (no 'multiscales' metadata)")
        try:
            entry = entries[0]
            axes = tuple(_axis(a) for a in entry["axes"])
            datasets = tuple(_dataset(d, len(axes)) for d in entry["datasets"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise InvalidVolumeError(
                f"{where}: the 'multiscales' metadata is malformed ({type(exc).__name__}: {exc})"
            ) from None
        if not axes or not datasets:
            raise InvalidVolumeError(f"{where}: the 'multiscales' metadata lists no axes or levels")
        return cls(str(entry.get("name") or ""), axes, datasets)


def _axis(entry: Any) -> Axis:
    if isinstance(entry, str):  # NGFF 0.3 wrote plain names
        return Axis.of(entry, None)
    name = str(entry["name"])
    return Axis(name, str(entry.get("type") or Axis.of(name).type), entry.get("unit"))


def _dataset(entry: Mapping[str, Any], ndim: int) -> Dataset:
    scale: tuple[float, ...] = (1.0,) * ndim
    for t in entry.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = tuple(float(s) for s in t["scale"])
    if len(scale) != ndim:
        raise ValueError(f"level '{entry['path']}' has {len(scale)} scales for {ndim} axes")
    return Dataset(str(entry["path"]), scale)


def _ome(attrs: Mapping[str, Any], where: str) -> dict[str, Any]:
    ome = attrs.get("ome")
    if ome is None:
        raise InvalidVolumeError(f"{where}: no OME-Zarr metadata (no 'ome' attributes)")
    if not isinstance(ome, dict):
        raise InvalidVolumeError(f"{where}: the 'ome' attributes are not a JSON object")
    return dict(ome)


def ome_attrs(node: zarr.Group | zarr.Array, where: str) -> dict[str, Any]:
    """The ``ome`` attributes of a node; a clear error naming ``where`` if absent or broken."""
    return _ome(node.attrs.asdict(), where)


def read_multiscale(node: zarr.Group | zarr.Array, where: str) -> Multiscale:
    return Multiscale.from_attrs(node.attrs.asdict(), where)


def is_image(node: zarr.Group | zarr.Array) -> bool:
    """Whether a group holds ``multiscales`` metadata."""
    ome = node.attrs.asdict().get("ome")
    return isinstance(ome, dict) and bool(ome.get("multiscales"))


def image_ome(ms: Multiscale) -> dict[str, Any]:
    """The ``ome`` attributes of an image group."""
    return {"version": NGFF_VERSION, "multiscales": [ms.to_json()]}


def class_colors(n: int) -> list[tuple[int, int, int, int]]:
    """RGBA per class id: 0 transparent, the others from a small repeating palette."""
    return [_PALETTE[i] if i < len(_PALETTE) else _PALETTE[1 + i % 5] for i in range(n)]


def label_ome(
    ms: Multiscale, source: Mapping[str, Any], classes: Sequence[str] | None = None
) -> dict[str, Any]:
    """The ``ome`` attributes of a label image; ``source`` is its ``image-label.source``.

    With ``classes`` (one name per label value), colours and a ``class`` property per value.
    """
    label: dict[str, Any] = {"version": NGFF_VERSION}
    if classes is not None:
        label["colors"] = [
            {"label-value": i, "rgba": list(rgba)}
            for i, rgba in enumerate(class_colors(len(classes)))
        ]
        label["properties"] = [{"label-value": i, "class": c} for i, c in enumerate(classes)]
    label["source"] = dict(source)
    return {**image_ome(ms), "image-label": label}


def label_source(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The ``image-label.source`` of a label image (the image two levels up by default)."""
    ome = node.attrs.asdict().get("ome")
    label = ome.get("image-label") if isinstance(ome, dict) else None
    source = label.get("source") if isinstance(label, dict) else None
    return dict(source) if isinstance(source, dict) else {"image": "../../"}


def label_names(labels_group: zarr.Group) -> list[str]:
    """The names in a ``labels`` group's ``ome.labels`` (empty if it has none)."""
    ome = labels_group.attrs.asdict().get("ome")
    names = ome.get("labels") if isinstance(ome, dict) else None
    return [str(n) for n in names] if isinstance(names, list) else []


def add_label(labels_group: zarr.Group, name: str) -> None:
    """Add ``name`` to a ``labels`` group's list (kept once, in the order added)."""
    names = label_names(labels_group)
    if name not in names:
        names.append(name)
    labels_group.attrs.update({"ome": {"version": NGFF_VERSION, "labels": names}})


def remove_label(labels_group: zarr.Group, name: str) -> None:
    """Delete the label image ``name`` and drop it from the group's list."""
    if name in labels_group:
        del labels_group[name]
    names = [n for n in label_names(labels_group) if n != name]
    labels_group.attrs.update({"ome": {"version": NGFF_VERSION, "labels": names}})


def write_multiscale(node: zarr.Group | zarr.Array, ms: Multiscale, where: str) -> None:
    """Replace a node's ``multiscales``, keeping the rest of its ``ome`` attributes."""
    ome = ome_attrs(node, where)
    ome.update({"version": NGFF_VERSION, "multiscales": [ms.to_json()]})
    node.attrs.update({"ome": ome})
