"""The ``nightly-inbox`` flow: segment every new, settled volume in an inbox.

Each new volume runs ``segment-volume`` as a subflow; a failing volume is recorded and
reported, and the night goes on with the next one. The manifest in the output location
(:mod:`tasks.inbox`) remembers what was processed (and what failed) by content identity.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any, cast

from prefect import flow, get_run_logger, tags
from prefect.client.schemas.objects import State
from prefect.exceptions import MissingResult
from pydantic import ConfigDict, Field, model_validator

from flows import (
    core_logs_to_prefect,
    crash_earlier_attempts,
    facility_time,
    failed_state,
    flat_parameters,
    publish_markdown,
    run_form,
)
from flows.segment import (
    FORM_FIRST,
    FORM_GROUPS,
    SegmentOptions,
    SegmentVolumeParams,
    segment_volume,
)
from tasks.inbox import (
    DEFAULT_SETTLE_S,
    SettleSeconds,
    classify,
    output_for,
    read_manifest,
    record,
    scan_inbox,
    write_manifest,
)
from tasks.outputs import check_disjoint, store_exists
from tasks.paths import volume_name
from tasks.report import nightly_report
from unet_core.errors import SegflowError
from unet_core.runtime import configure


class NightlyParams(SegmentOptions):
    """Where new volumes arrive, where results go, which model segments them, and how."""

    model_config = ConfigDict(extra="forbid")

    inbox: str = Field(
        ..., min_length=1, title="Inbox", description="Folder or s3:// prefix to watch."
    )
    output: str = Field(
        ...,
        min_length=1,
        title="Output location",
        description="Folder or s3:// prefix for results and the manifest.",
    )
    model: str = Field(..., min_length=1, title="Model", description="Checkpoint file (.ckpt).")
    settle_s: SettleSeconds = DEFAULT_SETTLE_S
    max_volumes: int = Field(
        100, ge=1, le=10_000, title="Max volumes", description="At most this many per night."
    )

    @model_validator(mode="after")
    def _apart(self) -> NightlyParams:
        check_disjoint(self.inbox, self.output, "inbox", "output location")
        return self

    def options(self) -> dict[str, Any]:
        """How each volume is segmented (the :class:`SegmentOptions` fields)."""
        return self.model_dump(include=set(SegmentOptions.model_fields))


def _nightly_name() -> str:
    """``nightly-2026-11-30-0200``: the scheduled start in the facility's time zone."""
    from prefect.runtime import flow_run

    return f"nightly-{facility_time(flow_run.scheduled_start_time):%Y-%m-%d-%H%M}"


@run_form
@flow(name="nightly-inbox", flow_run_name=_nightly_name, log_prints=True)
@flat_parameters(
    NightlyParams,
    first=("inbox", "output", "model", "settle_s", "max_volumes", *FORM_FIRST[3:]),
    groups={**FORM_GROUPS, NightlyParams: FORM_GROUPS[SegmentOptions]},
)
def nightly_inbox(params: NightlyParams) -> dict[str, Any] | State:
    """Process the inbox: new settled volumes are segmented; failures don't stop the night,
    and the run ends Failed when any volume failed."""
    configure()
    core_logs_to_prefect()
    crash_earlier_attempts()
    logger = get_run_logger()
    manifest = read_manifest(params.output)
    now = time.time()
    groups = classify(scan_inbox(params.inbox), manifest, params.settle_s, now=now)
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
        name = volume_name(c.path)
        vp = SegmentVolumeParams(source=c.path, model=params.model, output=out, **params.options())
        t0 = time.perf_counter()
        with tags("segflow", "nightly", name):
            state = cast(State, segment_volume(**vp.flow_parameters(), return_state=True))
        seconds = round(time.perf_counter() - t0, 1)
        if state.is_completed():
            try:
                summary = state.result()
            except MissingResult:
                # The run completed (its outputs are written and marked complete) but
                # Prefect handed back its final state without the returned summary (seen
                # on a loaded machine when the API's database was locked): the volume is
                # processed all the same, only its object count is not known here.
                logger.warning("%s: processed; its summary was not returned", c.path)
                summary = {}
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
                    "output": out if store_exists(out) else None,
                    "objects": None,
                    "seconds": seconds,
                    "detail": message,
                }
            )
        write_manifest(params.output, manifest)
    for c in groups["new"][params.max_volumes :]:
        rows.append(_row(c, "deferred", "over max_volumes; next night"))
    for c in groups["unsettled"]:
        eligible = facility_time(datetime.fromtimestamp(c.modified + params.settle_s, UTC))
        rows.append(
            _row(
                c,
                "skipped",
                f"modified less than {params.settle_s:.0f} s ago; eligible from "
                f"{eligible:%Y-%m-%d %H:%M:%S %Z}",
            )
        )
    for c in groups["failed"]:
        rows.append(_row(c, "skipped", "failed before and unchanged since; fix or replace it"))
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in ("processed", "failed", "skipped", "deferred")
    }
    counts["already_done"] = len(groups["done"])
    publish_markdown(
        "segflow-nightly",
        nightly_report(counts, rows, params.inbox, params.output),
        description="volumes this night",
    )
    result = {"counts": counts, "volumes": rows}
    if counts["failed"]:
        failed = [r["volume"] for r in rows if r["status"] == "failed"]
        # an exception Prefect resolves (a dict is not one), the night's result on it
        return failed_state(
            VolumesFailedError(
                f"{len(failed)} of {counts['processed'] + len(failed)} volumes failed: "
                + ", ".join(failed),
                result,
            )
        )
    return result


class VolumesFailedError(SegflowError, RuntimeError):
    """Volumes of a nightly run failed (the others were processed); ``result`` is the
    night's result (counts and volumes), as a completed night returns it."""

    def __init__(self, message: object, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result or {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.template, self.result))


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
