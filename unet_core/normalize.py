"""Global intensity normalisation.

Statistics are computed once over the whole volume (streamed, chunk by chunk, at ingest)
and stored in the image's metadata; inference turns them into one affine map applied to
every tile. Never normalise per tile or per chunk: that makes seams.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from unet_core.errors import ConfigError

#: Percentiles recorded for every volume (the defaults below must be among them).
RECORDED_PERCENTILES = (0.1, 1.0, 2.0, 50.0, 98.0, 99.0, 99.8, 99.9)


class IntensityStats(BaseModel):
    """Global statistics of one image (all channels pooled)."""

    model_config = ConfigDict(frozen=True)

    count: int
    min: float
    max: float
    mean: float
    std: float
    percentiles: dict[str, float] = Field(
        default_factory=dict, description="percentile (as a string, e.g. '99.8') -> value"
    )

    def percentile(self, q: float) -> float:
        key = _pkey(q)
        if key not in self.percentiles:
            raise ConfigError(
                f"percentile {q} was not recorded for this image (have {sorted(self.percentiles)})"
            )
        return self.percentiles[key]


def _pkey(q: float) -> str:
    return f"{float(q):g}"


class Normalization(BaseModel):
    """How intensities are mapped before the network: ``(x - offset) * scale``."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["none", "percentile", "zscore"] = "percentile"
    low: float = Field(1.0, ge=0, le=100, description="lower percentile -> 0")
    high: float = Field(99.8, ge=0, le=100, description="upper percentile -> 1")

    def affine(self, stats: IntensityStats | None) -> tuple[float, float]:
        """``(offset, scale)`` for an image with these global statistics."""
        if self.kind == "none":
            return 0.0, 1.0
        if stats is None:
            raise ConfigError(f"{self.kind} normalisation needs the image's global statistics")
        if self.kind == "zscore":
            return stats.mean, 1.0 / max(stats.std, 1e-12)
        lo, hi = stats.percentile(self.low), stats.percentile(self.high)
        return lo, 1.0 / max(hi - lo, 1e-12)


def apply_affine(x: np.ndarray, offset: float, scale: float) -> np.ndarray:
    """float32 ``(x - offset) * scale``; the same arithmetic everywhere (bitwise exactness)."""
    out = np.array(x, dtype=np.float32)  # one copy, then in place
    out -= np.float32(offset)
    out *= np.float32(scale)
    return out


