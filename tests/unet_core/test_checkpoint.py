from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from unet_core import (
    CheckpointError,
    CheckpointMeta,
    Normalization,
    UNet,
    UNetConfig,
    load_checkpoint,
    read_checkpoint_header,
    save_checkpoint,
)
from unet_core.errors import VolumeNotFoundError


@pytest.fixture
def model():
    torch.manual_seed(1)
    return UNet(UNetConfig(ndim=2, depth=2, base_channels=4, n_classes=3, norm="batch")).eval()


def test_round_trip_gives_identical_outputs(tmp_path, model):
    meta = CheckpointMeta(
        class_names=["bg", "cell", "border"],
        normalization=Normalization(kind="zscore"),
    )
    path = tmp_path / "m.ckpt"
    digest = save_checkpoint(path, model, meta)
    loaded, meta2 = load_checkpoint(path)
    assert meta2.digest == digest
    assert meta2.class_names == ["bg", "cell", "border"]
    assert meta2.normalization.kind == "zscore"
    assert loaded.config == model.config
    assert not loaded.training
    x = torch.randn(2, 1, *model.config.valid_input_shape((40, 40)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    config, meta3 = read_checkpoint_header(path)
    assert config == model.config
    assert meta3.digest == digest


def test_digest_tracks_weights(tmp_path, model):
    a = save_checkpoint(tmp_path / "a.ckpt", model)
    assert save_checkpoint(tmp_path / "b.ckpt", model) == a
    with torch.no_grad():
        model.head.bias.add_(1.0)
    assert save_checkpoint(tmp_path / "c.ckpt", model) != a


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"format": "segflow-checkpoint", "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()
    # A raw pickle (not a torch zip file) is refused as well.
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not marker.exists()


def test_corrupted_foreign_and_missing_files(tmp_path, model):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model)
    data = bytearray(path.read_bytes())
    # Flip bytes in the middle (inside the stored tensors): digest or zip check must fail.
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"bad\.ckpt"):
        load_checkpoint(bad)
    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"trunc\.ckpt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save(model.state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a segflow checkpoint"):
        load_checkpoint(foreign)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    with pytest.raises(VolumeNotFoundError):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_tampered_weights_fail_the_digest(tmp_path, model):
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model)
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["head.bias"] += 1
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(path)


def test_cli_model_commands(tmp_path):
    ckpt = tmp_path / "rand.ckpt"
    exe = [sys.executable, "-m", "segflow"]
    out = subprocess.run(
        [*exe, "model", "create", str(ckpt), "--depth", "2", "--base-channels", "4"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wrote" in out.stdout
    info = subprocess.run(
        [*exe, "model", "info", str(ckpt), "--json"], capture_output=True, text=True, check=True
    )
    assert '"depth": 2' in info.stdout
    geo = subprocess.run(
        [*exe, "geometry", "570,570", "--json"], capture_output=True, text=True, check=True
    )
    assert '"output": [388, 388]' in geo.stdout
    bad = subprocess.run(
        [*exe, "model", "info", str(tmp_path / "nope.ckpt")], capture_output=True, text=True
    )
    assert bad.returncode == 3  # ExitCode.BAD_INPUT
    assert bad.stderr.strip().count("\n") == 0
    assert "nope.ckpt" in bad.stderr


def test_a_header_is_read_once_per_file_version(tmp_path, model):
    from unet_core import checkpoint

    path = tmp_path / "m.ckpt"
    first = save_checkpoint(path, model)
    config, meta = read_checkpoint_header(path)
    assert meta.digest == first
    known = len(checkpoint._HEADERS)
    assert read_checkpoint_header(str(path)) == (config, meta)  # same file version: kept
    assert len(checkpoint._HEADERS) == known
    # another model written to the same path is a new version: read and verified again
    torch.manual_seed(2)
    other = UNet(UNetConfig(ndim=2, depth=2, base_channels=6, n_classes=3)).eval()
    second = save_checkpoint(path, other)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock
    config2, meta2 = read_checkpoint_header(path)
    assert (meta2.digest, config2.base_channels) == (second, 6) != (first, 4)
    path.write_bytes(b"not a checkpoint")  # a broken file is never served from memory
    with pytest.raises(CheckpointError):
        read_checkpoint_header(path)
