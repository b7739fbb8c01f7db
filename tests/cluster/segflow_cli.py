"""The ``segflow`` command as the cluster tests run it, and the inputs they share."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Shared by the local reference and the runs on SLURM: 8 x 128 x 128 voxels, segmented in
#: 64 blocks of 2 x 32 x 32 by a 2D U-Net on 60 x 60 tiles (``--fast``: blocks are the chunks
#: asked for; the default invariant mode may widen them to whole tiles, 32 blocks here).
SHAPE = (8, 128, 128)
INGEST = ("--chunks", "4,64,64")
SEGMENT = ("--chunks", "2,32,32", "--tile", "1,60,60", "--fast")


def segflow(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    """Run the ``segflow`` command; its stdout (fails the test with stderr on an error)."""
    res = subprocess.run(
        [sys.executable, "-m", "segflow", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode != 0:
        pytest.fail(f"segflow {' '.join(map(str, args))} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])
