"""Strict reads: arrays of which segflow wrote every chunk, read with missing chunks as errors.

:class:`StrictArray` raises :class:`MissingDataError` naming the chunk when one is missing or
cannot be decoded, where zarr would silently return the fill value. :class:`ChunkCache`
keeps decoded chunks that several reads share (a block's neighbours read its chunks for
the network's context).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import zarr

from tasks.store import read_region
from unet_core.errors import MissingDataError


class ChunkCache:
    """Decoded chunks of arrays that a run only reads, up to a byte budget (the least
    recently used go first; thread safe).

    A block reads the network's context around it from its neighbours' chunks: in 3D its
    read box touches up to 27 chunks for one chunk of output, and the next block in C order
    needs 18 of them again. Kept decoded, each chunk is read and decompressed about once
    per run instead of up to 27 times. ``hits`` and ``misses`` count chunk lookups.
    """

    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._chunks: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> None:
        """Raise the budget to at least ``nbytes`` (it never shrinks)."""
        with self._lock:
            self.max_bytes = max(self.max_bytes, int(nbytes))

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is None:
                self.misses += 1
                return None
            self._chunks.move_to_end(key)
            self.hits += 1
            return chunk

    def put(self, key: Hashable, chunk: np.ndarray) -> None:
        chunk.flags.writeable = False  # shared by every reader of the chunk
        with self._lock:
            if chunk.nbytes > self.max_bytes:
                return  # never fits: keep what is there
            old = self._chunks.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            while self._chunks and self.nbytes + chunk.nbytes > self.max_bytes:
                _, dropped = self._chunks.popitem(last=False)
                self.nbytes -= dropped.nbytes
            self._chunks[key] = chunk
            self.nbytes += chunk.nbytes

    def clear(self) -> None:
        with self._lock:
            self._chunks.clear()
            self.nbytes = 0


class StrictArray:
    """Reads of an array of which every chunk was written: missing chunks are errors.

    Supports the basic slicing that segflow's readers use (a tuple of slices). With a
    ``cache``, reads go through it by whole chunks; ``tag`` is part of every cache key
    and must change when the array's content may have (segflow passes the run key, which
    holds the image's identity)."""

    def __init__(
        self,
        array: zarr.Array,
        url: str,
        path: str = "",
        cache: ChunkCache | None = None,
        tag: Hashable = None,
    ) -> None:
        self.array = array
        self.url = str(url)
        self.path = path
        self.cache = cache
        self.tag = tag

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.array.dtype)

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.array.chunks)

    @property
    def ndim(self) -> int:
        return int(self.array.ndim)

    def _ranges(self, sel: Any) -> list[range]:
        sel = self._expand(sel)
        grid = self.array.shards or self.array.chunks
        out = []
        for s, n, c in zip(sel, self.shape, grid, strict=True):
            if isinstance(s, slice):
                a, b, _ = s.indices(n)
            else:
                a = int(s) % n if n else 0
                b = a + 1
            out.append(range(a // c, (max(b, a + 1) - 1) // c + 1) if b > a else range(0))
        return out

    def _keys(self, sel: Any) -> list[tuple[tuple[int, ...], str]]:
        prefix = self.array.store_path.path
        keys = []
        for coords in itertools.product(*self._ranges(sel)):
            key = self.array.metadata.encode_chunk_key(coords)
            keys.append((coords, f"{prefix}/{key}" if prefix else key))
        return keys

    def _where(self, coords: tuple[int, ...]) -> str:
        name = f"{self.path}/" if self.path else ""
        return f"{self.url}: chunk {name}{'/'.join(map(str, coords))}"

    def chunk_set_bytes(self, shape: Sequence[int]) -> int:
        """Most bytes of the chunks one read of ``shape`` (anywhere) touches: what a
        :class:`ChunkCache` must hold for the next read beside it to find its shared chunks."""
        chunks = self.chunks
        per_axis = (
            min(-(-(n - 1) // c) + 1, -(-m // c))  # worst placement, at most the whole axis
            for n, c, m in zip(shape, chunks, self.shape, strict=True)
        )
        return math.prod(per_axis) * math.prod(chunks) * self.dtype.itemsize

    def __getitem__(self, sel: Any) -> np.ndarray:
        if self.cache is None:
            return self._read(sel)
        out = self._read_cached(self._normal(sel), self.cache)
        dropped = self._integer_axes(sel)
        return out.reshape([n for i, n in enumerate(out.shape) if i not in dropped])

    def _read_cached(self, sel: tuple[slice, ...], cache: ChunkCache) -> np.ndarray:
        """``sel`` assembled from whole chunks, those not in ``cache`` read in one request."""
        chunks = self.chunks
        bounds = [s.indices(n)[:2] for s, n in zip(sel, self.shape, strict=True)]
        ranges = [
            range(a // c, (b - 1) // c + 1) if b > a else range(0)
            for (a, b), c in zip(bounds, chunks, strict=True)
        ]
        found: dict[tuple[int, ...], np.ndarray] = {}
        missing = []
        for coords in itertools.product(*ranges):
            chunk = cache.get((self.tag, self.url, self.path, coords))
            if chunk is None:
                missing.append(coords)
            else:
                found[coords] = chunk
        if missing:
            lo = [min(c[a] for c in missing) for a in range(self.ndim)]
            hi = [max(c[a] for c in missing) + 1 for a in range(self.ndim)]
            region = tuple(
                slice(i * c, min(j * c, n))
                for i, j, c, n in zip(lo, hi, chunks, self.shape, strict=True)
            )
            data = self._read(region)  # checked for missing chunks, errors named
            for coords in itertools.product(*(range(i, j) for i, j in zip(lo, hi, strict=True))):
                part = tuple(
                    slice((k - i) * c, min((k - i + 1) * c, n - i * c))
                    for k, i, c, n in zip(coords, lo, chunks, self.shape, strict=True)
                )
                chunk = data[part].copy()
                cache.put((self.tag, self.url, self.path, coords), chunk)
                found[coords] = chunk
            if region == tuple(slice(a, b) for a, b in bounds):
                return data  # nothing was cached: the one read is the answer
        out = np.empty([b - a for a, b in bounds], dtype=self.dtype)
        for coords in itertools.product(*ranges):
            chunk = found[coords]
            dst, src = [], []
            for k, c, (a, b) in zip(coords, chunks, bounds, strict=True):
                start, stop = max(a, k * c), min(b, (k + 1) * c)
                dst.append(slice(start - a, stop - a))
                src.append(slice(start - k * c, stop - k * c))
            out[tuple(dst)] = chunk[tuple(src)]
        return out

    def _read(self, sel: Any) -> np.ndarray:
        from zarr.core.sync import sync

        keys = self._keys(sel)
        store = self.array.store_path.store

        async def exists_all() -> list[bool]:
            import asyncio

            return list(await asyncio.gather(*(store.exists(k) for _, k in keys)))

        present = sync(exists_all())
        for (coords, _), ok in zip(keys, present, strict=True):
            if not ok:
                raise MissingDataError(
                    f"{self._where(coords)} is missing (it was written before; the store "
                    "was damaged or is being rewritten)"
                )
        out = read_region(self.array, self._normal(sel), self.url)
        dropped = self._integer_axes(sel)  # an integer index drops its axis, as in NumPy
        return out.reshape([n for i, n in enumerate(out.shape) if i not in dropped])

    def _expand(self, sel: Any) -> tuple[Any, ...]:
        """One entry (a slice or an integer) per axis."""
        if not isinstance(sel, tuple):
            sel = (sel,)
        if any(s is Ellipsis for s in sel):
            i = sel.index(Ellipsis)
            sel = sel[:i] + (slice(None),) * (self.ndim - len(sel) + 1) + sel[i + 1 :]
        return tuple(sel) + (slice(None),) * (self.ndim - len(sel))

    def _integer_axes(self, sel: Any) -> set[int]:
        return {i for i, s in enumerate(self._expand(sel)) if not isinstance(s, slice)}

    def _normal(self, sel: Any) -> tuple[slice, ...]:
        """The selection as one slice per axis (what :func:`read_region` takes)."""
        ranges = []
        sel = self._expand(sel)
        for s, n in zip(sel, self.shape, strict=True):
            ranges.append(s if isinstance(s, slice) else slice(int(s) % n, int(s) % n + 1))
        return tuple(ranges)
