"""The deployments of segflow and the one process that serves them.

One mechanism: ``prefect.serve`` in a long-running process (``segflow serve``) against the
configured Prefect API (``PREFECT_API_URL``; a local ``prefect server start`` or Prefect
Cloud). No work pool, Docker or cloud storage is needed; the served process runs the flow
runs itself. Deployments:

- ``nightly-inbox/nightly``: cron (default ``0 2 * * *``) in a configurable time zone, with
  the inbox, output location and model as default parameters (editable in the UI);
- ``segment-volume/on-demand``: one volume, started from the UI form or
  ``prefect deployment run 'segment-volume/on-demand' --param params='{...}'``;
- ``train-model/on-demand``: train a U-Net from annotated images.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.cluster import ClusterSpec

NIGHTLY = "nightly"
ON_DEMAND = "on-demand"


class ServeSettings(BaseModel):
    """What ``segflow serve`` deploys (all optional except what the nightly run needs)."""

    model_config = ConfigDict(extra="forbid")

    inbox: str | None = Field(None, description="Inbox of the nightly run (folder or s3://).")
    output: str | None = Field(None, description="Output location of the nightly run.")
    model: str | None = Field(None, description="Checkpoint used by the nightly run.")
    cron: str = Field("0 2 * * *", description="When the nightly run starts.")
    timezone: str = Field("UTC", description="Time zone of the cron schedule (IANA name).")
    settle_s: float = Field(600.0, ge=0, description="Leave volumes younger than this.")
    paused: bool = Field(False, description="Create the nightly schedule paused.")
    cluster: ClusterSpec | None = Field(
        None, description="Where the nightly run's Dask workers run (default: local)."
    )


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
                    "params": {
                        "inbox": settings.inbox,
                        "output": settings.output,
                        "model": settings.model,
                        "settle_s": settings.settle_s,
                        **_options(settings),
                    }
                },
                paused=settings.paused,
                tags=["segflow", "nightly"],
                enforce_parameter_schema=True,
            )
        )
    return deployments


def _options(settings: ServeSettings) -> dict[str, Any]:
    if settings.cluster is None or settings.cluster == ClusterSpec():
        return {}
    return {"options": {"cluster": settings.cluster.model_dump(exclude_defaults=True)}}


def serve(settings: ServeSettings, limit: int | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs (blocks)."""
    from prefect import serve as prefect_serve

    prefect_serve(*build_deployments(settings), limit=limit)
