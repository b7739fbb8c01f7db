"""An operator's run in a real browser: headless Chromium drives the Prefect UI of a real
`prefect server` with `segflow serve`, from the Deployments page to the rendered report.

Debian's chromium and the playwright package are installed when missing (playwright's own
browser download is not used); the test skips, saying why, only where that cannot be done.
Screenshots of the form and the artifacts are kept under the test's temporary folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from served_stack import api_call, run_artifacts, serve_stack, wait_state

from flows import is_generated_name
from tasks.preview import PREVIEW_GAP, caption_height, histogram_height
from tasks.store import write_image

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")
SHOTS_COPY = os.environ.get("SEGFLOW_SCREENSHOTS")  # optional extra copy, for development


def _ensure_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} is missing and apt-get cannot install it here (not root/Debian)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if out.returncode != 0:
            pytest.skip(f"`{' '.join(cmd)}` failed: {out.stderr.strip()[-300:]}")
    if not CHROMIUM.exists():
        pytest.skip(f"apt-get installed chromium but {CHROMIUM} is still missing")


def _ensure_playwright():
    try:
        from playwright import sync_api
    except ImportError:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "install", "playwright"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode != 0:
            pytest.skip(f"the playwright package cannot be installed: {out.stderr[-300:]}")
        from playwright import sync_api
    return sync_api


def _shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if SHOTS_COPY:
        Path(SHOTS_COPY).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(SHOTS_COPY) / path.name)
    return path


def _created_run(page, api: str, deployment: str, shots: Path, timeout: float = 90.0) -> str:
    """The id of the flow run the form created from `deployment` (its only run; looked up
    by deployment, as its name changes once the run starts); on failure the assertion
    carries what the form page showed (its validation messages) and a screenshot."""
    dep = api_call("GET", f"{api}/deployments/name/{deployment}").json()
    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = api_call(
            "POST",
            f"{api}/flow_runs/filter",
            json={"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}},
        ).json()
        if runs:
            return runs[0]["id"]
        time.sleep(1)
    path = _shot(page, shots, "submit-failed")
    text = page.locator("body").inner_text()[-1500:]
    raise AssertionError(f"no run of {deployment} after Submit ({page.url}; {path}):\n{text}")


def _form_fits(page, shots: Path) -> None:
    """The run form at 1280x800: no union toggles or "Property is type None" notes, and
    no title, description or input wider than its box or the window (nothing cut off)."""
    form = page.locator(".flow-run-create-form-v2")
    assert "Property is type" not in form.inner_text()
    toggles = ".schema-form-property-any-of, .schema-form-property .p-button-group"
    assert page.locator(toggles).count() == 0
    wide = page.evaluate(
        """() => [...document.querySelectorAll(
            '.schema-form-property__label, .schema-form-property__description,'
            + ' .schema-form-property textarea, .schema-form-property input')]
          .filter(e => e.scrollWidth > e.clientWidth + 1
                       || e.getBoundingClientRect().right > window.innerWidth)
          .map(e => (e.innerText || e.value || e.className).slice(0, 80))"""
    )
    assert not wide, f"cut off at 1280 pixels: {wide}"
    _shot(page, shots, "0-form-top")
    page.locator(
        ".schema-form-property", has_text="GPUs per worker"
    ).first.scroll_into_view_if_needed()
    _shot(page, shots, "0-form-cluster")


#: Seconds each block sleeps in this module's served runs (a run lasts long enough to watch).
BLOCK_DELAY_S = "1.0"


def _cut_off(report) -> list[str]:
    """Elements of a rendered report whose text runs past the pane or hides in a scroll
    area (the UI hides the scroll bars of tables)."""
    return report.evaluate(
        """r => { const right = r.getBoundingClientRect().right + 1;
        return [r, ...r.querySelectorAll('*')]
          .filter(e => e.scrollWidth > e.clientWidth + 1 && e.clientWidth > 0
                       || e.getBoundingClientRect().right > right)
          .map(e => e.tagName + ' ' + e.scrollWidth + '>' + e.clientWidth + ': '
                    + e.textContent.slice(0, 80)); }"""
    )


def _open_report(page, ui: str, api: str, run_id: str, key: str, heading: str):
    """The artifact page of the run's ``key`` (the report beside its details pane)."""
    artifact = next(a for a in run_artifacts(api, run_id) if a["key"] == key)
    page.goto(f"{ui}/artifacts/artifact/{artifact['id']}")
    report = page.locator(".markdown-renderer", has_text=heading).first
    report.wait_for()
    return report


