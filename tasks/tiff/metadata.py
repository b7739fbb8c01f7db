"""What a TIFF's metadata says about its axes and voxel sizes (OME-XML, ImageJ, tifffile's
shaped metadata, resolution tags), mapped onto segflow's axes ``[c][z]yx``; a value that
is not a finite positive size is a warning with the fallback named, never an error."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import numpy as np
import tifffile

from unet_core.errors import (
    ConfigError,
    InvalidVolumeError,
    opt,
)

#: Length units found in OME-XML, ImageJ and TIFF tags, in micrometres.
_UNIT_UM = {
    "micrometer": 1.0,
    "micrometre": 1.0,
    "µm": 1.0,
    "μm": 1.0,
    "um": 1.0,
    "micron": 1.0,
    "microns": 1.0,
    "\\u00b5m": 1.0,
    "nanometer": 1e-3,
    "nm": 1e-3,
    "millimeter": 1e3,
    "mm": 1e3,
    "centimeter": 1e4,
    "cm": 1e4,
    "meter": 1e6,
    "m": 1e6,
    "angstrom": 1e-4,
    "å": 1e-4,
    "picometer": 1e-6,
    "pm": 1e-6,
}
#: TIFF ResolutionUnit values with a physical meaning for microscopy (inch is mostly "72 dpi").
_RESUNIT_UM = {3: 1e4, 4: 1e3, 5: 1.0}
#: What a voxel size from the metadata that is not finite and positive becomes.
FALLBACK_VOXEL_SIZE = 1.0

log = logging.getLogger(__name__)

#: (file, message) pairs warned about in this process: a source is opened by the run's
#: plan and again by its ingest, and says each thing once.
_WARNED: set[tuple[str, str]] = set()


def warn_once(url: str, message: str, *args: Any) -> None:
    """``log.warning(message, *args)``, once per file and message in this process."""
    if (url, message) not in _WARNED:
        _WARNED.add((url, message))
        log.warning(message, *args)


def _axes_source(tif: Any, series: Any) -> str:
    kind = str(series.kind)
    if kind in ("ome", "imagej"):
        return kind
    if kind == "shaped" and "Q" not in str(series.axes):
        return "tifffile"  # axes written by tifffile's shaped metadata
    if kind in ("lsm", "stk", "fluoview", "mmstack", "ndtiff", "scanimage", "nih"):
        return kind
    return "none"


_PAGE_LEVEL = {"Y": "y", "X": "x", "S": "c", "Z": "z"}
_META_LETTERS = {"Z": "z", "C": "c", "S": "c", "T": "t"}


def _map_axes(
    url: str,
    saxes: str,
    page_shape: tuple[int, ...],
    kf: Any,
    norm: tuple[int, int, int, int, int],
    user_axes: str | None,
    meta_kind: str,
) -> tuple[tuple[str, ...], str, str]:
    """Output letter of each source dim, the output axes and where they came from."""
    npd = len(page_shape)
    page_level = str(kf.axes)
    expected_page = "".join(_PAGE_LEVEL.get(a, "?") for a in page_level)
    if user_axes is not None:
        ua = user_axes.strip().lower()
        if len(ua) != len(saxes):
            raise ConfigError(
                f"{url}: {opt('axes')} '{user_axes}' names {len(ua)} axes but the image has "
                f"{len(saxes)} (tifffile reads it as '{saxes}' with shape "
                f"{(*page_shape, *kf.shape)})"
            )
        if ua[npd:] != expected_page:
            raise ConfigError(
                f"{url}: {opt('axes')} '{user_axes}' must end with '{expected_page}' (the axes "
                f"within one TIFF page, '{page_level}')"
            )
        page_letters = list(ua[:npd])
        from_ = "--axes"
    else:
        page_letters = []
        for a, n in zip(saxes[:npd], page_shape, strict=True):
            letter = _META_LETTERS.get(a) if meta_kind not in ("none",) else None
            if meta_kind == "slices":
                letter = "z"
            if n == 1 and letter in (None, "t"):
                letter = ""  # one page along an unknown axis or one time point: no axis
            if letter is None and meta_kind == "none" and npd == 1 and expected_page == "yx":
                # a stack of single-channel planes with no axis metadata at all (a plain
                # tifffile.imwrite(path, volume)): the planes are z-slices
                letter = "z"
                warn_once(
                    url,
                    f"%s: no axis metadata; its %d pages are read as z-slices (ZYX); name "
                    f"the axes with {opt('axes')} to say otherwise",
                    url,
                    n,
                )
            if letter is None:
                raise InvalidVolumeError(
                    f"{url}: the axes are ambiguous ({n} pages along '{a}' could be z-slices, "
                    f"channels or time points; the file reads as '{saxes}'), pass {opt('axes')}, "
                    f"e.g. {opt('axes')} z{expected_page}"
                )
            page_letters.append(letter)
        from_ = meta_kind if npd else "page"
    for a in page_letters:
        if a not in "cz":
            what = "time series are not supported" if a == "t" else f"unknown axis '{a}'"
            raise InvalidVolumeError(
                f"{url}: {what} (axes '{saxes}'); pass {opt('axes')} to name each axis z or c"
            )
    s_sep, depth, _rows, _cols, s_contig = norm
    letters = (
        *page_letters,
        "c" if s_sep > 1 else "",
        "z" if depth > 1 else "",
        "y",
        "x",
        "c" if s_contig > 1 else "",
    )
    named = [a for a in letters if a]
    if len(set(named)) != len(named):
        raise InvalidVolumeError(
            f"{url}: axes '{saxes}' name {'channels' if named.count('c') > 1 else 'z'} "
            "twice, which segflow cannot store"
        )
    out_axes = "".join(a for a in "czyx" if a in named)
    return letters, out_axes, from_


def _physical_sizes(url: str, tif: Any, series: Any, kf: Any) -> dict[str, float]:
    """Voxel size in micrometres per axis letter z/y/x, where the metadata states it.

    A stated size that is not a finite positive number (OME ``PhysicalSizeX="INF"``, 0, a
    negative or NaN size, a resolution tag of 0) becomes
    :data:`FALLBACK_VOXEL_SIZE` (in micrometres), with one warning naming the file, the
    axis and the value."""
    sizes: dict[str, float] = {}

    def take(axis: str, value: Any, factor: float, where: str) -> None:
        try:
            size = float(value) * factor
        except (TypeError, ValueError, OverflowError):
            size = math.nan
        if math.isfinite(size) and size > 0:
            sizes[axis] = size
        else:  # stated, but not a size: the fallback, said here (not again as "no size")
            sizes[axis] = FALLBACK_VOXEL_SIZE
            log.warning(
                "%s: the metadata gives voxel size %s for axis %s (%s), which is not a "
                "finite positive number; using %s µm",
                url,
                value,
                axis,
                where,
                FALLBACK_VOXEL_SIZE,
            )

    with contextlib.suppress(Exception):
        if tif.is_ome and tif.ome_metadata:
            ome = tifffile.xml2dict(tif.ome_metadata).get("OME", {})
            images = ome.get("Image", [])
            images = images if isinstance(images, list) else [images]
            pixels = images[min(int(getattr(series, "_index", 0)), len(images) - 1)]["Pixels"]
            for axis in "XYZ":
                value = pixels.get(f"PhysicalSize{axis}")
                unit = str(pixels.get(f"PhysicalSize{axis}Unit", "µm")).lower()
                if value is not None and unit in _UNIT_UM:
                    take(axis.lower(), value, _UNIT_UM[unit], f"OME PhysicalSize{axis}")
            return sizes
    with contextlib.suppress(Exception):
        if tif.is_imagej and tif.imagej_metadata is not None:
            meta = tif.imagej_metadata
            unit = str(meta.get("unit", "")).lower()
            factor = _UNIT_UM.get(unit)
            if factor is not None:
                for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                    _take_resolution(take, axis, kf, tag, factor)
                if "spacing" in meta:
                    take("z", meta["spacing"], factor, "ImageJ spacing")
            return sizes
    with contextlib.suppress(Exception):
        resunit = int(kf.tags["ResolutionUnit"].value) if "ResolutionUnit" in kf.tags else 2
        factor = _RESUNIT_UM.get(resunit)
        if factor is not None:
            for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                _take_resolution(take, axis, kf, tag, factor)
    return sizes


def _take_resolution(take: Any, axis: str, kf: Any, tag: str, factor: float) -> None:
    """Voxel size from a resolution tag (pixels per unit): ``factor / resolution``."""
    if tag not in kf.tags:
        return
    value = kf.tags[tag].value
    num, den = (value if isinstance(value, tuple) else (value, 1))[:2]
    with np.errstate(divide="ignore", invalid="ignore"):
        res = np.float64(num) / np.float64(den)
        size = np.float64(factor) / res
    take(axis, size, 1.0, f"{tag} {num}/{den}")
