"""Helpers shared by the benchmarks: peak memory, machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "out"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def emit(result: dict[str, Any]) -> None:
    """Print the result as one JSON line and keep a copy in bench/out/<name>.json."""
    OUT.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=None, sort_keys=False)
    (OUT / f"{result['benchmark']}.json").write_text(text + "\n")
    sys.stdout.write(text + "\n")
