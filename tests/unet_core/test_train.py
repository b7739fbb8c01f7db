"""Training: quality on synthetic data, determinism, resume, checkpoints that reproduce the
training-time validation prediction (in memory and through ``segflow segment``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from segflow.cli import _register, app
from unet_core import load_checkpoint
from unet_core.augment import AugmentConfig
from unet_core.errors import CheckpointError, ConfigError, InvalidVolumeError
from unet_core.losses import weight_map
from unet_core.metrics import class_report, instance_report, instances_from_mask
from unet_core.normalize import compute_stats
from unet_core.predict import predict
from unet_core.synthetic import blobs
from unet_core.targets import to_targets
from unet_core.training.config import TrainConfig
from unet_core.training.data import prepare
from unet_core.training.loop import TrainProgress, train
from unet_core.training.state import state_path

_register()
runner = CliRunner()

TINY = {
    "depth": 2,
    "base_channels": 4,
    "patch": (60, 60),
    "batch_size": 2,
    "steps": 4,
    "val_every": 2,
}


def tiny(**kw):
    return TrainConfig.model_validate({**TINY, **kw})


@pytest.fixture(scope="module")
def pair():
    return blobs((72, 80), rng=3, radius=(4.0, 8.0))


# --------------------------------------------------------------------------- quality


def test_short_training_reaches_dice_on_held_out_synthetic_data(tmp_path):
    """Blurred noisy blobs with known masks: train on one image, score another."""
    image, labels = blobs((256, 256), rng=1)
    test_image, test_labels = blobs((256, 256), rng=2)
    # The default network at half width (8 channels) keeps this well inside a CI budget
    # (about 20 s of one CPU core); the defaults themselves are measured by bench.train.
    config = TrainConfig(base_channels=8, patch=(188, 188), steps=150, val_every=50, seed=0)
    t0 = time.perf_counter()
    result = train([image], [labels], config, out=tmp_path / "m.ckpt")
    seconds = time.perf_counter() - t0
    model, meta = load_checkpoint(tmp_path / "m.ckpt")
    norm = meta.normalization.affine(compute_stats(test_image))
    prob = predict(model, test_image, normalization=norm)
    pred = np.argmax(prob, axis=0)
    fg = class_report(pred, (test_labels > 0).astype(np.uint8), 2)["dice"]["class_1"]
    objects = instances_from_mask(
        pred == meta.foreground_class, meta.object_stats.suggested_min_size
    )
    f1 = instance_report(objects, test_labels)["f1"]
    print(f"held-out Dice {fg:.4f}, instance F1 {f1:.4f}, {seconds:.1f} s")
    assert fg >= 0.9
    assert f1 >= 0.3  # touching objects still merge after so short a run (defaults: ~0.84)
    assert result.best_metric is not None
    assert result.best_metric >= 0.85
    # The checkpoint carries what inference and post-processing need.
    assert meta.class_names == ["background", "foreground"]
    assert meta.training_stats == compute_stats(image)
    assert meta.normalization.kind == "percentile"
    assert meta.object_stats is not None
    assert meta.object_stats.count == int(labels.max())
    assert meta.foreground_class == 1
    assert meta.training["label_mode"] == "instances"
    assert meta.training["step"] == result.best_step


# ----------------------------------------------------------------- reproducibility


def test_runs_are_deterministic(pair, tmp_path):
    image, labels = pair
    a = train([image], [labels], tiny(steps=3, val_every=1))
    # Writing checkpoints along the way changes nothing.
    b = train([image], [labels], tiny(steps=3, val_every=1), out=tmp_path / "b.ckpt")
    assert a.losses == b.losses
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    c = train([image], [labels], tiny(steps=3, val_every=1, seed=1))
    assert c.losses != a.losses


def test_interrupted_run_resumes_to_the_same_result(pair, tmp_path):
    image, labels = pair
    config = tiny(steps=6, val_every=2)
    whole = train([image], [labels], config, out=tmp_path / "a.ckpt")

    def stop_at_5(p: TrainProgress) -> None:
        if p.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train([image], [labels], config, out=tmp_path / "b.ckpt", progress=stop_at_5)
    assert state_path(tmp_path / "b.ckpt").is_file()
    resumed = train([image], [labels], config, out=tmp_path / "b.ckpt", resume=tmp_path / "b.ckpt")
    assert resumed.losses == whole.losses
    assert [h["step"] for h in resumed.history] == [2, 4, 6]
    assert resumed.digest == whole.digest
    assert resumed.best_step == whole.best_step
    # A checkpoint without a resume state starts a new run from its weights (fine-tuning).
    state_path(tmp_path / "a.ckpt").unlink()
    tuned = train([image], [labels], tiny(steps=1), resume=tmp_path / "a.ckpt")
    assert len(tuned.losses) == 1
    # A different network cannot resume.
    with pytest.raises(CheckpointError, match="differs"):
        train([image], [labels], tiny(base_channels=8), resume=tmp_path / "b.ckpt")


# ------------------------------------------------- checkpoint reproduces validation


def write_pair(tmp_path, image, labels):
    img, lab = tmp_path / "img.tif", tmp_path / "lab.tif"
    tifffile.imwrite(img, image)
    tifffile.imwrite(lab, labels)
    return img, lab


def cli_train(tmp_path, image, labels, *extra):
    img, lab = write_pair(tmp_path, image, labels)
    ckpt = tmp_path / "model.ckpt"
    args = [
        "train", "--image", str(img), "--labels", str(lab), "--out", str(ckpt),
        "--depth", "2", "--base-channels", "4", "--steps", "4", "--patch", "60,60",
        "--batch-size", "2", "--val-every", "2", "--quiet", "--json", *extra,
    ]  # fmt: skip
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return ckpt, json.loads(res.stdout)


def test_checkpoint_from_segflow_train_reproduces_the_validation_prediction(pair, tmp_path):
    image, labels = pair
    ckpt, summary = cli_train(tmp_path, image, labels)
    assert summary["checkpoint"] == str(ckpt)
    assert set(summary["files"]) == {"checkpoint", "state", "history", "loss_curve", "validation"}
    assert summary["validation"]["mean_dice"] == summary["best_mean_dice"]
    saved = np.load(summary["files"]["validation"])
    offset, shape = saved["pair0_offset"], saved["pair0_shape"]
    box = tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))
    # Held out: the last 15% of the longest axis.
    assert tuple(offset) == (0, 68)
    assert tuple(shape) == (72, 12)
    model, meta = load_checkpoint(ckpt)
    norm = meta.normalization.affine(compute_stats(image))
    prob = predict(model, image, normalization=norm)
    assert np.array_equal(prob[(slice(None), *box)], saved["pair0_probabilities"])
    assert np.array_equal(np.argmax(prob, 0)[box], saved["pair0_prediction"])
    history = json.loads((tmp_path / "model.ckpt.history.json").read_text())
    assert len(history["losses"]) == 4
    assert (tmp_path / "model.ckpt.loss.png").read_bytes()[:4] == b"\x89PNG"


def test_segflow_segment_reproduces_the_validation_prediction(pair, tmp_path):
    pytest.importorskip("segflow.commands_segment")
    import zarr

    from tasks.store import write_image

    image, labels = pair
    ckpt, summary = cli_train(tmp_path, image, labels)
    src = str(tmp_path / "img.ome.zarr")
    write_image(src, image, "yx", chunks=(32, 32))
    out = str(tmp_path / "seg.zarr")
    cmd = [
        sys.executable, "-m", "segflow", "segment", src, "--model", str(ckpt), "--out", out,
        "--device", "cpu", "--probabilities", "--probabilities-dtype", "float32", "--json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = np.load(summary["files"]["validation"])
    box = tuple(
        slice(o, o + s) for o, s in zip(saved["pair0_offset"], saved["pair0_shape"], strict=True)
    )
    group = zarr.open_group(out, mode="r")
    probs = group["probabilities/0"][...]
    assert np.array_equal(probs[(slice(None), *box)], saved["pair0_probabilities"])
    assert np.array_equal(group["labels/semantic/0"][...][box], saved["pair0_prediction"])


# ------------------------------------------------------------------ other layouts


def test_2d_network_on_a_stack_holds_out_slices():
    image, labels = blobs((10, 40, 48), rng=4, radius=(3.0, 6.0))
    # Targets and weight maps are 2D, slice by slice: neighbours in z do not count.
    data = prepare([image], [labels], tiny(steps=2, patch=(44, 44)))
    target = to_targets(labels[3], "instances")
    assert target.instances is not None
    objects = np.where(target.classes == 1, target.instances, 0)  # the gaps are background
    expected = weight_map(target.classes, objects, data.class_weight)
    np.testing.assert_array_equal(data.pairs[0].weight[3], expected)
    np.testing.assert_array_equal(data.pairs[0].classes[3], target.classes)
    r = train([image], [labels], tiny(steps=2, patch=(44, 44)))
    assert len(r.validation) == 1
    assert r.validation[0].box.offset == (8, 0, 0)
    assert r.validation[0].probabilities.shape == (2, 2, 40, 48)


def test_3d_network_and_several_pairs():
    made = [blobs((20, 24, 28), rng=k, radius=(3.0, 5.0)) for k in range(5)]
    images, labels = [m[0] for m in made], [m[1] for m in made]
    config = tiny(ndim=3, depth=1, patch=(16, 16, 16), steps=2, augment=AugmentConfig(zoom=0.2))
    r = train(images, labels, config)
    # Five pairs or more: whole images are held out.
    assert len(r.validation) == 1
    assert r.validation[0].box.shape == (20, 24, 28)
    assert r.model.config.ndim == 3


def test_classes_mode_and_dice_loss(pair):
    image, labels = pair
    classes = np.where(labels > 0, 1 + labels % 2, 0).astype(np.uint8)
    r = train(
        [image], [classes], tiny(steps=2, label_mode="classes", loss="ce+dice", sampling="uniform")
    )
    assert r.model.config.n_classes == 3
    assert r.meta.class_names == ["background", "class_1", "class_2"]
    assert set(r.metrics["dice"]) == {"background", "class_1", "class_2"}


def test_bad_inputs_raise_clear_errors(pair, tmp_path):
    image, labels = pair
    with pytest.raises(InvalidVolumeError, match="do not match"):
        train([image], [labels[:-1]], tiny())
    with pytest.raises(ConfigError, match="pairs"):
        train([image], [], tiny())
    with pytest.raises(ConfigError, match="class names"):
        train([image], [labels], tiny(class_names=["a"]))
    img, lab = write_pair(tmp_path, image, labels[:, :-2])
    res = runner.invoke(
        app, ["train", "--image", str(img), "--labels", str(lab), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 3  # ExitCode.BAD_INPUT
    assert "lab.tif" in res.output
    assert "do not match" in res.output
    res = runner.invoke(
        app, ["train", "--image", str(img), "--labels", str(lab), "--out", "m", "--steps", "0"]
    )
    assert res.exit_code == 2  # ExitCode.USAGE
    assert "steps" in res.output


def test_evaluate_cli(tmp_path):
    gt = np.zeros((10, 10), dtype=np.uint16)
    gt[1:5, 1:5], gt[6:9, 6:9] = 1, 2
    pred = np.zeros_like(gt)
    pred[1:5, 2:6] = 5  # the first object off by one pixel; the second missed
    np.save(tmp_path / "gt.npy", gt)
    tifffile.imwrite(tmp_path / "pred.tif", pred)
    args = ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.npy"), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)  # one binary mask against two objects: foreground scores
    assert (out["mode"], out["dice"]) == ("foreground", pytest.approx(2 * 12 / (16 + 16 + 9)))
    out = json.loads(runner.invoke(app, [*args, "--mode", "classes"]).stdout)
    assert out["n_classes"] == 6
    res = runner.invoke(
        app,
        ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "gt.npy"), "--instances", "--json"],
    )
    out = json.loads(res.stdout)
    assert (out["tp"], out["fn"], out["fp"]) == (1, 1, 0)
    assert out["f1"] == pytest.approx(2 / 3)
    res = runner.invoke(app, ["evaluate", str(tmp_path / "pred.tif"), str(tmp_path / "nope.tif")])
    assert res.exit_code == 3  # ExitCode.BAD_INPUT
    assert "nope.tif" in res.output


def test_paper_preset_is_the_papers_geometry():
    from unet_core import UNetConfig

    for ndim, out in ((2, (388, 388)), (3, (28, 44, 44))):
        c = TrainConfig.paper(ndim=ndim)
        unet = UNetConfig(ndim=ndim, depth=c.depth, base_channels=c.base_channels)
        assert c.patch is not None
        assert unet.output_shape(c.patch) == out
    assert TrainConfig.paper(steps=5).steps == 5
    assert TrainConfig.paper().base_channels == 64


def test_a_2d_image_for_a_3d_network_says_what_to_do_instead():
    """Not "cannot train a 3D network (2D or 3D images are supported)": the image is 2D."""
    from unet_core.training.config import TrainConfig
    from unet_core.training.data import prepare

    image, labels = blobs((64, 64), rng=0)
    with pytest.raises(ConfigError) as err:
        prepare([image], [labels], TrainConfig(ndim=3, steps=1))
    text = str(err.value)
    assert "a 2D image (labels of shape (64, 64)) cannot train a 3D network" in text
    assert "'ndim' 2" in text
    assert "supported" not in text
