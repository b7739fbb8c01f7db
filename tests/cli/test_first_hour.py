"""A new user's first hour (issue 27): what ``make demo`` installs and prints, and the
package metadata pip reads. (The quick start as written: test_readme.py; ``-h``, typos and
``-q`` before the command: test_conventions.py and test_doors.py; sizes and ids:
tests/tasks/test_stitch.py; the preview: tests/tasks/test_report.py.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_metadata_reads_without_setuptools_warnings(monkeypatch):
    """pip printed three 12-line deprecation warnings: the licence was a table."""
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_make_demo_installs_what_segflow_runs_with_and_not_the_test_tooling(tmp_path):
    venv = tmp_path / "venv"  # absent: make prints every step it would take
    plan = subprocess.run(
        ["make", "-n", "demo", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True
    )
    assert plan.returncode == 0, plan.stderr
    installs = [line for line in plan.stdout.splitlines() if " install " in line]
    assert any(re.search(r"--editable \.$", line) for line in installs), installs
    assert not any("[dev" in line for line in installs), installs
    test_plan = subprocess.run(
        ["make", "-n", "test", f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert '--editable ".[dev]"' in test_plan


def demo(out: Path) -> tuple[list[str], dict]:
    done = subprocess.run(
        [sys.executable, "-m", "segflow.demo", "--out", str(out), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout + done.stderr
    lines = text[: text.index("{")].splitlines()
    return lines + text[text.rindex("}") + 1 :].splitlines(), json.loads(
        text[text.index("{") : text.rindex("}") + 1]
    )


@pytest.mark.slow
def test_the_demo_prints_its_own_lines_and_a_rerun_says_nothing_was_recomputed(tmp_path):
    first, report = demo(tmp_path / "demo")
    steps = [line for line in first if re.match(r"\[\d/5\]", line)]
    assert [s[:5] for s in steps] == ["[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"]
    others = [line for line in first if line.strip() and not line.startswith(("[", "      "))]
    assert others == [], others  # no Prefect INFO lines, no warnings
    assert "new volume" in steps[1]
    assert "6 blocks computed, 0 reused" in "\n".join(first)
    # scores name what they measure
    assert "instance_f1_at_iou_0.5" in report
    assert "IoU >= 0.5" in report["scores"]
    assert report["tiled_equals_whole_volume"] is True

    again, second = demo(tmp_path / "demo")
    assert "the same volume written again" in "\n".join(again)
    assert "nothing needed recomputing: all 6 blocks and the instances reused" in "\n".join(again)
    assert not any("ingesting it again" in line or "changed" in line for line in again)
    assert second["objects"] == report["objects"]
