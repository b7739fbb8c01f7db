"""Run every benchmark under ``bench/``, collect their JSON, write the table and the plots.

    python -m bench.run_all [--quick] [--only peers,memory]

Each benchmark module (``bench/<name>.py`` with a ``main``; helpers are skipped) runs in its
own subprocess, so peak-memory figures belong to one benchmark each. Their JSON is gathered
into ``bench/results.json`` with the machine and its load averages during the run (other
work on a shared machine slows everything down: read timings with them), a markdown table
``bench/results.md``, the plots ``bench/rss_vs_volume.png`` and ``bench/peers.png``, and the
section of the guide's ``docs/benchmarks.md`` between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` (with the plots copied into ``docs/img/``, where the guide finds them).

``--quick`` runs small sizes for development and writes only to ``bench/out/`` (git-ignored),
never the committed results. ``--only`` reruns some benchmarks and merges them into the
existing results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import OUT, ROOT, load_average, parse_json_output, run_measured

BENCH = ROOT / "bench"
NOT_BENCHMARKS = {"__init__", "common", "run_all"}
ORDER = ["engine", "peers", "memory", "scaling", "stitch", "ingest", "train", "gpu"]

#: Arguments per benchmark: full runs use each module's defaults unless listed here.
FULL_ARGS: dict[str, list[str]] = {
    # engine: its default, 256×512×512 uint16 = 128 MiB (the issue's minimum).
}
QUICK_ARGS: dict[str, list[str]] = {
    "engine": ["--shape", "16,512,512"],
    "peers": ["--shape", "16,512,512", "--chunks", "8,256,256"],
    "memory": ["--base", "16,512,512", "--factors", "1,2", "--limit-mib", "0", "--no-untuned"],
    "scaling": ["--shape", "16,512,512"],
    "stitch": ["--sizes", "64"],
    "ingest": ["--repeat", "1"],
    "gpu": ["--quick", "--seconds", "1"],
    "train": ["--steps", "20", "--size", "256"],
}
TIMEOUT_S = 3 * 3600

START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def discover() -> list[str]:
    names = [
        p.stem
        for p in BENCH.glob("*.py")
        if p.stem not in NOT_BENCHMARKS and not p.stem.startswith("_")
    ]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


# ------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    for pkg in ("torch", "monai", "dask", "zarr", "prefect", "numpy", "scipy"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:
            info[pkg] = None
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        info["cuda"] = None
    return info


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


class LoadSampler:
    """1-minute load average every ``every`` seconds while the benchmarks run."""

    def __init__(self, every: float = 15.0) -> None:
        self.every = every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(os.getloadavg()[0])
            self._stop.wait(self.every)

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float]:
        s = self.samples or [os.getloadavg()[0]]
        return {
            "min": round(min(s), 2),
            "mean": round(sum(s) / len(s), 2),
            "max": round(max(s), 2),
            "samples": len(s),
        }


# ----------------------------------------------------------------------------- run


def run_one(name: str, args: list[str]) -> dict[str, Any]:
    print(f"[bench] {name} {' '.join(args)}", file=sys.stderr, flush=True)
    before = load_average()
    with LoadSampler() as sampler:
        res = run_measured([sys.executable, "-m", f"bench.{name}", *args], timeout=TIMEOUT_S)
    entry: dict[str, Any] = {
        "args": args,
        "rc": res["rc"],
        "wall_s": round(res["wall_s"], 1),
        "process_peak_rss_mib": round(res["peak_rss_mib"], 1),
        "load_average_before": before,
        "load_1min_during": sampler.summary(),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if res["rc"] == 0:
        try:
            entry["result"] = parse_json_output(res["stdout"])
        except ValueError as exc:
            entry["error"] = str(exc)
    else:
        entry["error"] = ("timed out; " if res["timed_out"] else "") + res["stderr"][-2000:]
    status = "ok" if "result" in entry else "FAILED"
    print(f"[bench] {name}: {status} in {entry['wall_s']} s", file=sys.stderr, flush=True)
    return entry


# --------------------------------------------------------------------------- table


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float) and digits == 0:
        return f"{round(v):,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.{digits}f}".rstrip("0").rstrip(".")
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _met(flag: Any) -> str:
    return "" if flag is None else (" ✅" if flag else " ❌")


def rows_for(name: str, r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, result, target) rows of one benchmark's JSON."""
    rows: list[tuple[str, str, str]] = []
    if name == "engine":
        rows.append(
            (
                f"segment / forward-only wall time ({_shape(r.get('volume_shape'))}, "
                f"{r['model']['ndim']}D depth {r['model']['depth']})",
                _fmt(r.get("ratio_segment_to_forward"), 3)
                + _met(r.get("ratio_segment_to_forward", 9) <= r.get("target_ratio", 1.1)),
                f"≤ {r.get('target_ratio')}",
            )
        )
        rows.append(
            (
                "computed voxels per output voxel",
                _fmt(r.get("input_voxels_per_output_voxel"), 3),
                "",
            )
        )
        rows.append(
            (
                "segment throughput (voxels/s), peak RSS (MiB)",
                f"{_fmt(r.get('segment_voxels_per_s'), 0)}, {_fmt(r.get('peak_rss_mib'), 0)}",
                "",
            )
        )
    elif name == "peers":
        p, q = r["paths"], r["ratios"]
        vol = _shape(r["volume_shape"])
        rows += [
            (
                f"wall time segflow / MONAI ({vol}, default mode; MONAI as users run it)",
                _fmt(q["segflow_wall_over_monai"], 3) + _met(r.get("target_met")),
                f"≤ {r.get('target_wall_over_monai')}",
            ),
            (
                "wall time segflow --fast / MONAI (both oneDNN)",
                _fmt(q["segflow_fast_wall_over_monai"], 3) + _met(r.get("target_met_fast")),
                f"≤ {r.get('target_wall_over_monai')}",
            ),
            (
                "wall time segflow / MONAI under segflow's allocator tuning (default; --fast)",
                f"{_fmt(q.get('segflow_wall_over_monai_tuned'), 3)}; "
                f"{_fmt(q.get('segflow_fast_wall_over_monai_tuned'), 3)}",
                "reported",
            ),
            (
                "peak RSS segflow / MONAI (default; --fast)",
                f"{_fmt(q['segflow_rss_over_monai'], 3)}; "
                f"{_fmt(q['segflow_fast_rss_over_monai'], 3)}",
                "",
            ),
            (
                "max abs Δp to the whole-volume pass: segflow default / --fast",
                f"{_fmt(p['segflow']['max_abs_diff'])} / {_fmt(p['segflow_fast']['max_abs_diff'])}"
                + _met(p["segflow"]["max_abs_diff"] <= 1e-5),
                "≤ 1e-5 (float32 rounding)",
            ),
            (
                "max abs Δp MONAI: to segflow's pass / to its own plain pass (interior)",
                f"{_fmt(p['monai']['max_abs_diff'], 3)} / "
                f"{_fmt(p['monai']['vs_plain']['max_abs_diff_interior'], 3)}",
                "reported",
            ),
            (
                "wall time segflow / naive Dask map_overlap (default; --fast)",
                f"{_fmt(q['segflow_wall_over_naive_dask'], 3)}; "
                f"{_fmt(q['segflow_fast_wall_over_naive_dask'], 3)}",
                "",
            ),
            (
                "wall time segflow / naive Dask under segflow's allocator tuning (default; --fast)",
                f"{_fmt(q.get('segflow_wall_over_naive_dask_tuned'), 3)}; "
                f"{_fmt(q.get('segflow_fast_wall_over_naive_dask_tuned'), 3)}",
                "",
            ),
            (
                "peak RSS segflow / naive Dask (default; --fast)",
                f"{_fmt(q['segflow_rss_over_naive_dask'], 3)}; "
                f"{_fmt(q['segflow_fast_rss_over_naive_dask'], 3)}",
                "",
            ),
            (
                "max abs Δp naive Dask: to segflow's pass / to the plain pass (interior)",
                f"{_fmt(p['naive_dask']['max_abs_diff'], 3)} / "
                f"{_fmt(p['naive_dask']['vs_plain']['max_abs_diff_interior'], 3)}",
                "",
            ),
            (
                "seconds: segflow / --fast / MONAI / naive Dask (tuned: MONAI / naive Dask)",
                " / ".join(
                    _fmt(p[k]["seconds"], 1)
                    for k in ("segflow", "segflow_fast", "monai", "naive_dask")
                )
                + " ("
                + " / ".join(
                    _fmt(p[k]["seconds"], 1) if k in p else "-"
                    for k in ("monai_tuned", "naive_dask_tuned")
                )
                + ")",
                "",
            ),
            (
                "peak RSS MiB: segflow / --fast / MONAI / naive Dask",
                " / ".join(
                    _fmt(p[k]["peak_rss_mib"], 0)
                    for k in ("segflow", "segflow_fast", "monai", "naive_dask")
                ),
                "",
            ),
        ]
    elif name == "memory":
        runs = r["runs"]
        rows.append(
            (
                "`segflow segment` peak RSS MiB at "
                + " / ".join(f"{x['factor']}x ({_fmt(x['volume_mib'], 0)} MiB)" for x in runs),
                " / ".join(_fmt(x["peak_rss_mib"], 0) for x in runs),
                "",
            )
        )
        rows.append(
            (
                f"RSS({r['factors'][1]}x) / RSS({r['factors'][0]}x): peak; steady p95",
                f"{_fmt(r['rss_ratio_largest_to_smallest'], 3)}{_met(r.get('target_met'))}; "
                f"{_fmt(r.get('rss_p95_ratio_largest_to_smallest'), 3)}",
                f"≤ {r.get('target_ratio')}",
            )
        )
        unt = r.get("untuned_allocator", {})
        if unt.get("runs"):
            rows.append(
                (
                    "same with glibc's default allocator (`SEGFLOW_MALLOC_TUNING=0`): peak RSS "
                    "MiB " + " / ".join(f"{x['factor']}x" for x in unt["runs"]) + "; ratio",
                    " / ".join(_fmt(x["peak_rss_mib"], 0) for x in unt["runs"])
                    + f"; {_fmt(unt['rss_ratio_largest_to_smallest'], 3)}",
                    "",
                )
            )
        lim = r.get("memory_limit_run", {})
        if "limit_mib" in lim:
            data = lim["attempts"].get("RLIMIT_DATA (prlimit --data)", {})
            rows.append(
                (
                    f"{_fmt(lim['volume_mib'], 0)} MiB volume under a {lim['limit_mib']} MiB "
                    "limit (RLIMIT_DATA)",
                    ("completed" if lim.get("completed") else "failed")
                    + _met(lim.get("completed"))
                    + f", peak RSS {_fmt(data.get('peak_rss_mib'), 0)} MiB",
                    "completes",
                )
            )
    elif name == "scaling":
        runs = {x["workers"]: x for x in r["runs"]}
        rows.append(
            (
                "blocks/s with " + " / ".join(f"{k} worker{'s' if k > 1 else ''}" for k in runs),
                " / ".join(_fmt(x["blocks_per_s"], 3) for x in runs.values()),
                "",
            )
        )
        rows.append(
            ("speed-up 2 workers / 1", _fmt(r.get("speedup_2_over_1_workers"), 3), "≈ 2 ideal")
        )
        rows.append(
            (
                "Prefect overhead per region (s)",
                _fmt(r.get("prefect_overhead_per_region_s"), 3)
                if r.get("prefect_overhead_per_region_s") is not None
                else f"— ({r.get('reason', '')})",
                "",
            )
        )
    elif name == "stitch":
        for run in r["runs"]:
            rows.append(
                (
                    f"stitch peak RSS segflow / in-memory, {_fmt(run['label_mib'], 0)} MiB "
                    f"labels, {_fmt(run['segflow']['objects'], 0)} objects",
                    f"{_fmt(run['ratio_rss_segflow_to_inmemory'], 3)} "
                    f"({_fmt(run['segflow']['peak_rss_mib'], 0)} / "
                    f"{_fmt(run['inmemory']['peak_rss_mib'], 0)} MiB)"
                    + _met(run["ratio_rss_segflow_to_inmemory"] <= r.get("target_ratio_rss", 0.25)),
                    f"≤ {r.get('target_ratio_rss')}",
                )
            )
            rows.append(
                (
                    f"stitch seconds segflow / in-memory ({_fmt(run['label_mib'], 0)} MiB), "
                    "same objects",
                    f"{_fmt(run['segflow']['seconds'], 1)} / {_fmt(run['inmemory']['seconds'], 1)}"
                    + _met(run["objects_equal"]),
                    "equal counts",
                )
            )
    elif name == "ingest":
        ratio = r.get("ratio", {})
        met = r.get("targets_met", {})
        rows.append(
            (
                "ingest throughput / naive",
                _fmt(ratio.get("throughput"), 3) + _met(met.get("throughput>=0.8x")),
                "≥ 0.8",
            )
        )
        rows.append(
            (
                "ingest peak RSS / naive",
                _fmt(ratio.get("peak_rss"), 3) + _met(met.get("peak_rss<=1/8")),
                "≤ 0.125",
            )
        )
    elif name == "train":
        held = r.get("held_out", {})
        rows.append(
            (
                f"training {r.get('steps')} steps on one {_shape(r.get('image'))} synthetic "
                "image: seconds, steps/s",
                f"{_fmt(r.get('train_seconds'), 0)}, {_fmt(r.get('steps_per_second'))}",
                "",
            )
        )
        rows.append(
            (
                "held-out Dice / instance F1 / Rand error",
                " / ".join(_fmt(held.get(k), 3) for k in ("dice", "f1", "rand_error")),
                "",
            )
        )
        stacks = r.get("stacks") or {}
        if stacks:
            rows.append(
                (
                    f"stacks {_shape(stacks.get('shape'))} (z 3x coarser, "
                    f"{_fmt(100 * stacks.get('touching_z', 0), 0)}% touching along z): "
                    "instance F1 3D components / slice linking",
                    f"{_fmt(stacks.get('f1_components'), 3)} / {_fmt(stacks.get('f1_slices'), 3)}",
                    "slices ≥ 0.85",
                )
            )
    elif name == "gpu":
        if r.get("skipped"):
            rows.append(("GPU benchmark", f"skipped: {r['skipped']}", ""))
            for m, info in r.get("models", {}).items():
                rows.append(
                    (
                        f"{m}: conv FLOPs per output voxel",
                        _fmt(info["flops_per_output_voxel"], 0),
                        "",
                    )
                )
        else:
            for m, info in r["models"].items():
                conv = info.get("convolutions_bf16_channels_last", {})
                e2e = info.get("end_to_end", {})
                rows.append(
                    (
                        f"{m}: convolution TFLOP/s, fraction of bf16 peak",
                        f"{_fmt(conv.get('tflops'))}, {_fmt(conv.get('fraction_of_bf16_peak'), 3)}"
                        + _met(conv.get("target_met")),
                        "≥ 0.4",
                    )
                )
                rows.append(
                    (
                        f"{m}: end-to-end / forward-only throughput",
                        _fmt(e2e.get("ratio_e2e_to_forward"), 3) + _met(e2e.get("target_met")),
                        "≥ 0.9",
                    )
                )
    else:
        for k, v in r.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                rows.append((k, _fmt(v), ""))
    return rows


