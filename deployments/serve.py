"""The deployments of segflow and the one process that serves them.

One mechanism: ``prefect.serve`` in a long-running process (``segflow serve``) against the
configured Prefect API (``PREFECT_API_URL``; a local ``prefect server start`` or Prefect
Cloud). No work pool, Docker or cloud storage is needed; the served process runs the flow
runs itself. Deployments:

- ``nightly-inbox/nightly``: cron (default ``0 2 * * *``) in a configurable time zone, with
  the inbox, output location and model as default parameters (editable in the UI);
- ``segment-volume/on-demand``: one volume, started from the UI form or
  ``prefect deployment run 'segment-volume/on-demand' --param source=... --param model=...``;
- ``train-model/on-demand``: train a U-Net from annotated images.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.cluster import ClusterSpec
from tasks.inbox import DEFAULT_SETTLE_S, SettleSeconds
from tasks.outputs import check_disjoint
from unet_core.errors import ConfigError

NIGHTLY = "nightly"
#: Prefect's setting of the console handler's level (in the flow runs serve starts).
RUN_CONSOLE_LEVEL = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"
ON_DEMAND = "on-demand"


class ServeSettings(BaseModel):
    """What ``segflow serve`` deploys (all optional except what the nightly run needs)."""

    model_config = ConfigDict(extra="forbid")

    inbox: str | None = Field(None, description="Inbox of the nightly run (folder or s3://).")
    output: str | None = Field(None, description="Output location of the nightly run.")
    model: str | None = Field(None, description="Checkpoint used by the nightly run.")
    cron: str = Field("0 2 * * *", description="When the nightly run starts.")
    timezone: str = Field("UTC", description="Time zone of the cron schedule (IANA name).")
    settle_s: SettleSeconds = DEFAULT_SETTLE_S
    paused: bool = Field(False, description="Create the nightly schedule paused.")
    heartbeat_s: int = Field(
        30, ge=30, le=3600, description="Seconds between heartbeats of each served flow run."
    )
    crash_after_s: float = Field(
        120.0,
        ge=40,
        le=24 * 3600,
        description="A run without a heartbeat for this long is marked Crashed (its serving "
        "process died); it must exceed heartbeat_s.",
    )
    cluster: ClusterSpec | None = Field(
        None, description="Where the nightly run's Dask workers run (default: local)."
    )

    @model_validator(mode="after")
    def _apart(self) -> ServeSettings:
        if self.inbox and self.output:
            check_disjoint(self.inbox, self.output, "inbox", "output location")
        return self


def build_deployments(settings: ServeSettings) -> list[Any]:
    """Runner deployments for ``prefect.serve`` (the nightly one only when configured)."""
    from prefect.schedules import Cron

    from flows.nightly import nightly_inbox
    from flows.segment import segment_volume
    from flows.train import train_model

    deployments = [
        segment_volume.to_deployment(
            name=ON_DEMAND,
            description="Segment one volume (TIFF or OME-Zarr) with a checkpoint.",
            tags=["segflow"],
            enforce_parameter_schema=True,
        ),
        train_model.to_deployment(
            name=ON_DEMAND,
            description="Train a U-Net on annotated images and write a checkpoint.",
            tags=["segflow"],
            enforce_parameter_schema=True,
        ),
    ]
    if settings.inbox and settings.output and settings.model:
        deployments.append(
            nightly_inbox.to_deployment(
                name=NIGHTLY,
                description=f"Segment new volumes from {settings.inbox} every night.",
                schedule=Cron(settings.cron, timezone=settings.timezone),
                parameters={
                    "inbox": settings.inbox,
                    "output": settings.output,
                    "model": settings.model,
                    "settle_s": settings.settle_s,
                    **_options(settings),
                },
                paused=settings.paused,
                tags=["segflow", "nightly"],
                enforce_parameter_schema=True,
            )
        )
    return deployments


#: The automation ``segflow serve`` registers (one per Prefect API, replaced on each start).
CRASH_AUTOMATION = "segflow: mark runs without heartbeats Crashed"


def crash_detection(settings: ServeSettings) -> Any:
    """Prefect's zombie-run detection: a flow run whose heartbeats stop (its process was
    killed, its machine died) without reaching a final state is set to Crashed, which the UI
    can retry. Heartbeats come from the served runs (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    if settings.crash_after_s <= settings.heartbeat_s:
        raise ConfigError(
            f"crash_after_s {settings.crash_after_s:g} must exceed heartbeat_s "
            f"{settings.heartbeat_s}: live runs would be marked Crashed"
        )
    return Automation(
        name=CRASH_AUTOMATION,
        description="Registered by segflow serve: a run whose serving process died is "
        "Crashed; retry it from the UI and it recomputes only unfinished regions.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=settings.crash_after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {settings.crash_after_s:g} s: the process running "
                "this flow died. Retry the run to recompute only its unfinished regions.",
            )
        ],
    )


def register_crash_detection(settings: ServeSettings) -> None:
    """Create (or replace) the crash-detection automation on the Prefect API."""
    from prefect import get_client

    automation = crash_detection(settings)
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(CRASH_AUTOMATION):
            client.delete_automation(old.id)
    automation.create()


def _options(settings: ServeSettings) -> dict[str, Any]:
    if settings.cluster is None or settings.cluster == ClusterSpec():
        return {}
    return {"cluster": settings.cluster.model_dump(exclude_defaults=True)}


def serve(settings: ServeSettings, limit: int | None = None) -> None:
    """Register the deployments and crash detection with the Prefect API and run the
    deployments' flow runs (blocks until stopped)."""
    from prefect import serve as prefect_serve

    # Served runs (child processes) send heartbeats; a run without them is crashed.
    os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(settings.heartbeat_s)
    # The runs' info lines go to the API (the UI's logs); their consoles, which are this
    # process's, say only warnings and errors: one line per region of every run would bury
    # serve's own lines. Set after Prefect configured this process's logging (at import).
    os.environ.setdefault(RUN_CONSOLE_LEVEL, "WARNING")
    register_crash_detection(settings)
    prefect_serve(*build_deployments(settings), limit=limit)
