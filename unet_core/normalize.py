"""Global intensity normalisation.

Statistics are computed once over the whole volume (streamed, chunk by chunk, at ingest)
and stored in the image's metadata; inference turns them into one affine map applied to
every tile. Never normalise per tile or per chunk: that makes seams.

Non-finite voxels (NaN, +Inf, -Inf) are left out of every statistic and counted in
:attr:`IntensityStats.nonfinite`; :func:`apply_affine` maps them to 0.0, the normalised
level of the low percentile (percentile normalisation) or of the mean (z-score).

Percentiles are exact order statistics (see :meth:`StatsAccumulator.result`), so a
handful of extreme voxels (one 3e38 in a volume of values near 1) cannot move them; and
:func:`apply_affine` clips the normalised intensity to ``±CLIP`` (5), so such a voxel
reaches the network as a bright voxel, not as ~1e38 that swamps its receptive field.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from numpy.typing import DTypeLike
from pydantic import BaseModel, ConfigDict, Field

from unet_core.errors import ConfigError, InvalidVolumeError

#: Percentiles recorded for every volume (the defaults below must be among them).
RECORDED_PERCENTILES = (0.1, 1.0, 2.0, 50.0, 98.0, 99.0, 99.8, 99.9)
#: Bins of the coarse histogram of wide types (float, 32-bit integers): one per value of
#: the top 16 bits of a 32-bit sort key (see :func:`sort_keys`); the refining pass
#: histograms the low 16 bits inside the few bins that hold the wanted percentiles.
KEY_BINS = 1 << 16
_HALF = 16
_LOW = np.uint32(KEY_BINS - 1)
_SIGN = np.uint32(0x80000000)


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
    nonfinite: int = Field(
        0, ge=0, description="NaN and ±Inf voxels (left out of every other statistic)"
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


#: What a non-finite voxel (NaN, ±Inf) becomes after normalisation.
NONFINITE_VALUE = 0.0
#: Bound of the normalised intensity: :func:`apply_affine` clips to ``[-CLIP, CLIP]``.
#:
#: Chosen by measurement. One voxel set to 3e38 in a float32 image reaches the network,
#: unclipped, as up to ~1e38 and flips labels across its receptive field. Labels changed
#: by it (2D U-Nets of depth 2 on synthetic nuclei, :func:`unet_core.synthetic.blobs`,
#: percentile-normalised; worst of 18 places in a 4×128×128 volume of 65 536 voxels, a
#: network trained 100 steps): unclipped 449; clipped to ±20: 160, ±10: 79, ±5: 42, ±3: 21,
#: ±2: 13. In a 256×256 image (worst of 8 places, either sign, depth 2, 8 channels, 150
#: steps): unclipped 555; ±10: 239 trained on percentiles, 68 on z-scores; ±5: 140 and 30.
#: ±5 is the widest of those bounds that keeps one voxel under 0.1% of the small volume.
#: Real intensities stay inside: percentile normalisation (p1 -> 0, p99.8 -> 1) put the
#: brightest voxel of those images at 1.2 to 2.1 (objects covering 25% to 0.2% of the
#: image); z-scores (mean 0, sd 1) at 4.1 with 25% cover, while sparser images lose the
#: cores of their brightest objects, far above any foreground threshold, to the bound
#: (0.7% of voxels at 5% cover, 0.2% at 0.2% cover; their maxima were 7.3 and 12.7).
CLIP = 5.0
#: Bump when the arithmetic of :func:`apply_affine` changes; part of every run key (a
#: segmentation normalised the old way is recomputed, not resumed). 2: clipped to ±CLIP.
NORMALIZE_REVISION = 2


def apply_affine(
    x: np.ndarray,
    offset: float,
    scale: float,
    *,
    in_place: bool = False,
    source_dtype: DTypeLike | None = None,
) -> np.ndarray:
    """float32 ``clip((x - offset) * scale, -CLIP, CLIP)``; the same arithmetic everywhere
    (training, tiled prediction, the block worker), elementwise, so any chunking of a volume
    gives the same bits as one pass over it.

    Voxels that are not finite in ``x`` (NaN, ±Inf) become :data:`NONFINITE_VALUE` (0.0);
    finite voxels end inside ``[-CLIP, CLIP]`` (:data:`CLIP`, chosen by measurement), also
    an extreme that overflows float32 under the map, so one hot voxel cannot swamp its
    receptive field and no NaN or Inf reaches the network. ``in_place``: a float32 ``x`` is
    overwritten instead of copied. ``source_dtype``: what ``x`` was converted from (default
    ``x.dtype``); integers cannot be non-finite, and for those whose whole range maps
    inside the bounds the clip is skipped (it would change nothing).
    """
    if not (math.isfinite(offset) and math.isfinite(scale)):
        raise ConfigError(f"normalisation offset {offset} and scale {scale} must be finite")
    if in_place and x.dtype == np.float32 and x.flags.writeable:
        out = x
    else:
        out = np.array(x, dtype=np.float32)  # one copy, then in place
    source = np.dtype(x.dtype if source_dtype is None else source_dtype)
    bad: np.ndarray | None = None
    if source.kind not in "biu":
        bad = ~np.isfinite(out)
        if not bad.any():
            bad = None
    with np.errstate(over="ignore", invalid="ignore"):
        out -= np.float32(offset)
        out *= np.float32(scale)
    if not _maps_within(source, offset, scale):
        if scale == 0:
            out.fill(0.0)  # an overflow times 0 would be NaN
        np.clip(out, np.float32(-CLIP), np.float32(CLIP), out=out)
    if bad is not None:
        out[bad] = np.float32(NONFINITE_VALUE)
    return out


def _maps_within(dtype: np.dtype, offset: float, scale: float) -> bool:
    """Whether every value of an integer ``dtype`` maps inside ``[-CLIP, CLIP]`` under
    :func:`apply_affine` (the map is monotonic, so its two ends decide)."""
    if dtype.kind not in "biu":
        return False
    info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
    ends = np.array([info.min, info.max], dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        ends -= np.float32(offset)
        ends *= np.float32(scale)
    return bool(np.isfinite(ends).all() and np.abs(ends).max() <= CLIP)


class StatsAccumulator:
    """Streams chunks and yields :class:`IntensityStats`, never holding the whole image.

    Integer images of up to 16 bits are histogrammed exactly (one bin per value), in one
    pass. Wider types (float, 32-bit integers) take two passes over the same chunks: the
    first (:meth:`add`) keeps a coarse histogram of :func:`sort_keys` (bins about 0.8 %
    wide, logarithmic for floats, so any range fits), the second (:meth:`add_fine`) a
    histogram of the exact keys inside the coarse bins that hold the recorded percentiles.
    Their percentiles are then exact order statistics (float64 data to float32 precision),
    whatever the range of the data. NaN and ±Inf are counted and left out.
    """

    def __init__(self, dtype: np.dtype | type) -> None:
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.nonfinite = 0
        self.total = 0.0
        self.total_sq = 0.0
        self.min = np.inf
        self.max = -np.inf
        self._exact = self.dtype.kind in "ui" and self.dtype.itemsize <= 2
        if self._exact:
            info = np.iinfo(self.dtype)
            self._lo = float(info.min)
            self._bins = int(info.max) - int(info.min) + 1
        else:
            self._lo = 0.0
            self._bins = KEY_BINS
        self.hist = np.zeros(self._bins, dtype=np.int64)
        self._fine_bins: tuple[int, ...] | None = None
        self.fine: np.ndarray | None = None

    @property
    def exact(self) -> bool:
        """True for integer images of up to 16 bits (one histogram bin per value)."""
        return self._exact

    def add(self, chunk: np.ndarray) -> None:
        """First pass: moments, extremes, the (coarse) histogram and the non-finite count."""
        a = np.asarray(chunk)
        if a.size == 0:
            return
        if self._exact:
            # one bincount gives the histogram, and the moments follow from it exactly
            self.add_histogram(integer_histogram(a.astype(self.dtype, copy=False)))
            return
        flat = finite_values(a)
        self.nonfinite += int(a.size - flat.size)
        if flat.size == 0:
            return
        af = flat.astype(np.float64, copy=False)
        self.count += int(flat.size)
        self.total += float(af.sum())
        self.total_sq += float(np.dot(af, af))
        self.min = min(self.min, float(flat.min()))
        self.max = max(self.max, float(flat.max()))
        self.hist += coarse_histogram(flat)

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
        self,
        count: int,
        total: float,
        total_sq: float,
        lo: float,
        hi: float,
        hist: np.ndarray,
        nonfinite: int = 0,
    ) -> None:
        """Merge partial first-pass results kept elsewhere (e.g. per region in a store)."""
        h = np.asarray(hist, dtype=np.int64)
        if h.shape != (self._bins,):
            raise ConfigError(f"histogram has {h.shape} bins, expected {self._bins}")
        self.nonfinite += int(nonfinite)
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
        self.nonfinite += other.nonfinite
        self.total += other.total
        self.total_sq += other.total_sq
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.hist += other.hist

    # --------------------------------------------------------- second pass (wide types)

    def refine_bins(self, percentiles: tuple[float, ...] = RECORDED_PERCENTILES) -> tuple[int, ...]:
        """Coarse bins that hold the wanted percentiles (empty for exact types).

        Fixed by the first call (or by :meth:`add_fine` / :meth:`add_fine_histogram`): the
        second pass must see every chunk of the first."""
        if self._exact or self.count == 0:
            return ()
        if self._fine_bins is None:
            cdf = np.cumsum(self.hist)
            bins = {
                int(np.searchsorted(cdf, _target(q, self.count), side="left")) for q in percentiles
            }
            self._fine_bins = tuple(sorted(min(b, KEY_BINS - 1) for b in bins))
            self.fine = np.zeros((len(self._fine_bins), KEY_BINS), dtype=np.int64)
        return self._fine_bins

    def add_fine(self, chunk: np.ndarray) -> None:
        """Second pass (wide types only; a no-op otherwise): exact keys inside
        :meth:`refine_bins`. Give it the same chunks as :meth:`add`, after all of them."""
        bins = self.refine_bins()
        if not bins:
            return
        assert self.fine is not None
        self.fine += fine_histogram(np.asarray(chunk), bins)

    def add_fine_histogram(self, bins: tuple[int, ...], fine: np.ndarray) -> None:
        """Merge a partial second-pass histogram (as from :func:`fine_histogram`)."""
        if tuple(bins) != self.refine_bins():
            raise ConfigError(f"fine histogram of bins {bins}, expected {self.refine_bins()}")
        assert self.fine is not None
        self.fine += np.asarray(fine, dtype=np.int64).reshape(self.fine.shape)

    # -------------------------------------------------------------------------- result

    def result(self, percentiles: tuple[float, ...] = RECORDED_PERCENTILES) -> IntensityStats:
        """The statistics. Percentile q is the order statistic of (0-based) rank
        ``ceil(q / 100 * (count - 1))``, exact for exact types and, after the second
        pass, for wide types (without it: to within a coarse bin)."""
        if self.count == 0:
            what = f" (all {self.nonfinite} voxels are NaN or ±Inf)" if self.nonfinite else ""
            raise InvalidVolumeError(f"the image has no finite values{what}")
        mean = self.total / self.count
        var = max(self.total_sq / self.count - mean * mean, 0.0)
        cdf = np.cumsum(self.hist)
        values: dict[str, float] = {}
        for q in percentiles:
            target = _target(q, self.count)
            idx = min(int(np.searchsorted(cdf, target, side="left")), self._bins - 1)
            if self._exact:
                value = self._lo + idx
            else:
                value = self._key_value(idx, target - (float(cdf[idx - 1]) if idx else 0.0))
            values[_pkey(q)] = float(min(max(value, self.min), self.max))
        return IntensityStats(
            count=self.count,
            min=float(self.min),
            max=float(self.max),
            mean=float(mean),
            std=float(np.sqrt(var)),
            percentiles=values,
            nonfinite=self.nonfinite,
        )

    def _key_value(self, coarse: int, within: float) -> float:
        """Value of the ``within``-th key (1-based, may be fractional) of a coarse bin."""
        bins = self._fine_bins or ()
        if coarse in bins:
            assert self.fine is not None
            fine_cdf = np.cumsum(self.fine[bins.index(coarse)])
            low = min(int(np.searchsorted(fine_cdf, within, side="left")), KEY_BINS - 1)
        else:
            low = KEY_BINS // 2  # no second pass: the middle of the coarse bin
        key = np.array([(coarse << _HALF) | low], dtype=np.uint32)
        return float(key_values(key, self.dtype)[0])


def _target(q: float, count: int) -> float:
    """1-based cumulative count at which percentile ``q`` is reached."""
    return math.ceil(q / 100.0 * (count - 1)) + 1.0


def finite_values(a: np.ndarray) -> np.ndarray:
    """The finite values of ``a``, flattened (a view when all are finite)."""
    flat = np.asarray(a).reshape(-1)
    if flat.dtype.kind != "f":
        return flat
    mask = np.isfinite(flat)
    return flat if mask.all() else flat[mask]


def sort_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys whose order is the order of ``values`` (finite values of any real type).

    int32 and uint32 map exactly; other types go through float32 (rounded to nearest, an
    order-preserving map), whose bits are made sortable: negative numbers reversed below
    the positives. :func:`key_values` inverts it."""
    a = np.asarray(values)
    if a.dtype == np.uint32:
        return a.astype(np.uint32, copy=False)
    if a.dtype == np.int32:
        return a.view(np.uint32) ^ _SIGN
    with np.errstate(over="ignore"):
        bits = a.astype(np.float32).view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_values(keys: np.ndarray, dtype: np.dtype | type) -> np.ndarray:
    """float64 values of :func:`sort_keys` keys of data of ``dtype``."""
    k = np.asarray(keys, dtype=np.uint32)
    d = np.dtype(dtype)
    if d == np.uint32:
        return k.astype(np.float64)
    if d == np.int32:
        return (k ^ _SIGN).view(np.int32).astype(np.float64)
    bits = np.where(k & _SIGN, k & ~_SIGN, ~k)
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def coarse_histogram(chunk: np.ndarray) -> np.ndarray:
    """First-pass histogram of a wide type: counts of the top 16 bits of the keys of the
    finite values of ``chunk``; ``KEY_BINS`` int64."""
    return np.bincount(sort_keys(finite_values(chunk)) >> _HALF, minlength=KEY_BINS).astype(
        np.int64, copy=False
    )


