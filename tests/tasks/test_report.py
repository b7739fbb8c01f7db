"""The preview picture: big enough to see, touching objects in different colours, a scale
bar in the image's unit and the z stretch said, on real OME-Zarr stores."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tasks.preview import (
    PREVIEW_COLOURS,
    PREVIEW_MIN_SIDE,
    PREVIEW_NOTE,
    aspect_note,
    format_length,
    label_colours,
    nice_length,
    preview_picture,
    scale_bar,
    touching_pairs,
    write_preview,
)
from tasks.report import number, rerun_command
from tasks.store import write_image, write_labels


def labelled_store(path, image: np.ndarray, labels: np.ndarray, scale=None, unit="micrometer"):
    """An image store with an ``instances`` label image, written by segflow's own writers;
    returns its URL."""
    url = str(path)
    axes = "zyx"[-image.ndim :]
    write_image(url, image, axes, scale=scale, unit=unit)
    write_labels(url, "instances", labels)
    return url


def cells(shape, n, seed=0):
    """Touching objects: the Voronoi cells of ``n`` random seeds, cut to round blobs."""
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, shape, size=(n, len(shape)))
    grid = np.indices(shape)
    dist = np.stack([((grid - s.reshape(-1, *[1] * len(shape))) ** 2).sum(axis=0) for s in seeds])
    labels = (np.argmin(dist, axis=0) + 1).astype(np.uint32)
    labels[dist.min(axis=0) > (min(shape[-2:]) / 4) ** 2] = 0
    return labels


def noise(shape, seed=1):
    return (ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2) * 255).astype(
        np.uint8
    )


@pytest.mark.parametrize(
    ("shape", "scale"),
    [((6, 64, 64), (2.0, 0.5, 0.5)), ((18, 256, 256), (2.0, 0.5, 0.5)), ((48, 40), None)],
)
def test_a_small_volume_gives_a_preview_at_least_512_pixels_on_its_long_side(
    tmp_path, shape, scale
):
    url = labelled_store(tmp_path / "a.ome.zarr", noise(shape), cells(shape, 12), scale)
    path = write_preview(url, url, "instances")
    with Image.open(path) as png:
        width, height = png.size
        png.load()
    assert max(width, height) >= PREVIEW_MIN_SIDE
    if len(shape) == 2:  # one panel: a whole enlargement (nearest voxel), 48x40 -> 11 times
        assert width == 40 * 11
        with Image.open(path) as png:
            panel = np.asarray(png.convert("RGB"))[: 48 * 11, : 40 * 11]
        blocks = panel.reshape(48, 11, 40, 11, 3)
        same = (blocks == blocks[:, :1, :, :1]).all(axis=(1, 3, 4))
        assert same.mean() > 0.5  # every voxel a 11x11 block, but where an outline runs


def test_a_huge_plane_is_shrunk_to_max_side(tmp_path):
    image = noise((300, 1500))
    url = labelled_store(tmp_path / "a.ome.zarr", image, np.zeros(image.shape, np.uint32))
    picture = preview_picture(url, url, "instances", max_side=1024)
    assert picture.size[0] == 1024


def test_two_touching_objects_get_different_colours(tmp_path):
    """Objects 1 and 11 (side by side), 21 and 31 (corner to corner) and 41 and 51 (one
    background pixel apart) touch; ids ten apart share a colour in a cyclic palette of ten.
    The image is black, so a filled object is a quarter of its colour and its outline all
    of it."""
    labels = np.zeros((40, 40), np.uint32)
    labels[2:12, 2:10] = 1
    labels[2:12, 10:18] = 11
    labels[14:20, 2:8] = 21
    labels[20:26, 8:14] = 31
    labels[28:36, 2:10] = 41
    labels[28:36, 11:19] = 51
    url = labelled_store(tmp_path / "a.ome.zarr", np.zeros((40, 40), np.uint8), labels)
    picture = np.asarray(preview_picture(url, url, "instances"))
    zoom = 13  # 40 voxels -> 520 pixels

    def colour(y, x):  # inside the object at voxel (y, x)
        return tuple(picture[y * zoom + zoom // 2, x * zoom + zoom // 2])

    for a, b in (((6, 5), (6, 14)), ((16, 4), (22, 10)), ((31, 5), (31, 15))):
        assert colour(*a) != colour(*b), (a, b)
        assert min(max(colour(*a)), max(colour(*b))) > 0  # both coloured, not black
    # the same labels give the same picture
    assert (np.asarray(preview_picture(url, url, "instances")) == picture).all()


def test_touching_labels_never_share_a_colour_and_the_colouring_is_deterministic():
    labels = cells((200, 200), 150, seed=5)
    plane = labels.copy()
    plane[::7] = 0  # some objects one or two background pixels apart
    pairs = touching_pairs([plane])
    ids = np.unique(plane[plane > 0])
    colours = label_colours(ids, pairs, len(PREVIEW_COLOURS))
    of = dict(zip(ids.tolist(), colours.tolist(), strict=True))
    assert len(pairs) > 100
    assert all(of[a] != of[b] for a, b in pairs)
    assert len(set(colours.tolist())) == len(PREVIEW_COLOURS)  # all colours in use
    assert (label_colours(ids, pairs, len(PREVIEW_COLOURS)) == colours).all()


def test_touching_means_at_most_one_background_pixel_apart_diagonals_included():
    plane = np.zeros((9, 9), np.uint32)
    plane[0, 0], plane[1, 1] = 1, 2  # corner to corner
    plane[0, 4], plane[0, 6] = 3, 4  # one pixel between
    plane[4, 0], plane[4, 3] = 5, 6  # two pixels between
    plane[6, 6], plane[8, 8] = 7, 8  # one pixel between, diagonally
    assert {tuple(p) for p in touching_pairs([plane]).tolist()} == {(1, 2), (3, 4), (7, 8)}
    assert {tuple(p) for p in touching_pairs([plane], gap=0).tolist()} == {(1, 2)}


def test_a_scale_bar_is_a_round_length_in_the_image_unit():
    assert [nice_length(v) for v in (38.4, 7, 1, 0.3, 999, 1000)] == [20, 5, 1, 0.2, 500, 1000]
    # a 256-voxel panel of 0.5 um voxels: at most 0.3 * 128 um -> 20 um, 40 voxels
    assert scale_bar(256, 0.5, "micrometer") == (40.0, "20 µm")
    assert scale_bar(64, 0.25, "micrometer") == (8.0, "2 µm")
    assert scale_bar(512, 0.004, "micrometer") == (125.0, "500 nm")
    assert scale_bar(100, 20.0, "nanometer") == (25.0, "500 nm")
    assert scale_bar(4000, 1.0, "micrometer") == (1000.0, "1 mm")
    # no voxel size: the bar counts the image's pixels, never micrometres
    assert scale_bar(256, 1.0, None) == (50.0, "50 px")
    assert format_length(0.5, "micrometer") == "500 nm"
    assert format_length(2.5, "angstrom") == "2.5 Å"


def test_the_z_stretch_and_voxel_size_are_said():
    assert aspect_note((2.0, 0.5, 0.5), "micrometer", True) == (
        "z stretched ×4.0 (voxel 2 × 0.5 × 0.5 µm)"
    )
    assert (
        aspect_note((0.5, 0.5, 0.5), "micrometer", True) == "z to scale (voxel 0.5 × 0.5 × 0.5 µm)"
    )
    assert (
        aspect_note((0.25, 1.0, 1.0), "nanometer", True)
        == "z squeezed ×4.0 (voxel 0.25 × 1 × 1 nm)"
    )
    assert aspect_note((0.5, 0.5), "micrometer", False) == "pixel 0.5 × 0.5 µm"
    assert aspect_note((1.0, 1.0, 1.0), None, True) == (
        "no voxel size: z drawn 1:1, scale bar in image pixels"
    )
    assert aspect_note((1.0, 1.0), None, False) == "no pixel size, scale bar in image pixels"


def test_the_preview_draws_its_scale_bar_and_says_the_z_stretch(tmp_path):
    shape = (6, 64, 64)
    url = labelled_store(
        tmp_path / "a.ome.zarr", np.zeros(shape, np.uint8), np.zeros(shape, np.uint32),
        scale=(2.0, 0.5, 0.5),
    )  # fmt: skip
    path = write_preview(url, url, "instances")
    with Image.open(path) as png:
        note = png.text[PREVIEW_NOTE]
        picture = np.asarray(png.convert("RGB"))
    assert note == "z stretched ×4.0 (voxel 2 × 0.5 × 0.5 µm); scale bar 5 µm"
    # 64 + 4 + 24 voxels enlarged 6 times; 5 um = 10 voxels = 60 pixels of white, bottom
    # left of the yx panel (384 pixels high), over a black image
    row = picture[384 - 9]
    white = np.flatnonzero((row == 255).all(axis=1))
    assert (white.min(), white.max()) == (8, 8 + 60 - 1)
    # the line under the panels is written on
    caption = picture[384 + 4 + 144 :]
    assert caption.shape[0] > 10
    assert (caption > 200).any()
    # without voxel sizes: a bar in pixels, and the picture says so
    bare = labelled_store(
        tmp_path / "b.ome.zarr", np.zeros(shape, np.uint8), np.zeros(shape, np.uint32), unit=None
    )
    assert preview_picture(bare, bare, "instances").info[PREVIEW_NOTE] == (
        "no voxel size: z drawn 1:1, scale bar in image pixels; scale bar 10 px"
    )


def test_the_report_writes_every_number_one_way():
    """Counts with thousands separators, a large rate without decimals (was 12582912
    beside 246,753.0)."""
    from tasks.report import markdown_report

    text = markdown_report(
        {
            "volume": "v",
            "blocks": 1536,
            "voxels": 12582912,
            "seconds": 51.04,
            "voxels_per_second": 246753.0,
            "timings": {"segment": 50.96},
            "class_voxels": {"background": 12000000, "cell": 582912},
        }
    )
    assert "| voxels | 12,582,912 |" in text
    assert "| voxels per second | 246,753 |" in text
    assert "| blocks | 1,536 |" in text
    assert "| seconds | 51.0 |" in text
    assert "| segment | 51.0 |" in text
    assert "| cell | 582,912 |" in text
    assert "246,753.0" not in text


def test_the_rerun_command_fits_a_pane_and_the_shell_reads_the_parameters_whole():
    """Each line of the command fits a code block 80 characters wide; bash reassembles the
    folded path and reads the JSON values as Prefect's --param expects them."""
    path = "/data/" + "/".join(f"level-{i}-of-a-deep-tree" for i in range(6)) + "/v.ome.zarr"
    params = {"source": path, "model": "/m.ckpt", "tile": "1,60,60", "output": "1"}
    command = rerun_command("segment-volume/on-demand", params)
    assert max(len(line) for line in command.splitlines()) <= 80, command
    words = command.replace("prefect deployment run", "printf '%s\\n'", 1)
    out = subprocess.run(["bash", "-c", words], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [
        "segment-volume/on-demand",
        "--param",
        f"source={path}",
        "--param",
        "model=/m.ckpt",
        "--param",
        "tile=1,60,60",
        "--param",
        'output="1"',  # a string that reads as JSON stays a string
    ]


def test_numbers_are_written_one_way():
    assert [number(v) for v in (12582912, 246753.04, 12.44, 0.051, np.int64(7))] == [
        "12,582,912",
        "246,753",
        "12.4",
        "0.05",
        "7",
    ]
