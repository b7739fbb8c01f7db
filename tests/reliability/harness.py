"""Helpers of the fault tests (kill, S3 outage, full disk, secrets): the real CLI as a
subprocess, a tiny model and volume, and what "the same outputs" means.

Outputs are compared by content: every array of a store (decoded, outside segflow's own
bookkeeping groups) with its dtype, shape and chunks, every node's attributes, and the
files segflow writes beside a store (object tables) byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from scipy import ndimage

from tasks.store import filesystem, open_group
from unet_core import CheckpointMeta, Normalization, UNet, UNetConfig, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
#: Groups of a store that hold run bookkeeping (markers, scratch), not outputs.
BOOKKEEPING = ("segflow-done", "segflow-scratch")
#: Root attributes that describe how the store sits on storage (its level-0 listing, the
#: files beside it with their times and inodes), not what it holds.
STORAGE_RECORDS = ("image_listing", "files")


def _attrs(node: Any) -> str:
    attrs = dict(node.attrs)
    if isinstance(attrs.get("segflow"), dict):
        attrs["segflow"] = {k: v for k, v in attrs["segflow"].items() if k not in STORAGE_RECORDS}
    return json.dumps(attrs, sort_keys=True)


def make_model(path: Path, seed: int = 0) -> str:
    """A tiny 2D U-Net checkpoint (depth 2, 4 base channels): fast on CPU."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(ndim=2, base_channels=4, depth=2, n_classes=2))
    save_checkpoint(path, model, CheckpointMeta(normalization=Normalization(kind="zscore")))
    return str(path)


def blobs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Smooth uint16 noise: objects that cross chunk faces."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random(shape), 2)
    smooth = (smooth - smooth.min()) / max(float(np.ptp(smooth)), 1e-9)
    return (smooth * 60000).astype(np.uint16)


def segflow_argv(*args: object) -> list[str]:
    return [sys.executable, "-m", "segflow", *map(str, args)]


def cli(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> Any:
    """Run ``segflow ARGS`` to its end; returns the CompletedProcess (text)."""
    return subprocess.run(
        segflow_argv(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def cli_here(*args: object) -> Any:
    """``segflow ARGS`` through its entry point in this process (no interpreter start-up:
    for the many commands a test expects to be refused early); the same fields as
    :func:`cli`'s result."""
    import contextlib
    import io
    import types

    from segflow.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as done:
            code = int(done.code or 0) if not isinstance(done.code, str) else 1
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def _digest(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def store_contents(url: str) -> dict[str, Any]:
    """Every array's (dtype, shape, chunks, digest of its values) and every node's
    attributes, by path, leaving out the bookkeeping groups and the lease."""
    out: dict[str, Any] = {}

    def visit(group: zarr.Group, prefix: str) -> None:
        out[f"{prefix}@attrs"] = _attrs(group)
        for name, node in group.members():
            if not prefix and name in BOOKKEEPING:
                continue
            path = f"{prefix}{name}"
            if isinstance(node, zarr.Array):
                out[path] = (str(node.dtype), node.shape, node.chunks, _digest(node[...]))
                out[f"{path}@attrs"] = _attrs(node)
            else:
                visit(node, f"{path}/")

    visit(open_group(url, "r"), "")
    return out


def file_digest(url: str) -> str:
    with filesystem(url).open(url, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_same_store(url: str, reference: str) -> None:
    got, want = store_contents(url), store_contents(reference)
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"{url} differs from {reference} in {differ}"


def complete_flag(url: str, path: str) -> bool:
    """Whether ``path`` of the store is marked complete (its segflow attributes say so)."""
    root = open_group(url, "r")
    node = root.get(path) if path else root
    if node is None:
        return False
    seg = dict(node.attrs).get("segflow", {})
    return bool(seg.get("complete")) or seg.get("ingest", {}).get("status") == "complete"


def one_sentence(stderr: str) -> str:
    """The one ``segflow: error:`` line of a failed command (asserts there is exactly one,
    no traceback, and no other noise than warnings)."""
    assert "Traceback" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("segflow: error: ")]
    assert len(errors) == 1, stderr
    noise = [line for line in lines if not line.startswith(("segflow: error: ", "segflow: warn"))]
    assert not noise, stderr
    return errors[0]


def command_flags(argv: Any) -> set[str]:
    """Every ``--flag`` of the command an argv runs (``model info ...``: model info's)."""
    import typer.main

    from segflow.cli import _register, app

    _register()
    command: Any = typer.main.get_command(app)
    for word in argv:
        sub = getattr(command, "commands", {}).get(word)
        if sub is None:
            break
        command = sub
    flags = {"--help", "--debug", "--version"}
    for p in command.params:
        flags.update(getattr(p, "opts", ()) or ())
        flags.update(getattr(p, "secondary_opts", ()) or ())
    return {f for f in flags if f.startswith("--")}


def suggested_flags(sentence: str) -> set[str]:
    """The ``--flags`` an error sentence names."""
    import re

    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", sentence))
