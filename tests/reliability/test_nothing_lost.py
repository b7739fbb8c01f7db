"""Nothing lost: one output policy for every file and store segflow writes, whichever door
(segment, predict, export, train, model create, ingest, the flows) asked for it.

Each case is one that an earlier segflow got wrong with exit 0 (a user's file replaced or
deleted, an input overwritten, outputs of two images mixed); each runs the real CLI as a
subprocess on real files and checks the file is bitwise what it was.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from harness import blobs, cli, cli_here, make_model

from segflow.errors import ExitCode

ARGS = ("--tile", "1,64,64", "--chunks", "4,32,32", "--device", "cpu", "--mode", "fast", "-q")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def raw(tmp_path: Path) -> tuple[Path, Path, str]:
    """A stack TIFF, its ingest beside it (raw.ome.zarr) and a model."""
    tif = tmp_path / "raw.tif"
    tifffile.imwrite(tif, blobs((8, 64, 64), 1), metadata={"axes": "ZYX"})
    model = make_model(tmp_path / "m.ckpt", 1)
    done = cli("segment", tif, "-m", model, *ARGS)
    assert done.returncode == 0, done.stderr
    return tif, tmp_path / "raw.ome.zarr", model


def refused(done, *names: str, code: ExitCode = ExitCode.CONFLICT) -> str:
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("segflow: error:")]
    assert len(lines) == 1, done.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


def test_export_never_replaces_the_source_a_user_file_or_a_chunk(raw, tmp_path):
    tif, store, _ = raw
    before = digest(tif)
    refused(cli("export", store, "--labels", "semantic", "--to", tif), "raw.tif", "input")
    refused(cli("export", store, "--labels", "semantic", "--to", tif, "--overwrite"), "raw.tif")
    assert digest(tif) == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    refused(cli("export", store, "--labels", "semantic", "--to", notes, "--overwrite"), "notes")
    assert notes.read_text() == "my notes"
    chunk = store / "0" / "c" / "0" / "0" / "0"
    saved = digest(chunk)
    refused(cli("export", store, "--labels", "semantic", "--to", chunk), "inside the input")
    assert digest(chunk) == saved
    # segflow's own export is replaced only when asked to
    out = tmp_path / "labels.tif"
    assert cli("export", store, "--labels", "semantic", "--to", out).returncode == 0
    refused(cli("export", store, "--labels", "semantic", "--to", out), "--overwrite")
    assert cli("export", store, "--labels", "semantic", "--to", out, "--overwrite").returncode == 0
    # ...and the raw TIFF still segments as itself
    again = cli("segment", tif, "-m", tmp_path / "m.ckpt", *ARGS, "--json")
    assert again.returncode == 0, again.stderr


def test_train_and_model_create_never_replace_other_files(tmp_path):
    image = tmp_path / "image.tif"
    labels = tmp_path / "labels.tif"
    rng = np.random.default_rng(0)
    truth = np.zeros((96, 96), np.uint8)
    truth[20:50, 20:50] = 1
    truth[60:90, 55:85] = 1
    tifffile.imwrite(image, (truth * 100 + rng.random((96, 96)) * 50).astype(np.uint8))
    tifffile.imwrite(labels, truth)
    precious = tmp_path / "precious.tif"
    tifffile.imwrite(precious, blobs((4, 32, 32), 3))
    saved = digest(precious)
    train = ("train", "--image", image, "--labels", labels, "--steps", "2", "--device", "cpu")
    refused(cli_here(*train, "--out", precious), "precious.tif", "did not make")
    refused(cli_here(*train, "--out", labels, "--overwrite"), "labels.tif")
    assert digest(precious) == saved
    model = tmp_path / "model.ckpt"
    assert cli(*train, "--out", model, "-q").returncode == 0
    first = digest(model)
    refused(cli_here(*train, "--out", model, "-q"), "model.ckpt", "--overwrite")
    assert digest(model) == first
    assert cli(*train, "--out", model, "-q", "--overwrite").returncode == 0
    # model create: the same rule
    refused(cli_here("model", "create", precious), "precious.tif")
    assert digest(precious) == saved
    assert cli("model", "create", tmp_path / "u.ckpt", "--depth", "2", "-q").returncode == 0
    refused(cli_here("model", "create", tmp_path / "u.ckpt", "--depth", "2"), "--overwrite")
    done = cli("model", "create", tmp_path / "u.ckpt", "--depth", "2", "--overwrite", "-q")
    assert done.returncode == 0, done.stderr


def test_files_beside_a_store_that_segflow_did_not_write_are_never_replaced(tmp_path):
    tif = tmp_path / "vol.tif"
    tifffile.imwrite(tif, blobs((8, 64, 64), 2), metadata={"axes": "ZYX"})
    a, b = make_model(tmp_path / "a.ckpt", 1), make_model(tmp_path / "b.ckpt", 2)
    table = tmp_path / "vol.instances.csv"
    table.write_text("my own table\n")
    preview = tmp_path / "vol.preview.png"
    preview.write_bytes(b"my own picture")
    done = cli("segment", tif, "-m", a, *ARGS, "--instances")
    refused(done, "vol.instances.csv")
    assert not (tmp_path / "vol.ome.zarr").exists(), "refused after writing"
    table.unlink()
    refused(cli("segment", tif, "-m", a, *ARGS), "vol.preview.png")
    assert cli("segment", tif, "-m", a, *ARGS, "--no-preview").returncode == 0
    # another model, then instances: the user's preview is still never touched; segflow's
    # own table (written by the first instances run) is replaced with its labels
    assert cli("segment", tif, "-m", a, *ARGS, "--instances", "--no-preview").returncode == 0
    ours = digest(table)
    assert cli("segment", tif, "-m", b, *ARGS, "--instances", "--no-preview").returncode == 0
    assert digest(table) != ours
    assert preview.read_bytes() == b"my own picture"
    # predict: a user's file where an output would go stops that input, nothing else
    batch = tmp_path / "batch"
    batch.mkdir()
    tifffile.imwrite(batch / "c.tif", blobs((8, 64, 64), 3), metadata={"axes": "ZYX"})
    out = tmp_path / "results"
    out.mkdir()
    (out / "c.tif.labels.ome.tif").write_text("not yours")
    done = cli("predict", batch, "-m", a, "--out", out, *ARGS)
    refused(done, "c.tif.labels.ome.tif")
    assert (out / "c.tif.labels.ome.tif").read_text() == "not yours"


def test_ingest_overwrite_takes_the_old_images_files_with_it(raw, tmp_path):
    _tif, store, model = raw
    assert cli("segment", store, "-m", model, *ARGS, "--instances").returncode == 0
    table, preview = tmp_path / "raw.instances.csv", tmp_path / "raw.preview.png"
    assert table.exists()
    assert preview.exists()
    other = tmp_path / "other.tif"
    tifffile.imwrite(other, blobs((8, 64, 64), 9), metadata={"axes": "ZYX"})
    refused(cli("ingest", other, store), "--overwrite")
    done = cli("ingest", other, store, "--overwrite", "-q")
    assert done.returncode == 0, done.stderr
    assert not table.exists()
    assert not preview.exists()


def test_outputs_never_go_into_an_input_or_another_images_store(raw, tmp_path):
    _tif, store, model = raw
    inside = store / "0" / "out.zarr"
    refused(cli("segment", store, "-m", model, *ARGS, "--out", inside), "inside")
    assert not inside.exists()
    other_tif = tmp_path / "other.tif"
    tifffile.imwrite(other_tif, blobs((8, 64, 64), 5), metadata={"axes": "ZYX"})
    assert cli("segment", other_tif, "-m", model, *ARGS).returncode == 0
    other = tmp_path / "other.ome.zarr"
    labels_before = zarr.open_group(str(other), mode="r")["labels/semantic/0"][...]
    for extra in ((), ("--overwrite",)):
        done = cli("segment", store, "-m", model, *ARGS, "--out", other, *extra)
        refused(done, "other.ome.zarr", "another image")
    labels_after = zarr.open_group(str(other), mode="r")["labels/semantic/0"][...]
    assert np.array_equal(labels_before, labels_after)
    refused(cli("segment", store, "-m", model, *ARGS, "--out", "/"), "/")


def test_inbox_and_output_may_not_overlap(tmp_path):
    inbox = tmp_path / "in"
    inbox.mkdir()
    tifffile.imwrite(inbox / "a.tif", blobs((8, 64, 64), 4), metadata={"axes": "ZYX"})
    model = make_model(tmp_path / "m.ckpt", 4)
    refused(cli("predict", inbox, "-m", model, "--out", inbox, *ARGS), "in", "input")
    refused(cli("predict", inbox / "a.tif", "-m", model, "--out", inbox, *ARGS), "input")
    assert sorted(p.name for p in inbox.iterdir()) == ["a.tif"]
    done = cli("serve", "--inbox", inbox, "--output", inbox / "results", "--model", model)
    refused(done, "overlap")
    from flows.nightly import NightlyParams
    from unet_core.errors import StoreConflictError

    with pytest.raises(StoreConflictError, match="overlap"):
        NightlyParams(inbox=str(inbox), output=str(inbox), model=model)


def test_option_conflicts_and_unsafe_names_are_refused_before_any_write(raw, tmp_path):
    _, store, model = raw
    before = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    done = cli("segment", store, "-m", model, *ARGS, "--labels-name", "..")
    refused(done, "--labels-name", code=ExitCode.USAGE)
    done = cli("segment", store, "-m", model, *ARGS, "--labels-name", "instances", "--instances")
    refused(done, "--labels-name", "--instances", code=ExitCode.USAGE)
    after = sorted(p.relative_to(store).as_posix() for p in store.rglob("*"))
    assert after == before
    summary = json.loads(
        cli("segment", store, "-m", model, *ARGS[:-1], "--chunks", "9999,9999,9999", "--json")
        .stdout.strip()
        .splitlines()[-1]
    )
    assert summary["blocks_total"] == 1


def test_overwrite_never_replaces_another_images_store_or_its_files(tmp_path):
    """--overwrite replaces segflow-made outputs of the same image only: a TIFF run into
    another TIFF's store, an export over a file another store owns, and the same store
    reached through paths relative to another working folder."""
    import subprocess

    from harness import segflow_argv

    model = make_model(tmp_path / "m.ckpt", 6)
    for name, seed in (("a", 1), ("b", 2)):
        tifffile.imwrite(
            tmp_path / f"{name}.tif", blobs((8, 64, 64), seed), metadata={"axes": "ZYX"}
        )
    assert (
        cli("predict", tmp_path / "a.tif", "-m", model, "--out", tmp_path / "out", *ARGS).returncode
        == 0
    )
    a_store = tmp_path / "out" / "a.tif.ome.zarr"
    before = zarr.open_group(str(a_store), mode="r")["0"][...]
    done = cli("segment", tmp_path / "b.tif", "-m", model, *ARGS, "--out", a_store, "--overwrite")
    refused(done, "a.tif", "another image")
    assert np.array_equal(zarr.open_group(str(a_store), mode="r")["0"][...], before)
    # predict's labels TIFF is a's: an export from elsewhere never replaces it
    tiff = tmp_path / "out" / "a.tif.labels.ome.tif"
    kept = digest(tiff)
    assert cli("segment", tmp_path / "b.tif", "-m", model, *ARGS).returncode == 0
    done = cli(
        "export", tmp_path / "b.ome.zarr", "--labels", "semantic", "--to", tiff, "--overwrite"
    )
    refused(done, "a.tif.labels.ome.tif", "a.tif.ome.zarr")
    assert digest(tiff) == kept
    # outputs of img.zarr (named relatively) into res.zarr; from another folder, the
    # relative name img.zarr is another image and never goes into res.zarr
    for sub in ("p1", "p2"):
        (tmp_path / sub).mkdir()
        tifffile.imwrite(tmp_path / sub / "v.tif", blobs((8, 64, 64), 7 if sub == "p1" else 8),
                         metadata={"axes": "ZYX"})  # fmt: skip
        assert (
            cli("ingest", tmp_path / sub / "v.tif", tmp_path / sub / "img.zarr", "-q").returncode
            == 0
        )
    res = tmp_path / "res.zarr"
    runs = [
        subprocess.run(
            segflow_argv("segment", "img.zarr", "-m", model, "--out", res, *ARGS),
            cwd=tmp_path / sub,
            capture_output=True,
            text=True,
            timeout=300,
        )
        for sub in ("p1", "p2")
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    refused(runs[1], "another image")
