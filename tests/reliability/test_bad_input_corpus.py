"""Every case of the bad-input corpus through the real CLI error boundary.

Each case asserts: the documented exit status (README, ``segflow.errors.ExitCode``),
exactly one ``segflow: error:`` sentence on stderr naming the input, no traceback (and no
"Exception ignored" noise), every file that existed before bitwise untouched, and nothing
new marked complete (no finished ingest, no complete label image).

Most cases run in this process through typer's ``CliRunner``, which calls the same command
functions and the same boundary (:func:`segflow.cli.clean_errors`) as the installed
command; the ones marked ``subprocess`` run ``python -m segflow`` for real.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_corpus import CASES, HUGE_SIDE, Case, build
from harness import command_flags, one_sentence, suggested_flags

from segflow.errors import ExitCode


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    build(root)
    (root / "out").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root`` (symlinks by their target text, special
    files such as the FIFO by their kind: never opened)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                out[rel] = "link:" + os.readlink(path)
            elif not stat.S_ISREG(os.lstat(path).st_mode):
                out[rel] = f"special:{stat.S_IFMT(os.lstat(path).st_mode):o}"
            else:
                out[rel] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def marked_complete(path: Path) -> bool:
    """Whether a zarr.json declares a finished ingest or a complete label image."""
    if path.name != "zarr.json":
        return False
    try:
        attrs = json.loads(path.read_text()).get("attributes", {})
    except ValueError:
        return False
    seg = attrs.get("segflow", {})
    return bool(seg.get("complete")) or seg.get("ingest", {}).get("status") == "complete"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_case(case: Case, root: Path) -> tuple[int, str]:
    argv = [a.format(root=root, id=case.id) for a in case.argv]
    env = dict(case.env)
    if case.s3 == "down":
        env.update(
            {
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_free_port()}",
                "AWS_ACCESS_KEY_ID": "k",
                "AWS_SECRET_ACCESS_KEY": "s",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_MAX_ATTEMPTS": "1",
            }
        )
    if case.subprocess:
        done = subprocess.run(
            [sys.executable, "-m", "segflow", *argv],
            capture_output=True,
            text=True,
            timeout=case.timeout,
            env={**os.environ, **env},
        )
        return done.returncode, done.stderr
    from typer.testing import CliRunner

    from segflow.cli import _register, app

    _register()
    result = CliRunner().invoke(app, argv, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"escaped the error boundary: {result.exception!r}")
    return result.exit_code, result.stderr


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)
    assert sum(c.subprocess for c in CASES) >= 5


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, corpus: Path, request: pytest.FixtureRequest) -> None:
    if case.id == "no-free-space" and shutil.disk_usage(corpus).free > 8 * HUGE_SIDE**2:
        pytest.skip("the disk has room for the huge image")
    if case.s3 == "auth":
        request.getfixturevalue("s3_with_auth")
    before = snapshot(corpus)
    code, stderr = run_case(case, corpus)
    assert code == case.code, stderr
    sentence = one_sentence(stderr)
    assert case.names in sentence, sentence
    # every option the sentence suggests exists on the command that printed it
    assert suggested_flags(sentence) <= command_flags(case.argv), sentence
    if case.value:
        assert re.search(rf"(?<![\w.-]){re.escape(case.value)}(?![\w.])", sentence), sentence
    after = snapshot(corpus)
    changed = [p for p, digest in before.items() if after.get(p) != digest]
    assert not changed, f"{case.id} changed existing files: {changed}"
    new = [corpus / p for p in set(after) - set(before)]
    assert not [p for p in new if marked_complete(p)], f"{case.id} marked outputs complete"
    assert not [p for p in new if ".partial" in p.name]
    if case.writes_nothing:
        dst = Path(case.writes_nothing.format(root=corpus, id=case.id))
        assert not dst.exists(), f"{case.id} wrote {dst} before refusing"


def test_debug_shows_the_traceback(corpus: Path) -> None:
    argv = ["ingest", str(corpus / "text.tif"), str(corpus / "out" / "debug.zarr"), "-q"]
    for extra, env in ((["--debug"], {}), ([], {"SEGFLOW_DEBUG": "1"})):
        done = subprocess.run(
            [sys.executable, "-m", "segflow", *extra, *argv],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        assert done.returncode == ExitCode.BAD_INPUT
        assert "Traceback" in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("segflow: error: ")
