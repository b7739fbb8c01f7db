"""The command line as a newcomer meets it: every input checked before any work, paths that
one command prints accepted by the others, ``evaluate`` in the mode that fits the labels,
swapped training inputs refused, and the in-plane ``--tile`` of a 2D model on a stack.

All through the real ``segflow`` command (subprocesses) on small real files. The early
checks run side by side (each is a fresh interpreter, mostly importing PyTorch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import zarr
from reliability.harness import (
    ROOT,
    blobs,
    cli,
    command_flags,
    make_model,
    one_sentence,
    segflow_argv,
    suggested_flags,
)
from scipy import ndimage

from segflow.errors import ExitCode
from unet_core import CheckpointMeta, Normalization, UNet, UNetConfig, save_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 12×64×64 stack and its instance ground truth (TIFFs), a 2D image, models."""
    root = tmp_path_factory.mktemp("checks")
    volume = blobs((12, 64, 64), 3)
    tifffile.imwrite(root / "vol.tif", volume, imagej=True, metadata={"axes": "ZYX"})
    gt, n = ndimage.label(volume > np.percentile(volume, 70))
    assert n > 8
    tifffile.imwrite(root / "gt.tif", gt.astype(np.uint16), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(root / "plane.tif", volume[0])
    make_model(root / "m2d.ckpt")
    torch.manual_seed(0)
    for name, kw in (("m3d.ckpt", {"ndim": 3}), ("two_ch.ckpt", {"in_channels": 2})):
        config = UNetConfig(**{"ndim": 2, "base_channels": 4, "depth": 2, "n_classes": 2, **kw})
        save_checkpoint(
            root / name, UNet(config), CheckpointMeta(normalization=Normalization(kind="zscore"))
        )
    foreign = root / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.txt").write_text("precious")
    leased = root / "leased.ome.zarr"
    leased.mkdir()
    now = time.time()
    lease = {
        "holder": "another-run",
        "generation": 1,
        "beat": 0,
        "host": socket.gethostname(),
        "pid": os.getpid(),  # alive: the lease is held
        "what": "segment",
        "started": now,
        "heartbeat": now,
        "ttl_s": 600,
    }
    (leased / "segflow-lease.json").write_text(json.dumps(lease))
    return root


@dataclass
class Case:
    id: str
    argv: str
    code: ExitCode
    says: str
    env: dict[str, str] = field(default_factory=dict)
    absent: tuple[str, ...] = ("vol.ome.zarr", "plane.ome.zarr", "new.ome.zarr", "new.ckpt")


SEG = "segment {r}/vol.tif -q"
EARLY = [
    Case("missing-model", SEG + " -m {r}/typo.ckpt", ExitCode.BAD_INPUT, "typo.ckpt"),
    Case(
        "tiff-as-model",
        SEG + " -m {r}/gt.tif",
        ExitCode.BAD_INPUT,
        "gt.tif is not a segflow checkpoint (it is a TIFF image",
    ),
    Case(
        "unknown-device",
        SEG + " -m {r}/m2d.ckpt --device gpu",
        ExitCode.USAGE,
        "'--device': 'gpu' is not one of 'auto', 'cpu'",
    ),
    Case(
        "cuda-without-cuda",
        SEG + " -m {r}/m2d.ckpt --device cuda",
        ExitCode.USAGE,
        "no CUDA GPU",
        env={"CUDA_VISIBLE_DEVICES": ""},
    ),
    Case("channels", SEG + " -m {r}/two_ch.ckpt", ExitCode.BAD_INPUT, "expects 2"),
    Case(
        "3d-model-on-2d",
        "segment {r}/plane.tif -q -m {r}/m3d.ckpt",
        ExitCode.BAD_INPUT,
        "a 3D model",
    ),
    Case(
        "foreign-out",
        SEG + " -m {r}/m2d.ckpt --out {r}/thesis",
        ExitCode.CONFLICT,
        "segflow did not make",
    ),
    Case(
        "leased-out",
        SEG + " -m {r}/m2d.ckpt --out {r}/leased.ome.zarr",
        ExitCode.CONFLICT,
        "another segflow run",
    ),
    Case("ingest-foreign", "ingest {r}/vol.tif {r}/thesis", ExitCode.CONFLICT, "did not make"),
    Case(
        "train-swapped",
        "train --image {r}/gt.tif --labels {r}/vol.tif --out {r}/new.ckpt --steps 1 --quiet",
        ExitCode.BAD_INPUT,
        "vol.tif: these labels look like an image: neighbouring voxels differ",
    ),
]


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_every_input_is_checked_before_anything_is_written(files: Path) -> None:
    kept = {name: _listing(files / name) for name in ("thesis", "leased.ome.zarr")}
    started = {
        case.id: subprocess.Popen(
            segflow_argv(*case.argv.format(r=files).split()),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, **case.env},
        )
        for case in EARLY
    }
    failures = []
    for case in EARLY:
        _, stderr = started[case.id].communicate(timeout=300)
        code = started[case.id].returncode
        try:
            assert code == case.code
            sentence = one_sentence(stderr)
            assert case.says in sentence
            # every option the sentence suggests exists on the command that printed it
            assert suggested_flags(sentence) <= command_flags(case.argv.split())
        except AssertionError:
            failures.append(f"{case.id}: exit {code}, stderr {stderr!r}")
    assert not failures, "\n".join(failures)
    written = [name for case in EARLY for name in case.absent if (files / name).exists()]
    assert not written, written
    assert {name: _listing(files / name) for name in kept} == kept


