"""segflow's box reader (:func:`tasks.tiff.read_box`) against tifffile's own readers.

Reads the boxes an ingest reads (a slab of whole pages' rows; a small box inside pages)
from one stack written three ways (uncompressed strips, zlib strips, zlib 256x256 tiles)
with:

- ``segflow``: :func:`tasks.tiff.read_box` (row bands straight into the buffer; only the
  strips or tiles that overlap the box are decoded);
- ``tifffile_pages``: ``tifffile.imread(path, key=range(z0, z1))`` then the box (whole
  pages decoded);
- ``tifffile_zarr``: ``zarr.open(tifffile.imread(path, aszarr=True))[box]`` (tifffile's
  store: only the segments that overlap are decoded; it cannot be pickled to workers).

Prints one JSON object: per layout and box, the best of ``--repeat`` walls in seconds and
each reader's wall relative to segflow's. Run: ``python -m bench.tiff_reader``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import tifffile
import zarr


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _pages(path: Path, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    (z0, z1), (y0, y1), (x0, x1) = box
    return np.asarray(tifffile.imread(path, key=range(z0, z1)))[:, y0:y1, x0:x1]


def _lazy(arr: zarr.Array, box: tuple[tuple[int, int], ...]) -> np.ndarray:
    (z0, z1), (y0, y1), (x0, x1) = box
    return np.asarray(arr[z0:z1, y0:y1, x0:x1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="64,1024,1024", help="Z,Y,X of the stack")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from tasks.tiff import open_source, read_box, release_files

    shape = tuple(int(v) for v in args.shape.split(","))
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 4000).astype(np.uint16)
    x = shape[2]
    boxes = {
        "slab (16 pages, 128 rows, all columns)": ((0, 16), (256, 384), (0, x)),
        "small (16 pages, 128x128)": ((16, 32), (256, 384), (256, 384)),
    }
    layouts = {
        "strips, uncompressed": {},
        "strips, zlib": {"compression": "zlib", "rowsperstrip": 16},
        "tiles 256, zlib": {"compression": "zlib", "tile": (256, 256)},
    }
    out: dict[str, object] = {"shape": list(shape), "dtype": "uint16", "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, kw in layouts.items():
            path = Path(tmp) / f"{layout.replace(' ', '_').replace(',', '')}.tif"
            tifffile.imwrite(path, data, metadata={"axes": "ZYX"}, **kw)
            source = open_source(str(path))
            store = tifffile.imread(path, aszarr=True)
            arr = zarr.open(store, mode="r")
            for name, box in boxes.items():
                (z0, z1), (y0, y1), (x0, x1) = box
                assert np.array_equal(read_box(source, box), data[z0:z1, y0:y1, x0:x1])
                seg = _best(partial(read_box, source, box), args.repeat)
                pages = _best(partial(_pages, path, box), args.repeat)
                lazy = _best(partial(_lazy, arr, box), args.repeat)
                out["results"].append(  # type: ignore[attr-defined]
                    {
                        "layout": layout,
                        "box": name,
                        "segflow_s": round(seg, 4),
                        "tifffile_pages_s": round(pages, 4),
                        "tifffile_zarr_s": round(lazy, 4),
                        "tifffile_pages_vs_segflow": round(pages / seg, 2),
                        "tifffile_zarr_vs_segflow": round(lazy / seg, 2),
                    }
                )
            store.close()
            release_files()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