def _shape(shape: Any) -> str:
    return "×".join(str(s) for s in shape) if shape else "?"


def markdown_table(results: dict[str, Any]) -> str:
    lines = ["| benchmark | measure | result | target |", "| --- | --- | --- | --- |"]
    for name, entry in results["benchmarks"].items():
        if "result" not in entry:
            lines.append(f"| {name} | run | failed (see results.json) | |")
            continue
        for measure, value, target in rows_for(name, entry["result"]):
            lines.append(f"| {name} | {measure} | {value} | {target} |")
    return "\n".join(lines)


def _where_measured(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """ "commit `X`" (plus the benchmarks re-run at other commits by ``--only``) and the
    1-minute load over every benchmark's own run."""
    entries = results["benchmarks"]
    commits: dict[str, list[str]] = {}
    for name, entry in entries.items():
        commits.setdefault(entry.get("commit") or results.get("commit") or "?", []).append(name)
    main = max(commits, key=lambda c: len(commits[c]))
    text = f"commit `{main}`"
    others = [f"{', '.join(n)} re-run at `{c}`" for c, n in commits.items() if c != main]
    if others:
        text += " (" + "; ".join(others) + ")"
    loads = [e["load_1min_during"] for e in entries.values() if e.get("load_1min_during")]
    if not loads:
        return text, results.get("load_1min_during", {})
    load = {
        "min": min(x["min"] for x in loads),
        "mean": round(sum(x["mean"] for x in loads) / len(loads), 2),
        "max": max(x["max"] for x in loads),
    }
    return text, load


def machine_line(results: dict[str, Any]) -> str:
    m = results["machine"]
    where, load = _where_measured(results)
    return (
        f"Measured {results['generated'][:10]} at {where} on "
        f"{m.get('cpu', 'an unknown CPU')} ({m.get('cpu_count')} cores, "
        f"{m.get('memory_gib')} GiB RAM, no GPU{'' if not m.get('cuda') else ': ' + m['cuda']}), "
        f"Python {m.get('python')}, torch {m.get('torch')}, MONAI {m.get('monai')}. "
        f"The machine was shared: 1-minute load average during the run min {load.get('min')}, "
        f"mean {load.get('mean')}, max {load.get('max')} (on {m.get('cpu_count')} cores), so "
        "wall times carry that noise."
    )


# --------------------------------------------------------------------------- plots


def plots(results: dict[str, Any], where: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    b = results["benchmarks"]
    mem = b.get("memory", {}).get("result")
    st = b.get("stitch", {}).get("result")
    if mem or st:
        fig, axes = plt.subplots(1, 3 if mem else 1, figsize=(15 if mem else 5, 4))
        axes = list(axes) if mem else [axes]
        if mem:
            ax = axes.pop(0)
            xs = [x["volume_mib"] for x in mem["runs"]]
            ax.plot(xs, [x["peak_rss_mib"] for x in mem["runs"]], "o-", label="peak RSS")
            ax.plot(xs, [x["rss_p95_mib"] for x in mem["runs"]], "s--", label="RSS p95")
            ax.plot(xs, xs, ":", color="grey", label="volume size")
            lim = mem.get("memory_limit_run", {})
            data = lim.get("attempts", {}).get("RLIMIT_DATA (prlimit --data)", {})
            if data.get("peak_rss_mib"):
                ax.plot(
                    [lim["volume_mib"]],
                    [data["peak_rss_mib"]],
                    "r*",
                    ms=12,
                    label=f"under a {lim['limit_mib']} MiB limit",
                )
                ax.axhline(lim["limit_mib"], color="r", lw=0.8, ls="--")
            ax.set_xlabel("volume (MiB, uint16)")
            ax.set_ylabel("MiB")
            ax.set_title("segflow segment: RSS vs volume size")
            ax.legend(fontsize=8)
            ax = axes.pop(0)
            for x in mem["runs"]:
                tl = x.get("rss_timeline") or []
                if tl:
                    ax.plot([t for t, _ in tl], [m for _, m in tl], label=f"{x['factor']}x")
            ax.set_xlabel("seconds")
            ax.set_ylabel("RSS (MiB)")
            ax.set_title("segflow segment: RSS over time")
            ax.legend(fontsize=8)
        if st:
            ax = axes.pop(0)
            xs = [x["label_mib"] for x in st["runs"]]
            ax.plot(
                xs, [x["segflow"]["peak_rss_mib"] for x in st["runs"]], "o-", label="segflow stitch"
            )
            ax.plot(
                xs,
                [x["inmemory"]["peak_rss_mib"] for x in st["runs"]],
                "s-",
                label="scipy.ndimage.label in memory",
            )
            ax.set_xlabel("instance labels (MiB, uint32)")
            ax.set_ylabel("peak RSS (MiB)")
            ax.set_title("stitch: peak RSS vs volume size")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = where / "rss_vs_volume.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path.name)
    peers = b.get("peers", {}).get("result")
    if peers:
        names = ["segflow", "segflow_fast", "monai", "naive_dask"]
        labels = ["segflow (default)", "segflow --fast", "MONAI", "naive Dask"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
        a1.bar(labels, [peers["paths"][n]["seconds"] for n in names], color="C0")
        a1.set_ylabel("seconds")
        a1.set_title(f"wall time, {_shape(peers['volume_shape'])} uint16")
        a2.bar(labels, [peers["paths"][n]["peak_rss_mib"] for n in names], color="C1")
        a2.set_ylabel("MiB")
        a2.set_title("peak RSS")
        for ax in (a1, a2):
            ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        path = where / "peers.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path.name)
    return made


# ------------------------------------------------------------------- the guide's page

DOCS_PAGE = ROOT / "docs" / "benchmarks.md"
DOCS_IMG = ROOT / "docs" / "img"


def update_docs(section: str, page: Path = DOCS_PAGE) -> None:
    """Replace the text between the markers (append a Benchmarks section if absent)."""
    text = page.read_text()
    block = f"{START}\n{section.strip()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Benchmarks\n\n" + block + "\n"
    page.write_text(text)


def docs_section(results: dict[str, Any], table: str, images: list[str]) -> str:
    parts = [
        "`make bench` runs every benchmark under `bench/` (each in its own process; "
        "`python -m bench.<name>` runs one) and writes `bench/results.json`, "
        "`bench/results.md` and the plots. Benchmarks need the `bench` extra "
        '(`pip install -e ".[bench]"`: MONAI) and are not part of `make test`.',
        machine_line(results),
        table,
        NOTES,
    ]
    parts += [f"![{name}](img/{name})" for name in images]
    return "\n\n".join(parts)


NOTES = """How to read it (details and every figure: `bench/results.json`, module docstrings):

- **peers**: a 2D `padding="same"` U-Net (depth 2, 4 base channels) run slice by slice;
  segflow's tile = MONAI's `roi_size` = segflow's default-mode tile (its tile lattice for
  the volume, 560×560 for 512×512 slices), overlap 0.25, gaussian blending, batch 4, 2
  torch threads in every path. Every path reads the store and writes labels and float32
  probabilities. MONAI and naive Dask run
  with glibc's default allocator, as their users run them; "tuned" runs them under
  segflow's allocator settings (`unet_core._malloc`), which speed up every PyTorch CPU
  path here, to separate the engine from the allocator. MONAI and naive Dask differ from
  segflow's whole-volume pass mostly because their pooling grid starts at another phase
  (segflow mirror-extends by the tile margin); the "plain pass" figure (the model on each
  whole slice, zero padded) isolates their blending / halo error.
- **memory**: `segflow segment` with a tiny network, CLI defaults; the limited run uses
  `prlimit --data` (RLIMIT_DATA), `--batch-size 1` and `MALLOC_ARENA_MAX=2`.
- **stitch**: peak RSS includes imports (segflow's process starts at about 165 MiB with
  Dask's distributed, zarr, pandas and scipy loaded, the in-memory one at about 105 MiB);
  segflow's then holds the object table, which grows with the number of objects, scipy's
  path grows with the voxels. At 512 MiB that floor alone is a fifth of the in-memory peak.
- **scaling** and every wall time: the machine is shared with other work (load averages
  above); a second Dask worker only helps when a second core is free.
- **gpu** runs only on a CUDA machine (`python -m bench.gpu`); here it reports the FLOP
  counts."""


# ---------------------------------------------------------------------------- main


def render(where: Path, results: dict[str, Any], docs: bool) -> str:
    """results.md, the plots and (full runs) the guide's section; returns the table."""
    table = markdown_table(results)
    images = plots(results, where)
    md = "# segflow benchmarks\n\n" + machine_line(results) + "\n\n" + table + "\n\n"
    md += NOTES.replace("`bench/results.json`", "`results.json`") + "\n"
    md += "".join(f"\n![{n}]({n})\n" for n in images)
    (where / "results.md").write_text(md)
    if docs:
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for name in images:
            shutil.copyfile(where / name, DOCS_IMG / name)
        update_docs(docs_section(results, table, images))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; bench/out only")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite the table, plots and docs page"
    )
    args = parser.parse_args(argv)
    if args.render:
        render(BENCH, json.loads((BENCH / "results.json").read_text()), docs=True)
        return
    names = discover()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = set(wanted) - set(names)
        if unknown:
            raise SystemExit(f"unknown benchmarks: {sorted(unknown)}; have {names}")
        names = [n for n in names if n in wanted]
    where = OUT / "quick" if args.quick else BENCH
    where.mkdir(parents=True, exist_ok=True)
    results_path = where / "results.json"
    results: dict[str, Any] = {"benchmarks": {}}
    if args.only and results_path.exists():
        results = json.loads(results_path.read_text())
    uptime_before = _uptime()
    t0 = time.perf_counter()
    commit = _git_commit()
    with LoadSampler(every=30.0) as sampler:
        for name in names:
            extra = (QUICK_ARGS if args.quick else FULL_ARGS).get(name, [])
            results["benchmarks"][name] = run_one(name, extra) | {"commit": commit}
    results["benchmarks"] = {
        n: results["benchmarks"][n] for n in discover() if n in results["benchmarks"]
    }
    results.update(
        {
            "generated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": commit,
            "quick": args.quick,
            "ran": names,
            "total_wall_s": round(time.perf_counter() - t0, 1),
            "machine": machine_info(),
            "uptime_before": uptime_before,
            "uptime_after": _uptime(),
            "load_1min_during": sampler.summary(),
        }
    )
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    table = render(where, results, docs=not args.quick)
    print(table)
    print(f"\nwrote {results_path.relative_to(ROOT)} and results.md in {where.relative_to(ROOT)}")
    failed = [n for n in names if "result" not in results["benchmarks"][n]]
    if failed:
        raise SystemExit(f"benchmarks failed: {failed}")


if __name__ == "__main__":
    main(sys.argv[1:])
