"""The ``nightly-inbox`` flow: segment every new, settled volume in an inbox.

Each new volume runs ``segment-volume`` as a subflow; a failing volume is recorded and
reported, and the night goes on with the next one. The manifest in the output location
(:mod:`tasks.inbox`) remembers what was processed (and what failed) by content identity.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows import core_logs_to_prefect
from flows.segment import SegmentOptions, SegmentVolumeParams, segment_volume
from tasks.inbox import classify, output_for, read_manifest, record, scan_inbox, write_manifest
from unet_core.runtime import configure


class NightlyParams(BaseModel):
    """Where new volumes arrive, where results go, and which model segments them."""

    model_config = ConfigDict(extra="forbid")

    inbox: str = Field(..., min_length=1, description="Folder or s3:// prefix to watch.")
    output: str = Field(
        ..., min_length=1, description="Folder or s3:// prefix for results and the manifest."
    )
    model: str = Field(..., min_length=1, description="Checkpoint file (.ckpt).")
    settle_s: float = Field(
        600.0,
        ge=0,
        le=7 * 24 * 3600,
        description="Volumes modified more recently than this are left for the next night.",
    )
    max_volumes: int = Field(100, ge=1, le=10_000, description="At most this many per night.")
    options: SegmentOptions = Field(
        default_factory=SegmentOptions, description="How each volume is segmented."
    )


@flow(name="nightly-inbox", log_prints=True)
def nightly_inbox(params: NightlyParams) -> dict[str, Any]:
    """Process the inbox: new settled volumes are segmented; failures don't stop the night."""
    configure()
    core_logs_to_prefect()
    logger = get_run_logger()
    manifest = read_manifest(params.output)
    groups = classify(scan_inbox(params.inbox), manifest, params.settle_s)
    logger.info(
        "inbox %s: %d new, %d still arriving, %d done before, %d failed before (unchanged)",
        params.inbox,
        len(groups["new"]),
        len(groups["unsettled"]),
        len(groups["done"]),
        len(groups["failed"]),
    )
    rows: list[dict[str, Any]] = []
    for c in groups["new"][: params.max_volumes]:
        out = output_for(params.output, c)
        vp = SegmentVolumeParams(
            source=c.path, model=params.model, output=out, **params.options.model_dump()
        )
        t0 = time.perf_counter()
        state = segment_volume(vp, return_state=True)
        seconds = round(time.perf_counter() - t0, 1)
        if state.is_completed():
            summary = state.result()
            record(manifest, c, "done", output=out, objects=summary.get("objects"))
            rows.append(
                {
                    "volume": c.path,
                    "status": "processed",
                    "output": out,
                    "objects": summary.get("objects"),
                    "seconds": seconds,
                    "detail": "",
                }
            )
        else:
            message = _failure_message(state)
            logger.error("%s failed: %s", c.path, message)
            record(manifest, c, "failed", output=out, error=message)
            rows.append(
                {
                    "volume": c.path,
                    "status": "failed",
                    "output": out,
                    "objects": None,
                    "seconds": seconds,
                    "detail": message,
                }
            )
        write_manifest(params.output, manifest)
    for c in groups["new"][params.max_volumes :]:
        rows.append(_row(c, "deferred", "over max_volumes; next night"))
    for c in groups["unsettled"]:
        rows.append(_row(c, "skipped", f"modified less than {params.settle_s:.0f} s ago"))
    for c in groups["failed"]:
        rows.append(_row(c, "skipped", "failed before and unchanged since"))
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in ("processed", "failed", "skipped", "deferred")
    }
    counts["already_done"] = len(groups["done"])
    if rows:
        create_table_artifact(rows, key="segflow-nightly", description="volumes this night")
    create_markdown_artifact(
        "# segflow nightly run\n\n"
        + "\n".join(f"- {k.replace('_', ' ')}: {v}" for k, v in counts.items())
        + f"\n\nInbox `{params.inbox}`, output `{params.output}`.\n",
        key="segflow-nightly-summary",
    )
    return {"counts": counts, "volumes": rows}


def _row(c: Any, status: str, detail: str) -> dict[str, Any]:
    return {
        "volume": c.path,
        "status": status,
        "output": None,
        "objects": None,
        "seconds": None,
        "detail": detail,
    }


def _failure_message(state: Any) -> str:
    try:
        state.result()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return str(state.message or state.name)[:500]
