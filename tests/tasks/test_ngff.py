"""NGFF metadata written by tasks.ngff reads back through it and validates with the readers."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from tasks.ngff import (
    Multiscale,
    add_label,
    compressors,
    image_ome,
    label_names,
    label_ome,
    label_source,
    read_multiscale,
    write_multiscale,
)
from unet_core.errors import InvalidVolumeError


def _image_with_labels(path) -> str:
    """A 3-level czyx image with two 3-level label images (levels halve y, x, then z, y, x)."""
    url = str(path)
    shapes = [(8, 32, 32), (8, 16, 16), (4, 8, 8)]
    ms = Multiscale.build("czyx", (1.0, 2.0, 0.5, 0.5), [(1, 1, 2, 2), (1, 2, 2, 2)])
    root = zarr.open_group(url, mode="w")
    for ds, shape in zip(ms.datasets, shapes, strict=True):
        root.create_array(
            ds.path,
            shape=(2, *shape),
            chunks=(2, *shape),
            dtype="uint16",
            compressors=compressors(),
            dimension_names=list("czyx"),
        )[...] = 7
    root.attrs["ome"] = image_ome(ms)
    labels = root.create_group("labels")
    for name, classes in (("semantic", ["background", "cell"]), ("instances", None)):
        add_label(labels, name)
        add_label(labels, name)  # kept once
        group = labels.create_group(name)
        lms = Multiscale.build("zyx", (2.0, 0.5, 0.5), [(1, 2, 2), (2, 2, 2)], name=name)
        group.attrs["ome"] = label_ome(lms, {"image": "../../"}, classes)
        for ds, shape in zip(lms.datasets, shapes, strict=True):
            group.create_array(
                ds.path, shape=shape, chunks=shape, dtype="uint8", dimension_names=list("zyx")
            )[...] = 1
    return url


def test_metadata_round_trips_and_validates(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    url = _image_with_labels(tmp_path / "img.ome.zarr")
    root = zarr.open_group(url, mode="r")
    ms = read_multiscale(root, url)
    assert ms == Multiscale.build("czyx", (1.0, 2.0, 0.5, 0.5), [(1, 1, 2, 2), (1, 2, 2, 2)])
    assert Multiscale.from_attrs({"ome": image_ome(ms)}, "x") == ms
    assert ms.axis_names == "czyx"
    assert ms.unit == "micrometer"
    assert [a.type for a in ms.axes] == ["channel", "space", "space", "space"]
    assert [d.scale for d in ms.datasets] == [
        (1.0, 2.0, 0.5, 0.5),
        (1.0, 2.0, 1.0, 1.0),
        (1.0, 4.0, 2.0, 2.0),
    ]
    assert label_names(root["labels"]) == ["semantic", "instances"]
    assert label_source(root["labels/semantic"]) == {"image": "../../"}

    model = Image.from_zarr(root)
    assert [a.name for a in model.attributes.ome.multiscales[0].axes] == list("czyx")
    assert Labels.from_zarr(root["labels"]).attributes.ome.labels == ["semantic", "instances"]
    semantic = ImageLabel.from_zarr(root["labels/semantic"]).attributes.ome.image_label
    assert [c.rgba for c in semantic.colors] == [(0, 0, 0, 0), (255, 64, 64, 160)]
    assert ImageLabel.from_zarr(root["labels/instances"]).attributes.ome.image_label is not None

    nodes = list(Reader(parse_url(url))())
    assert nodes[0].metadata["axes"] == [a.to_json() for a in ms.axes]
    assert [t[0]["scale"] for t in nodes[0].metadata["coordinateTransformations"]] == [
        list(d.scale) for d in ms.datasets
    ]
    assert [np.asarray(d).shape for d in nodes[0].data] == [
        (2, 8, 32, 32),
        (2, 8, 16, 16),
        (2, 4, 8, 8),
    ]
    specs = {type(s).__name__ for node in nodes for s in node.specs}
    assert {"Multiscales", "Labels", "Label"} <= specs


def test_rewriting_levels_keeps_the_label_metadata(tmp_path):
    url = _image_with_labels(tmp_path / "img.ome.zarr")
    group = zarr.open_group(url, mode="r+")["labels/semantic"]
    ms = read_multiscale(group, "semantic")
    write_multiscale(group, ms.with_scales([(2.0, 0.5, 0.5), (2.0, 1.0, 1.0)]), "semantic")
    again = read_multiscale(group, "semantic")
    assert [d.path for d in again.datasets] == ["0", "1"]
    assert again.name == "semantic"
    assert again.axes == ms.axes
    assert group.attrs["ome"]["image-label"]["properties"][1] == {"label-value": 1, "class": "cell"}


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({}, r"no OME-Zarr metadata"),
        ({"ome": ["x"]}, r"not a JSON object"),
        ({"ome": {"version": "0.5"}}, r"no 'multiscales' metadata"),
        ({"ome": {"multiscales": [{"axes": [{"name": "y"}]}]}}, r"malformed"),
        (
            {"ome": {"multiscales": [{"axes": [{"name": "y"}], "datasets": []}]}},
            r"no axes or levels",
        ),
        (
            {
                "ome": {
                    "multiscales": [
                        {
                            "axes": [{"name": "y"}, {"name": "x"}],
                            "datasets": [
                                {
                                    "path": "0",
                                    "coordinateTransformations": [{"type": "scale", "scale": [1]}],
                                }
                            ],
                        }
                    ]
                }
            },
            r"malformed.*1 scales for 2 axes",
        ),
    ],
)
def test_missing_or_broken_metadata_is_one_clear_error(tmp_path, attrs, message):
    url = str(tmp_path / "bad.zarr")
    root = zarr.open_group(url, mode="w")
    root.attrs.update(attrs)
    with pytest.raises(InvalidVolumeError, match=rf"^{tmp_path}/bad\.zarr: .*{message}"):
        read_multiscale(zarr.open_group(url, mode="r"), url)