class StatsAccumulator:
    """Streams chunks and yields :class:`IntensityStats`, never holding the whole image.

    Integer images of up to 16 bits are histogrammed exactly (one bin per value), so their
    percentiles are exact. Wider or float images use a fixed-range histogram: pass
    ``value_range`` (e.g. from a first min/max pass); percentiles are then accurate to one
    bin of ``bins``.
    """

    def __init__(
        self,
        dtype: np.dtype | type,
        value_range: tuple[float, float] | None = None,
        bins: int = 65536,
    ) -> None:
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.min = np.inf
        self.max = -np.inf
        if self.dtype.kind in "ui" and self.dtype.itemsize <= 2:
            info = np.iinfo(self.dtype)
            self._lo, self._hi = float(info.min), float(info.max) + 1.0
            self._bins = int(info.max) - int(info.min) + 1
            self._exact = True
        else:
            if value_range is None:
                raise ConfigError(f"a {self.dtype} image needs a value range for its histogram")
            lo, hi = float(value_range[0]), float(value_range[1])
            self._lo, self._hi = lo, (hi if hi > lo else lo + 1.0)
            self._bins = bins
            self._exact = False
        self.hist = np.zeros(self._bins, dtype=np.int64)

    def add(self, chunk: np.ndarray) -> None:
        a = np.asarray(chunk)
        if a.size == 0:
            return
        if self._exact:
            # one bincount gives the histogram, and the moments follow from it exactly
            self.add_histogram(integer_histogram(a.astype(self.dtype, copy=False)))
            return
        self.count += a.size
        af = a.astype(np.float64, copy=False)
        self.total += float(af.sum())
        self.total_sq += float(np.square(af).sum())
        self.min = min(self.min, float(a.min()))
        self.max = max(self.max, float(a.max()))
        h, _ = np.histogram(af, bins=self._bins, range=(self._lo, self._hi))
        self.hist += h

    @property
    def exact(self) -> bool:
        """True for integer images of up to 16 bits (one histogram bin per value)."""
        return self._exact

    @property
    def value_range(self) -> tuple[float, float]:
        """The histogram's range ``[lo, hi)``."""
        return self._lo, self._hi

    def add_histogram(self, hist: np.ndarray) -> None:
        """Add the exact histogram of some voxels (as from :func:`integer_histogram`)."""
        if not self._exact:
            raise ConfigError(f"a {self.dtype} image has no exact histogram")
        h = np.asarray(hist, dtype=np.int64)
        if h.shape != (self._bins,):
            raise ConfigError(f"histogram has {h.shape} bins, expected {self._bins}")
        nz = np.flatnonzero(h)
        if nz.size == 0:
            return
        counts = h[nz].astype(np.float64)
        values = self._lo + nz.astype(np.float64)
        self.count += int(h.sum())
        self.total += float(np.dot(counts, values))
        self.total_sq += float(np.dot(counts, values * values))
        self.min = min(self.min, float(values[0]))
        self.max = max(self.max, float(values[-1]))
        self.hist += h

    def add_parts(
        self, count: int, total: float, total_sq: float, lo: float, hi: float, hist: np.ndarray
    ) -> None:
        """Merge partial results kept elsewhere (e.g. per region in a store)."""
        h = np.asarray(hist, dtype=np.int64)
        if h.shape != (self._bins,):
            raise ConfigError(f"histogram has {h.shape} bins, expected {self._bins}")
        if count <= 0:
            return
        self.count += int(count)
        self.total += float(total)
        self.total_sq += float(total_sq)
        self.min = min(self.min, float(lo))
        self.max = max(self.max, float(hi))
        self.hist += h

    def merge(self, other: StatsAccumulator) -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.hist += other.hist

    def result(self, percentiles: tuple[float, ...] = RECORDED_PERCENTILES) -> IntensityStats:
        if self.count == 0:
            raise ConfigError("no voxels were seen; statistics of an empty image are undefined")
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        cdf = np.cumsum(self.hist)
        width = (self._hi - self._lo) / self._bins
        values: dict[str, float] = {}
        for q in percentiles:
            rank = q / 100.0 * (self.count - 1)
            idx = int(np.searchsorted(cdf, rank + 1, side="left"))
            idx = min(idx, self._bins - 1)
            value = self._lo + idx * width if self._exact else self._lo + (idx + 0.5) * width
            values[_pkey(q)] = float(min(max(value, self.min), self.max))
        return IntensityStats(
            count=self.count,
            min=float(self.min),
            max=float(self.max),
            mean=float(mean),
            std=float(np.sqrt(var)),
            percentiles=values,
        )


def integer_histogram(a: np.ndarray, piece: int = 1 << 18) -> np.ndarray:
    """Exact histogram of an integer array of at most 16 bits, one bin per value of its dtype
    starting at the dtype's minimum (256 or 65536 int64 bins). Works piecewise, so the extra
    memory stays small whatever the size of ``a``."""
    dtype = np.dtype(a.dtype)
    if dtype.kind not in "ui" or dtype.itemsize > 2:
        raise ConfigError(f"no exact histogram for {dtype}")
    nbins = 1 << (8 * dtype.itemsize)
    flat = np.ascontiguousarray(a).reshape(-1)
    if dtype.kind == "i":
        flat = flat.view(np.dtype(f"u{dtype.itemsize}"))
    hist = np.zeros(nbins, dtype=np.int64)
    for start in range(0, flat.size, piece):
        hist += np.bincount(flat[start : start + piece], minlength=nbins)
    if dtype.kind == "i":
        hist = np.roll(hist, nbins // 2)  # bin 0 holds the dtype's minimum
    return hist


def compute_stats(array: np.ndarray) -> IntensityStats:
    """Statistics of an in-memory array (same definitions as the streamed ones)."""
    a = np.asarray(array)
    acc = StatsAccumulator(
        a.dtype, value_range=(float(a.min()), float(a.max())) if a.size else None
    )
    acc.add(a)
    return acc.result()
