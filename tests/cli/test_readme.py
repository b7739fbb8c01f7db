"""The README's quick start, run as a reader runs it, so that it cannot drift.

Every ```bash block of the set-up and quick-start sections carries a marker on the line
before it: ``<!-- test: run; creates: PATH ... -->`` (run here, in order, in an empty
folder; it must exit 0 and leave each PATH) or ``<!-- test: skip (REASON) -->``.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("## Set up and run", "## Quick start on your own data")
MARKER = re.compile(r"<!-- test: (run; creates: (?P<creates>[^>]*?)|skip \((?P<why>.+)\)) -->")


def readme_blocks() -> list[tuple[str, str, str | None, list[str]]]:
    """(section, code, skip reason, paths it creates) of each bash block in SECTIONS."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for title in SECTIONS:
        assert title in text, f"README lost its section {title!r}"
        body = text.split(title, 1)[1]
        body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]
        for m in re.finditer(r"(?:^([^\n]*)\n)?```bash\n(.*?)```", body, re.MULTILINE | re.DOTALL):
            marker = MARKER.fullmatch((m.group(1) or "").strip())
            assert marker, f"{title}: a bash block without a test marker:\n{m.group(2)}"
            creates = (marker.group("creates") or "").split()
            blocks.append((title, m.group(2), marker.group("why"), creates))
    return blocks


def test_every_quick_start_block_is_marked_and_most_run():
    blocks = readme_blocks()
    run = [b for b in blocks if b[2] is None]
    assert len(run) >= 5, "the quick start should run train, segment, export and predict"
    for _title, code, why, creates in blocks:
        assert why or creates, f"a run block names no output:\n{code}"


def test_the_quick_start_runs_as_written(tmp_path):
    """In an empty folder, with ``segflow`` on PATH being this checkout."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "segflow"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m segflow "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    for _title, code, why, creates in readme_blocks():
        if why is not None:
            continue
        res = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if res.returncode != 0:
            pytest.fail(f"README block failed ({res.returncode}):\n{code}\n{res.stderr[-3000:]}")
        assert "Traceback" not in res.stderr, res.stderr
        for path in creates:
            assert (work / path).exists(), f"{code.strip()} did not create {path}"
