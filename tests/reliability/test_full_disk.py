"""A full disk: a small tmpfs as the output location, filled up mid-run.

The image lives on the ordinary disk; ``segflow segment --out`` writes labels and float32
probabilities into a store on a tmpfs that a ballast file leaves only a little room on.
The run must stop with one sentence and exit status 4 (storage), leave the labels
incomplete and mark no block whose data is not stored; after the ballast is removed a
re-run completes, bitwise equal to a clean run. Mounting needs privileges: the test is
skipped, saying so, where ``mount -t tmpfs`` is not permitted.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zarr
from harness import assert_same_store, blobs, cli, complete_flag, make_model, one_sentence

from segflow.errors import ExitCode
from tasks.blockwise import Markers
from tasks.store import write_image

SIZE = "1m"
ROOM = 160 * 1024  # bytes left free by the ballast: a few blocks' worth (4 KiB pages)
# --fast: a block is one chunk, so a marked block's box is its index times the chunk shape
SEGMENT = [
    "--chunks", "2,16,16", "--tile", "1,64,64", "--device", "cpu", "-q", "--fast",
    "--probabilities", "--probabilities-dtype", "float32",
]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill(disk: Path, room: int) -> Path:
    """A ballast file that leaves about ``room`` bytes free on ``disk``."""
    import shutil

    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    ballast.write_bytes(b"\1" * max(free - room, 0))
    return ballast


@pytest.mark.slow
def test_full_disk_then_rerun_after_freeing_space(tmp_path: Path, small_disk: Path) -> None:
    data = blobs((8, 64, 64), 9)
    image = str(tmp_path / "img.ome.zarr")
    write_image(image, data, "zyx", chunks=(2, 16, 16))
    model = make_model(tmp_path / "m.ckpt", 2)
    reference = str(tmp_path / "ref.zarr")
    clean = cli("segment", image, "-m", model, "--out", reference, *SEGMENT)
    assert clean.returncode == 0, clean.stderr

    out = str(small_disk / "out.zarr")
    ballast = fill(small_disk, ROOM)
    full = cli("segment", image, "-m", model, "--out", out, *SEGMENT)
    assert full.returncode == ExitCode.STORAGE, full.stderr
    sentence = one_sentence(full.stderr)
    assert out in sentence, sentence
    assert "no space left" in sentence.lower(), sentence
    assert not complete_flag(out, "labels/semantic")
    assert not complete_flag(out, "probabilities")
    # every block marked done has its data stored, exactly the clean run's
    markers = Markers.open(out, "segment-semantic")
    done = markers.done_mask() if markers is not None else np.zeros(0, dtype=bool)
    assert not done.all()
    if done.any():
        got = zarr.open_group(out, mode="r")["labels/semantic/0"]
        want = zarr.open_group(reference, mode="r")["labels/semantic/0"]
        block = [math.ceil(n / g) for n, g in zip(want.shape, done.shape, strict=True)]
        for index in zip(*np.nonzero(done), strict=True):
            box = tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, block, strict=True))
            assert np.array_equal(got[box], want[box]), f"block {index} marked but not stored"
    print(f"full disk: {done.sum()} of {done.size} blocks done; {sentence}")

    ballast.unlink()
    again = cli("segment", image, "-m", model, "--out", out, *SEGMENT)
    assert again.returncode == 0, again.stderr
    assert complete_flag(out, "labels/semantic")
    assert_same_store(out, reference)
