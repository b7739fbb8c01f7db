"""Nightly output names: one store per inbox entry, readable, independent of the others."""

from __future__ import annotations

import numpy as np
import tifffile
import zarr

from tasks.inbox import output_for, scan_inbox
from tasks.store import write_image


def _volumes(inbox, names) -> None:
    inbox.mkdir(exist_ok=True)
    a = np.zeros((2, 8, 8), np.uint8)
    for name in names:
        if name.endswith(".zarr"):
            write_image(str(inbox / name), a, "zyx")
        elif "." in name:
            tifffile.imwrite(inbox / name, a, metadata={"axes": "ZYX"})
        else:  # a folder of slices
            (inbox / name).mkdir()
            for i in range(2):
                tifffile.imwrite(inbox / name / f"s{i}.tif", a[i])


def test_two_sources_never_share_an_output_store(tmp_path):
    names = ["a.tif", "a.zarr", "a.ome.zarr", "a", "c.tif", "c.tiff", "c.TIF", "d.ome.tif"]
    _volumes(tmp_path / "inbox", names)
    candidates = scan_inbox(str(tmp_path / "inbox"))
    assert sorted(c.path.rsplit("/", 1)[-1] for c in candidates) == sorted(names)
    out = str(tmp_path / "out")
    stores = {c.path.rsplit("/", 1)[-1]: output_for(out, c) for c in candidates}
    assert len(set(stores.values())) == len(names), stores
    for name, store in stores.items():
        assert store == f"{out}/{name}.ome.zarr"  # readable: the entry's own name
    # The name depends on the entry only, not on what else is in the inbox.
    _volumes(tmp_path / "alone", ["a.tif"])
    [alone] = scan_inbox(str(tmp_path / "alone"))
    assert output_for(out, alone) == stores["a.tif"]
    # And it is a valid zarr store name.
    zarr.open_group(stores["a.zarr"], mode="w")
