"""A real single-node SLURM for the session, small inputs, and a local reference run.

The SLURM (``local_slurm.LocalSlurm``) is installed with apt-get when missing, runs its
daemons on 127.0.0.1 with every file in a temporary folder, and is stopped by pid at the
end; the tests that need it are skipped, with the reason, only where that is impossible.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from local_slurm import LocalSlurm, SlurmUnavailableError
from segflow_cli import INGEST, SEGMENT, SHAPE, segflow


@pytest.fixture(scope="session")
def slurm():
    try:
        cm = LocalSlurm.start()
        running = cm.__enter__()
    except SlurmUnavailableError as exc:
        pytest.skip(f"no SLURM here: {exc}")
    try:
        yield running
    finally:
        cm.__exit__(None, None, None)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A TIFF volume with smooth structures and a tiny 2D U-Net (``segflow model create``)."""
    import tifffile
    from scipy import ndimage

    root = tmp_path_factory.mktemp("cluster-inputs")
    rng = np.random.default_rng(7)
    volume = ndimage.gaussian_filter(rng.random(SHAPE), 2.0)
    volume = (volume - volume.min()) / (volume.max() - volume.min()) * 60000
    tif = root / "volume.tif"
    tifffile.imwrite(tif, volume.astype(np.uint16), metadata={"axes": "ZYX"})
    model = root / "model.ckpt"
    segflow("model", "create", model, "--ndim", 2, "--depth", 1, "--base-channels", 2)
    return {"tif": tif, "model": model}


@pytest.fixture(scope="session")
def reference(inputs, tmp_path_factory) -> Path:
    """ingest -> segment -> stitch with ``--cluster local`` (the default)."""
    img = tmp_path_factory.mktemp("cluster-reference") / "volume.ome.zarr"
    env = {**os.environ}
    segflow("ingest", inputs["tif"], img, *INGEST, "--cluster", "local", "-q", env=env)
    segflow("segment", img, "-m", inputs["model"], *SEGMENT, "-q", "--json", env=env)
    segflow("stitch", img, env=env)
    return img
