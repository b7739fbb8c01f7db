"""Run reports in markdown: a volume's summary, its failed regions with the command that
re-runs them, and the nightly run's volumes (plain Python; flows publish them; the
picture they embed: :mod:`tasks.preview`)."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from typing import Any

import numpy as np


def _where(value: str) -> str:
    """A copyable path, or a link where it is a web address."""
    if value.startswith(("http://", "https://")):
        return f"[{value}]({value})"
    return f"`{value}`"


def markdown_report(summary: dict[str, Any]) -> str:
    """The per-volume report shown in the Prefect UI."""
    lines = [f"# segflow: {summary['volume']}", ""]
    for key in (  # a list, not a table: a long path wraps in the pane
        "source",
        "image",
        "model",
        "model_digest",
        "outputs",
        "labels",
        "instances",
        "objects_table",
        "preview",
    ):
        if summary.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {_where(str(summary[key]))}")
    if summary.get("failed_regions"):
        lines += _failed_section(summary)
    if summary.get("preview_uri"):
        lines += ["", "## Preview (middle slices)", "", f"![preview]({summary['preview_uri']})"]
        if summary.get("preview_note"):
            lines += ["", f"*{summary['preview_note']}*"]
    if summary.get("size_histogram"):
        lines += ["", "## Object sizes", "", "| voxels | objects | |", "|---|---|---|"]
        top = max(r["objects"] for r in summary["size_histogram"])
        for r in summary["size_histogram"]:
            bar = "█" * max(1, round(20 * r["objects"] / top)) if r["objects"] else ""
            span = f"{number(r['from'])}-{number(r['to'])}"
            lines.append(f"| {span} | {number(r['objects'])} | {bar} |")
    lines += ["", "## Work", "", "| | |", "|---|---|"]
    for key in (
        "regions",
        "regions_computed",
        "regions_skipped",
        "regions_failed",
        "blocks",
        "voxels",
        "seconds",
        "voxels_per_second",
        "objects",
        "instance_method",
        "min_size",
        "min_size_unit",
        "small_objects_removed",
    ):
        if summary.get(key) is not None:
            lines.append(f"| {key.replace('_', ' ')} | {number(summary[key])} |")
    if summary.get("timings"):
        lines += ["", "## Timings (s)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {number(v)} |" for k, v in summary["timings"].items()]
    if summary.get("class_voxels"):
        lines += ["", "## Voxels per class", "", "| class | voxels |", "|---|---|"]
        lines += [f"| {k} | {number(v)} |" for k, v in summary["class_voxels"].items()]
    if summary.get("parameters"):  # a list: a long value wraps (a code block would not)
        lines += ["", "## Parameters", ""]
        lines += [
            f"- {k}: `{json.dumps(v, default=str)}`" for k, v in summary["parameters"].items()
        ]
    return "\n".join(lines) + "\n"


def _failed_section(summary: dict[str, Any]) -> list[str]:
    """Where each failed region is, its first error (on its own line: it names the damaged
    chunk's path), and how to re-run exactly those."""
    rows = summary["failed_regions"]
    lines = [
        "",
        f"## Failed regions ({len(rows)})",
        "",
        "| region | blocks (grid index) | voxel box (z, y, x ranges) | physical box |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['region']} | {r['blocks']} | {r['voxel_box']} | {r['physical_box']} |")
    lines += ["", "First error of each:", ""]
    lines += [f"- region {r['region']}: {_one_line(r['error'])}" for r in rows]
    rerun = summary.get("rerun_parameters")
    if rerun:
        lines += [
            "",
            "### Re-run exactly these regions",
            "",
            "Retry this flow run (it recomputes only unfinished blocks), or start a new run "
            "of `segment-volume/on-demand` with these parameters, from a shell:",
            "",
            "```",
            rerun_command("segment-volume/on-demand", rerun),
            "```",
        ]
    return lines


def _one_line(text: Any, limit: int = 500) -> str:
    """A message on one markdown line (no table or list syntax broken by it)."""
    return " ".join(str(text).split())[:limit] or "-"


def rerun_command(deployment: str, parameters: dict[str, Any]) -> str:
    """``prefect deployment run`` with one ``--param`` line per parameter (a pane shows each
    line whole; one line of JSON runs off its right edge), ready to paste into a shell.
    Prefect reads each value as JSON, a plain string where it is none."""
    lines = [f"prefect deployment run {shlex.quote(deployment)}"]
    for key, value in parameters.items():
        text = json.dumps(value)
        if isinstance(value, str) and '"' not in value:
            try:
                json.loads(value)
            except ValueError:
                text = value  # a path reads best as it is
        lines.append(f"  --param {key}={shlex.quote(text)}")
    return " \\\n".join(_fold(line) for line in lines)


def _fold(line: str, width: int = 72) -> str:
    """A long unquoted shell line folded after a ``/`` with backslash-newlines, which the
    shell removes (the word stays whole), so a code block, which does not wrap, shows it
    whole; a quoted line is left as it is."""
    if len(line) <= width or "'" in line or '"' in line:
        return line
    parts, rest = [], line
    while len(rest) > width:
        cut = rest.rfind("/", 0, width)
        if cut <= 0:
            break
        parts.append(rest[: cut + 1])
        rest = rest[cut + 1 :]
    return "\\\n".join([*parts, rest])


def number(value: Any) -> str:
    """A number as every report writes it: thousands separated, at most two decimals
    (``12,582,912``, ``246,753``, ``12.4``, ``0.05``); anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        return str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    v = float(value)
    digits = 0 if abs(v) >= 1000 else 1 if abs(v) >= 10 else 2
    return f"{v:,.{digits}f}"


def nightly_report(
    counts: dict[str, int], rows: Sequence[dict[str, Any]], inbox: str, output: str
) -> str:
    """The nightly run's report: its counts, then each volume on its own lines (status,
    path, output, why), so long paths and reasons wrap in the pane."""
    lines = ["# segflow nightly run", ""]
    lines += [f"- {k.replace('_', ' ')}: {number(v)}" for k, v in counts.items()]
    lines += ["", f"Inbox `{inbox}`, output `{output}`."]
    for status in ("failed", "processed", "skipped", "deferred"):
        chosen = [r for r in rows if r["status"] == status]
        if not chosen:
            continue
        lines += ["", f"## {status.capitalize()} ({len(chosen)})", ""]
        for r in chosen:
            facts = [f"`{r['volume']}`"]
            if r.get("output"):
                facts.append(f"output `{r['output']}`")
            if r.get("objects") is not None:
                facts.append(f"{number(r['objects'])} objects")
            if r.get("seconds") is not None:
                facts.append(f"{number(r['seconds'])} s")
            lines.append("- " + ", ".join(facts))
            if r.get("detail"):
                lines.append(f"  - why: {_one_line(r['detail'])}")
    return "\n".join(lines) + "\n"
