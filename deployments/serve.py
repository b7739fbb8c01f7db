"""The deployments of segflow and the one process that serves them.

One mechanism: ``prefect.serve`` in a long-running process (``segflow serve``) against the
configured Prefect API (``PREFECT_API_URL``; a local ``prefect server start`` or Prefect
Cloud). No work pool, Docker or cloud storage is needed; the served process runs the flow
runs itself. Deployments:

- ``nightly-inbox/nightly``: cron (default ``0 2 * * *``) in a configurable time zone, with
  the inbox, output location and model as default parameters (editable in the UI);
- ``segment-volume/on-demand``: one volume, started from the UI form or
  ``prefect deployment run 'segment-volume/on-demand' --param source=... --param model=...``;
- ``train-model/train-on-demand``: train a U-Net from annotated images.

Each deployment's parameter schema is its flow's run form (:func:`flows.form_schema`), and
the runs it serves name times in the facility's time zone (``--timezone``).
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows import ZONE_ENV
from tasks.cluster import ClusterSpec
from tasks.inbox import DEFAULT_SETTLE_S, SettleSeconds
from tasks.outputs import check_disjoint
from unet_core.errors import ConfigError

log = logging.getLogger(__name__)

NIGHTLY = "nightly"
#: Prefect's setting of the console handler's level (in the flow runs serve starts).
RUN_CONSOLE_LEVEL = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"
ON_DEMAND = "on-demand"
#: Distinct from the segmentation's ``on-demand``: the Deployments page lists names.
TRAIN_ON_DEMAND = "train-on-demand"


class ServeSettings(BaseModel):
    """What ``segflow serve`` deploys (all optional except what the nightly run needs)."""

    model_config = ConfigDict(extra="forbid")

    inbox: str | None = Field(None, description="Inbox of the nightly run (folder or s3://).")
    output: str | None = Field(None, description="Output location of the nightly run.")
    model: str | None = Field(None, description="Checkpoint used by the nightly run.")
    cron: str = Field("0 2 * * *", description="When the nightly run starts.")
    timezone: str = Field("UTC", description="Time zone of the cron schedule (IANA name).")
    settle_s: SettleSeconds = DEFAULT_SETTLE_S
    paused: bool = Field(
        False,
        description="Start with the nightly schedule paused. A schedule paused in the UI "
        "stays paused whenever serve starts; resume it there.",
    )
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


def build_deployments(settings: ServeSettings, schedule_active: bool = True) -> list[Any]:
    """Runner deployments for ``prefect.serve`` (the nightly one only when configured;
    ``schedule_active=False``: its schedule switched off)."""
    from prefect.schedules import Cron

    from flows.nightly import nightly_inbox
    from flows.segment import segment_volume
    from flows.train import train_model

    deployments = [
        _deployment(
            segment_volume,
            name=ON_DEMAND,
            description="Segment one volume (TIFF or OME-Zarr) with a checkpoint. Run names "
            f"and times are in {settings.timezone}.",
            tags=["segflow"],
        ),
        _deployment(
            train_model,
            name=TRAIN_ON_DEMAND,
            description="Train a U-Net on annotated images and write a checkpoint.",
            tags=["segflow"],
        ),
    ]
    if settings.inbox and settings.output and settings.model:
        deployments.append(
            _deployment(
                nightly_inbox,
                name=NIGHTLY,
                description=f"Segment new volumes from {settings.inbox} "
                f"{schedule_text(settings.cron, settings.timezone)}.",
                schedule=Cron(settings.cron, timezone=settings.timezone, active=schedule_active),
                parameters={
                    "inbox": settings.inbox,
                    "output": settings.output,
                    "model": settings.model,
                    "settle_s": settings.settle_s,
                    **_options(settings),
                },
                paused=settings.paused,
                tags=["segflow", "nightly"],
            )
        )
    return deployments


def _deployment(flow: Any, **options: Any) -> Any:
    """``flow.to_deployment(**options)``, its parameters checked by the server against the
    flow's run form (:func:`flows.run_form`; Prefect would make the schema again from the
    signature)."""
    deployment = flow.to_deployment(enforce_parameter_schema=True, **options)
    deployment._parameter_openapi_schema = flow.parameters.model_copy(deep=True)
    return deployment


def schedule_text(cron: str, timezone: str) -> str:
    """When a cron schedule runs, in words with its time zone: ``0 2 * * *`` in
    Europe/Berlin is "every day at 02:00 Europe/Berlin time (cron 0 2 * * *)"."""
    fields = cron.split()
    if len(fields) == 5 and fields[2:] == ["*", "*", "*"] and all(f.isdigit() for f in fields[:2]):
        minute, hour = int(fields[0]), int(fields[1])
        return f"every day at {hour:02d}:{minute:02d} {timezone} time (cron {cron})"
    return f"on the cron schedule {cron} in {timezone} time"


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


#: The automation that tells a run why it waits while no ``segflow serve`` runs (created
#: when serve stops, removed when it starts).
UNSERVED_AUTOMATION = "segflow: say why runs wait while segflow serve is stopped"
#: State name (Scheduled type) of a run that waits for ``segflow serve``.
NOT_SERVED = "Not served"


def pauses_on_server(name: str) -> tuple[bool, bool]:
    """Whether the deployment ``flow/deployment`` on the Prefect API is paused, and whether
    a schedule of it is switched off (the schedule's toggle in the UI): serve keeps both."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False, False
    return bool(dep.paused), any(not s.active for s in dep.schedules or [])


def stopped_note(since: datetime) -> str:
    """What a deployment's description says while no ``segflow serve`` serves it."""
    return (
        f"NOT SERVED since {since:%Y-%m-%d %H:%M %Z}: segflow serve was stopped. Runs "
        'submitted now wait (Late, then "Not served") and start when `segflow serve` '
        "runs again."
    )


def unserved_automation(deployment_ids: list[str], since: datetime) -> Any:
    """A run of these deployments that goes Late is set to "Not served" (still Scheduled:
    a restarted serve runs it) with a message saying why it waits."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    return Automation(
        name=UNSERVED_AUTOMATION,
        description="Registered when segflow serve stopped; removed when it starts again.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Late"},
            match=ResourceSpecification({"prefect.resource.id": "prefect.flow-run.*"}),
            match_related=ResourceSpecification(
                {
                    "prefect.resource.role": "deployment",
                    "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
                }
            ),
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.SCHEDULED,
                name=NOT_SERVED,
                message=f"segflow serve stopped at {since:%Y-%m-%d %H:%M %Z}: nothing serves "
                "this deployment; this run starts when `segflow serve` runs again.",
                force=True,
            )
        ],
    )


def mark_served() -> None:
    """Serve starts: runs no longer need telling why they wait (the deployments' own
    descriptions come back as serve registers them)."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(UNSERVED_AUTOMATION):
            client.delete_automation(old.id)


def mark_unserved(deployments: list[Any]) -> None:
    """Serve stops: each deployment's description says nothing serves it, and runs that
    go Late meanwhile say why they wait (schedules keep their paused state)."""
    from prefect import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    since = datetime.now().astimezone()
    ids = []
    with get_client(sync_client=True) as client:
        for d in deployments:
            dep = client.read_deployment_by_name(f"{d.flow_name}/{d.name}")
            client.update_deployment(
                dep.id, DeploymentUpdate(description=f"{stopped_note(since)}\n\n{d.description}")
            )
            ids.append(str(dep.id))
    unserved_automation(ids, since).create()


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
    # ... and name times in the facility's time zone (the schedule's).
    os.environ[ZONE_ENV] = settings.timezone
    # The runs' info lines go to the API (the UI's logs); their consoles, which are this
    # process's, say only warnings and errors: one line per region of every run would bury
    # serve's own lines. Set after Prefect configured this process's logging (at import).
    os.environ.setdefault(RUN_CONSOLE_LEVEL, "WARNING")
    register_crash_detection(settings)
    mark_served()
    # a schedule paused in the UI stays paused (Prefect would re-activate it)
    paused, schedule_off = pauses_on_server(f"nightly-inbox/{NIGHTLY}")
    deployments = build_deployments(
        settings.model_copy(update={"paused": settings.paused or paused}),
        schedule_active=not schedule_off,
    )
    try:
        # Prefect pauses every deployment when serve stops and serve resumes them all
        # when it starts, which loses a pause made in the UI: serve leaves pauses alone
        # and says instead that nothing serves the deployments.
        prefect_serve(*deployments, limit=limit, pause_on_shutdown=False)
    finally:
        try:
            mark_unserved(deployments)
        except Exception as exc:  # the API is gone too: nothing to tell it
            log.warning("could not mark the deployments as not served: %s", exc)