def _segment(files: Path, out: str, *args: str) -> list[str]:
    res = cli(
        "segment",
        files / "vol.tif",
        "-m",
        files / "m2d.ckpt",
        "--out",
        files / out,
        "--device",
        "cpu",
        "--chunks",
        "4,32,32",
        *args,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


@pytest.fixture(scope="module")
def segmented(files: Path) -> tuple[str, str]:
    """Segment the stack twice, the 2D model's tile in-plane and as 1,Y,X; return the
    labels path and the instances path as segment printed them."""
    lines = _segment(files, "a.ome.zarr", "--tile", "60,60", "--instances")
    _segment(files, "b.ome.zarr", "--tile", "1,60,60")
    labels = next(line for line in lines if line.startswith("labels: ")).split()[1]
    instances = next(line for line in lines if line.startswith("instances: ")).split()[1]
    return labels, instances


def test_an_in_plane_tile_is_the_same_as_one_slice_deep(files: Path, segmented) -> None:
    a = zarr.open_group(str(files / "a.ome.zarr"), mode="r")
    b = zarr.open_group(str(files / "b.ome.zarr"), mode="r")
    assert (
        a["labels/semantic"].attrs["segflow"]["key"] == b["labels/semantic"].attrs["segflow"]["key"]
    )
    assert np.array_equal(a["labels/semantic/0"][...], b["labels/semantic/0"][...])


def _evaluate(*args: object) -> tuple[int, dict, str]:
    res = cli("evaluate", *args, "--json")
    return res.returncode, json.loads(res.stdout) if res.returncode == 0 else {}, res.stderr


def test_printed_paths_carry_and_evaluate_picks_the_mode(files: Path, segmented) -> None:
    labels, instances = segmented
    assert labels.endswith("/labels/semantic/0")
    assert instances.endswith("/labels/instances/0")
    store = str(files / "a.ome.zarr")
    gt = files / "gt.tif"
    # the printed array path, as it is
    code, result, err = _evaluate(instances, gt)
    assert code == 0, err
    assert result["mode"] in ("instances", "foreground")
    assert result["why"]
    # a store plus a labels name: a semantic mask against instance ground truth
    code, result, err = _evaluate(store, gt, "--labels", "semantic")
    assert code == 0, err
    assert result["mode"] == "foreground", result
    assert "instance ids" in result["why"]
    assert 0.0 <= result["dice"] <= 1.0
    assert "n_classes" not in result
    # the same labels by their printed path give the same scores
    assert _evaluate(labels, gt)[1] == result
    # the store root alone is the raw image: refused, not scored
    code, _, err = _evaluate(store, gt)
    assert code == ExitCode.BAD_INPUT
    assert "is an image, not a prediction" in one_sentence(err)
    # export and stitch take the printed paths too
    res = cli("export", instances, "--to", files / "inst.ome.tif")
    assert res.returncode == 0, res.stderr
    exported = tifffile.imread(files / "inst.ome.tif")
    assert np.array_equal(exported, zarr.open_array(instances, mode="r")[...])
    res = cli("stitch", labels, "--name", "again", "--instance-method", "components", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["instances"] == f"{store}/labels/again/0"
