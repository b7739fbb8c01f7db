"""One pipeline behind every front door: ``segment``, ``predict`` and the ``segment-volume``
flow run the same steps (tasks.pipeline) with the same options, and each names an option
in its own words."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import zarr
from reliability.harness import blobs, cli, cli_here, make_model

from segflow.errors import ExitCode
from unet_core.errors import ConfigError, opt

ARGS = ("--tile", "1,64,64", "--device", "cpu", "-q")


def test_a_plain_3d_tiff_segments_through_segment_and_predict(tmp_path):
    """A stack written by a plain ``tifffile.imwrite(path, volume)`` has no axis metadata:
    it is read as ZYX (with a one-line note), by both doors, with the same labels."""
    volume = blobs((6, 64, 64), 3)
    tifffile.imwrite(tmp_path / "stack.tif", volume)  # no metadata at all
    model = make_model(tmp_path / "m.ckpt", 3)
    done = cli("segment", tmp_path / "stack.tif", "-m", model, *ARGS[:-1], "--json")
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert warnings == [  # each once, though the plan and the ingest both open the file
        f"segflow: warning: {tmp_path / 'stack.tif'}: no axis metadata; its 6 pages are read "
        "as z-slices (ZYX); name the axes with --axes to say otherwise",
        f"segflow: warning: {tmp_path / 'stack.tif'}: no voxel size along z, y, x in its "
        "metadata; stored as 1 without a unit; set it with --voxel-size Z,Y,X (micrometres)",
    ]
    store = json.loads(done.stdout.strip().splitlines()[-1])["out"]
    by_segment = zarr.open_group(store, mode="r")["labels/semantic/0"][...]
    assert by_segment.shape == (6, 64, 64)
    batch = tmp_path / "batch"
    batch.mkdir()
    tifffile.imwrite(batch / "stack.tif", volume)
    done = cli("predict", batch, "-m", model, "--out", tmp_path / "out", *ARGS)
    assert done.returncode == 0, done.stderr
    by_predict = tifffile.imread(tmp_path / "out" / "stack.tif.labels.ome.tif")
    assert np.array_equal(by_predict, by_segment)
    # --axes and --voxel-size exist on both doors, as on ingest
    for command in ("segment", "predict", "ingest"):
        shown = cli(command, "-h").stdout
        assert "--axes" in shown
        assert "--voxel-size" in shown
    explicit = cli(
        "segment",
        tmp_path / "stack.tif",
        "-m",
        model,
        *ARGS,
        "--axes",
        "zyx",
        "--voxel-size",
        "2,0.5,0.5",
        "--out",
        tmp_path / "explicit.ome.zarr",
    )
    assert explicit.returncode == 0, explicit.stderr
    assert "voxel size" not in explicit.stderr
    root = zarr.open_group(str(tmp_path / "explicit.ome.zarr"), mode="r")
    scale = root.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]
    assert scale["scale"] == [2.0, 0.5, 0.5]


def test_a_slice_folder_without_voxel_sizes_says_so_and_sizes_given_reach_the_outputs(tmp_path):
    """Slices with no physical size: one warning naming the folder and the option; with
    --voxel-size, the store, the labels and the exported TIFF all carry the size."""
    folder = tmp_path / "slices"
    folder.mkdir()
    for i, plane in enumerate(blobs((4, 48, 48), 2)):
        tifffile.imwrite(folder / f"z{i:03d}.tif", plane)
    silent = cli("ingest", folder, tmp_path / "plain.ome.zarr")
    assert silent.returncode == 0, silent.stderr
    assert f"{folder}: no voxel size along z, y, x" in silent.stderr
    assert "--voxel-size Z,Y,X" in silent.stderr
    sized = tmp_path / "sized.ome.zarr"
    done = cli("ingest", folder, sized, "--voxel-size", "1.5,0.25,0.25")
    assert done.returncode == 0, done.stderr
    assert "voxel size" not in done.stderr
    model = make_model(tmp_path / "m.ckpt", 2)
    assert cli("segment", sized, "-m", model, *ARGS).returncode == 0
    exported = tmp_path / "labels.ome.tif"
    assert cli("export", sized, "--labels", "semantic", "--to", exported, "-q").returncode == 0
    root = zarr.open_group(str(sized), mode="r")
    for node in (root, root["labels/semantic"]):
        multiscale = node.attrs["ome"]["multiscales"][0]
        scale = multiscale["datasets"][0]["coordinateTransformations"][0]["scale"]
        assert scale == [1.5, 0.25, 0.25]
        assert {a.get("unit") for a in multiscale["axes"]} == {"micrometer"}
    with tifffile.TiffFile(exported) as tif:
        ome = tif.ome_metadata or ""
    for axis, size in (("Z", "1.5"), ("Y", "0.25"), ("X", "0.25")):
        assert f'PhysicalSize{axis}="{size}"' in ome


def test_voxel_sizes_must_be_finite_and_positive(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", blobs((6, 32, 32), 1), metadata={"axes": "ZYX"})
    model = make_model(tmp_path / "m.ckpt", 1)
    for bad in ("inf,1,1", "0,1,1", "-2,1,1", "nan,1,1"):
        done = cli_here("segment", tmp_path / "v.tif", "-m", model, *ARGS, "--voxel-size", bad)
        assert done.returncode == ExitCode.USAGE, (bad, done.stderr)
        assert "--voxel-size" in done.stderr
    assert not (tmp_path / "v.ome.zarr").exists()


def test_each_door_names_an_option_in_its_own_words():
    """The engine names a field; the CLI shows its flag, the run form its title."""
    from flows import in_form_words
    from flows.segment import form_words
    from segflow.errors import describe_error

    error = ConfigError(f"select one with {opt('channel')} or wait ({opt('lease_wait_s')})")
    cli_text, code = describe_error(error)
    assert cli_text == "select one with --channel or wait (--lease-wait-s)"
    assert code == ExitCode.USAGE
    shown = in_form_words(error, form_words)
    assert str(shown) == 'select one with "Channel" or wait ("Lease wait (s)")'
    assert isinstance(shown, ConfigError)
    assert "--" not in str(in_form_words(ConfigError(f"{opt('kind')} x"), form_words))


def test_usage_errors_are_one_line(capsys):
    from segflow.cli import main

    for command in ("segment", "predict", "ingest", "stitch", "serve"):
        with pytest.raises(SystemExit) as done:
            main([command, "--no-such-option"])
        assert done.value.code == ExitCode.USAGE
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == ["segflow: error: no such option: --no-such-option"], (command, lines)


def test_shared_options_work_before_the_command(tmp_path):
    """``segflow -q segment ...`` as ``segflow segment -q ...`` (the README lists -q, --json
    and -v among the options every command shares)."""
    tifffile.imwrite(tmp_path / "v.tif", blobs((6, 32, 32), 5), metadata={"axes": "ZYX"})
    model = make_model(tmp_path / "m.ckpt", 5)
    quiet = cli("-q", "segment", tmp_path / "v.tif", "-m", model, "--tile", "1,64,64")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == ""
    info = cli("--json", "model", "info", model)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["config"]["ndim"] == 2