def fine_histogram(chunk: np.ndarray, bins: tuple[int, ...], piece: int = 1 << 20) -> np.ndarray:
    """Second-pass histogram: for each coarse bin of ``bins`` (sorted), counts of the low 16
    bits of the keys of the finite values of ``chunk`` that fall in it;
    ``(len(bins), KEY_BINS)`` int64."""
    out = np.zeros(len(bins) * KEY_BINS, dtype=np.int64)
    if not bins:
        return out.reshape(0, KEY_BINS)
    slot = np.full(KEY_BINS, -1, dtype=np.int64)
    slot[list(bins)] = np.arange(len(bins))
    flat = finite_values(chunk)
    for start in range(0, flat.size, piece):
        keys = sort_keys(flat[start : start + piece])
        where = slot[keys >> _HALF]
        hit = where >= 0
        if hit.any():
            index = where[hit] * KEY_BINS + (keys[hit] & _LOW)
            out += np.bincount(index, minlength=out.size)
    return out.reshape(len(bins), KEY_BINS)


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


def compute_stats(*arrays: np.ndarray) -> IntensityStats:
    """Statistics of in-memory arrays, pooled (the same definitions as the streamed ones)."""
    if not arrays:
        raise ConfigError("compute_stats needs at least one array")
    dtype = np.result_type(*[np.asarray(a).dtype for a in arrays])
    acc = StatsAccumulator(dtype)
    for a in arrays:
        acc.add(np.asarray(a).astype(dtype, copy=False))
    for a in arrays:
        acc.add_fine(np.asarray(a).astype(dtype, copy=False))
    return acc.result()
