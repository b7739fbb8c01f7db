"""``segflow serve``: serve the Prefect deployments (nightly inbox, on-demand runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from segflow.cli import app, clean_errors, cluster_options, output_options, warn

if TYPE_CHECKING:
    from tasks.cluster import ClusterSpec


@app.command()
@clean_errors
@output_options(summary=False)
@cluster_options
def serve(
    inbox: Annotated[
        str | None, typer.Option(envvar="SEGFLOW_INBOX", help="Nightly inbox (folder or s3://).")
    ] = None,
    output: Annotated[
        str | None, typer.Option(envvar="SEGFLOW_OUTPUT", help="Nightly output location.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(envvar="SEGFLOW_MODEL", help="Checkpoint for the nightly run.")
    ] = None,
    cron: Annotated[str, typer.Option(envvar="SEGFLOW_CRON", help="Nightly schedule.")] = (
        "0 2 * * *"
    ),
    timezone: Annotated[
        str, typer.Option(envvar="SEGFLOW_TIMEZONE", help="Time zone of the schedule.")
    ] = "UTC",
    settle: Annotated[
        float, typer.Option(help="Seconds a volume must be unmodified before it is taken.")
    ] = 600.0,
    limit: Annotated[int | None, typer.Option(help="At most this many flow runs at once.")] = None,
    crash_after: Annotated[
        float,
        typer.Option(help="Seconds without a heartbeat after which a run is marked Crashed."),
    ] = 120.0,
    cluster: ClusterSpec | None = None,
) -> None:
    """Register segflow's deployments with the Prefect API (PREFECT_API_URL) and run them.

    The nightly deployment is created when --inbox, --output and --model are given (or
    SEGFLOW_INBOX, SEGFLOW_OUTPUT, SEGFLOW_MODEL); the cluster options set its default
    cluster (an on-demand run picks its own in the form). Stop with Ctrl-C.
    """
    from deployments.serve import ServeSettings
    from deployments.serve import serve as run_serve

    settings = ServeSettings(
        inbox=inbox,
        output=output,
        model=model,
        cron=cron,
        timezone=timezone,
        settle_s=settle,
        crash_after_s=crash_after,
        cluster=cluster,
    )
    if not (inbox and output and model):
        warn("no --inbox/--output/--model: serving the on-demand deployments only")
    run_serve(settings, limit=limit)