def test_a_run_started_from_the_ui_form_shows_its_report_and_preview(tmp_path):
    _ensure_chromium()
    sync_api = _ensure_playwright()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    src = str(tmp_path / "vol.ome.zarr")
    image = (np.random.default_rng(0).random((4, 64, 64)) * 255).astype(np.uint8)
    write_image(src, image, "zyx", chunks=(2, 32, 32))
    with (
        serve_stack(tmp_path, env={"SEGFLOW_TEST_BLOCK_DELAY": BLOCK_DELAY_S}) as stack,
        sync_api.sync_playwright() as pw,
    ):
        api, ui = stack["api"], f"http://127.0.0.1:{stack['port']}"
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(60_000)
        # Deployments -> segment-volume's on-demand -> Run -> Custom run
        page.goto(f"{ui}/deployments")
        row = page.locator("tr", has_text="segment-volume")
        row.get_by_role("link", name="on-demand").click()
        page.wait_for_url("**/deployments/deployment/**")
        page.get_by_role("button", name="Run", exact=True).click()
        page.get_by_text("Custom run", exact=True).click()
        page.wait_for_url("**/run?**")

        def field(label: str):
            prop = page.locator(".schema-form-property").filter(
                has=page.locator(".schema-form-property__label", has_text=label)
            )
            return prop.first.locator("textarea")

        run_name = page.locator(".p-label", has_text="Run Name").first.locator("input")
        name = run_name.input_value()
        assert is_generated_name(name), f"segflow does not recognise the UI's name {name!r}"
        page.locator(".schema-form-property").first.wait_for()
        _form_fits(page, shots)
        field("Source").fill(src)
        field("Model").fill(stack["model"])
        field("Tile").fill("1,60,60")  # a shape is one text field
        # objects too (off by default, as in the CLI): the form's switch for "Instances"
        instances = page.locator(".schema-form-property").filter(
            has=page.locator(".schema-form-property__label", has_text="Instances")
        )
        instances.first.locator("[role=switch], input[type=checkbox]").first.click()
        _shot(page, shots, "1-form")
        page.get_by_role("button", name="Submit", exact=True).click()
        # the rest as before, in a larger window (the artifacts tab renders only the cards
        # in view)
        page.set_viewport_size({"width": 1400, "height": 1000})
        # the form leaves for the deployment page once the run is created; the run exists
        # under the form's name (looked up through the API: the UI's confirmation toast is
        # gone after a few seconds and the run list refreshes on its own schedule)
        run_id = _created_run(page, api, "segment-volume/on-demand", shots)
        run = wait_state(api, run_id, {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}, 180)
        assert run["state"]["type"] == "COMPLETED", (tmp_path / "serve.log").read_text()[-3000:]
        # the name the form made up became the volume and the facility's time
        assert re.fullmatch(r"vol-\d{6}-\d{6}", run["name"]), run["name"]
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.get_by_text(run["name"], exact=True).first.wait_for()
        assert run["parameters"]["source"] == src
        assert run["parameters"]["instances"] is True
        assert run["parameters"]["tile"] == "1,60,60"

        # the run's Artifacts tab -> the report artifact
        page.reload()
        page.get_by_text("Artifacts", exact=True).click()
        _shot(page, shots, "2-artifacts-tab")
        page.get_by_text("segflow-report-vol", exact=True).first.click()
        report = page.locator(".markdown-renderer", has_text="segflow: vol").first
        report.wait_for()
        preview = page.locator("img[alt=preview]")
        preview.wait_for()
        page.wait_for_function(
            "() => { const i = document.querySelector('img[alt=preview]');"
            " return i && i.complete && i.naturalWidth > 0; }",
            timeout=30_000,
        )
        _shot(page, shots, "3-report")
        width, height = preview.evaluate("i => [i.naturalWidth, i.naturalHeight]")
        # 4x64x64 (no voxel size): three orthogonal slices enlarged 8x (512 + 4 + 32
        # wide) over a line saying so and the object-size histogram, embedded as drawn
        wide = 64 * 8 + PREVIEW_GAP + 4 * 8
        assert (width, height) == (wide, wide + caption_height(wide) + histogram_height(wide))
        shown = preview.evaluate("i => i.getBoundingClientRect().width")
        assert shown >= 512, f"the report shows the preview {shown} pixels wide"
        for heading in ("Preview (middle slices)", "Object sizes", "Work"):
            assert page.get_by_role("heading", name=heading).count() == 1, heading
        assert report.locator("table").count() >= 3
        page.set_viewport_size({"width": 1280, "height": 800})
        report = _open_report(page, ui, api, run_id, "segflow-report-vol", "segflow: vol")
        _shot(page, shots, "4-report-1280")
        assert not _cut_off(report), _cut_off(report)

        # the Logs tab holds the run's summary (segflow's info lines) and its lifecycle
        page.goto(f"{ui}/runs/flow-run/{run_id}")
        page.get_by_text("Logs", exact=True).first.click()
        page.get_by_text("reused from earlier runs", exact=False).first.wait_for()
        page.get_by_text("Finished in state Completed", exact=False).first.wait_for()
        _shot(page, shots, "5-logs")

        # a longer run (slow blocks, one region at a time, one damaged chunk): its page
        # shows the progress value while it goes, and its failure record fits the pane
        long_src = tmp_path / "long-volume-with-a-rather-long-name.ome.zarr"
        data = (np.random.default_rng(1).random((12, 32, 32)) * 255).astype(np.uint8)
        write_image(str(long_src), data, "zyx", chunks=(1, 32, 32))
        chunks = sorted(p for p in (long_src / "0").rglob("*") if p.is_file() and "c" in p.parts)
        chunks[-1].write_bytes(b"damaged")
        dep = api_call("GET", f"{api}/deployments/name/segment-volume/on-demand").json()
        params = {
            "source": str(long_src),
            "model": stack["model"],
            "tile": "1,32,32",
            "max_regions": 12,
            "regions_in_flight": 1,
            "region_retries": 0,
        }
        r = api_call(
            "POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": params}
        )
        long_id = r.json()["id"]
        wait_state(api, long_id, {"RUNNING"}, 120)
        page.goto(f"{ui}/runs/flow-run/{long_id}")
        page.get_by_text("Artifacts", exact=True).first.click()
        page.locator(".flow-run-artifacts").wait_for()
        card = page.locator(".artifact-card", has_text="of regions done")
        card.first.wait_for()
        seen = card.first.inner_text()
        # the card updates itself (the page polls while the run goes): a later value
        page.wait_for_function(
            "t => [...document.querySelectorAll('.artifact-card')].some(c => "
            "/[1-9][0-9]*% of regions done/.test(c.innerText) && c.innerText !== t)",
            arg=seen,
            timeout=60_000,
        )
        running = api_call("GET", f"{api}/flow_runs/{long_id}").json()["state"]["type"]
        assert running == "RUNNING", f"the run ended before its progress showed ({seen})"
        _shot(page, shots, "6-progress")
        run = wait_state(api, long_id, {"COMPLETED", "FAILED", "CRASHED"}, 240)
        assert run["state"]["type"] == "FAILED", run["state"]
        slug = "long-volume-with-a-rather-long-name"
        report = _open_report(page, ui, api, long_id, f"segflow-failed-{slug}", "Failed regions")
        report.get_by_text("Re-run exactly these regions").wait_for()
        _shot(page, shots, "7-failure-record-1280")
        assert not _cut_off(report), _cut_off(report)
        assert len([a for a in run_artifacts(api, long_id) if a["type"] == "progress"]) == 1
        browser.close()
    print(f"screenshots: {sorted(p.name for p in shots.iterdir())} in {shots}")
