"""``segflow serve``: serve the Prefect deployments (nightly inbox, on-demand runs).

Its options are the fields of :class:`deployments.serve.ServeSettings` (the nightly
run's inbox, output, model, schedule and the same ``settle_s`` as the nightly flow's
parameter) and of :class:`tasks.cluster.ClusterSpec`, generated like every run command's.
"""

from __future__ import annotations

from typing import Annotated

import typer

from deployments.serve import ServeSettings
from segflow.app import app
from segflow.errors import clean_errors
from segflow.options import EXTRAS, Extra, with_models
from segflow.output import output_options, warn
from tasks.cluster import ClusterSpec

SERVE_EXTRAS = {
    **EXTRAS,
    "inbox": Extra(envvar="SEGFLOW_INBOX"),
    "output": Extra(envvar="SEGFLOW_OUTPUT"),
    "model": Extra(envvar="SEGFLOW_MODEL"),
    "cron": Extra(envvar="SEGFLOW_CRON"),
    "timezone": Extra(envvar="SEGFLOW_TIMEZONE"),
    "settle_s": Extra(aliases=("--settle",)),
    "crash_after_s": Extra(aliases=("--crash-after",)),
}


@app.command()
@clean_errors
@output_options(summary=False, serving=True)
@with_models(
    ("settings", ServeSettings),
    ("cluster", ClusterSpec),
    exclude=("cluster",),
    extras=SERVE_EXTRAS,
    panels={ClusterSpec: "Cluster of the nightly run: where its Dask workers run"},
)
def serve(
    limit: Annotated[int | None, typer.Option(help="At most this many flow runs at once.")] = None,
    *,
    settings: ServeSettings,
    cluster: ClusterSpec,
) -> None:
    """Register segflow's deployments with the Prefect API (PREFECT_API_URL) and run them.

    The nightly deployment is created when --inbox, --output and --model are given (or
    SEGFLOW_INBOX, SEGFLOW_OUTPUT, SEGFLOW_MODEL); the cluster options set its default
    cluster (an on-demand run picks its own in the form). Stop with Ctrl-C.
    """
    from deployments.serve import serve as run_serve

    if cluster != ClusterSpec():
        settings = settings.model_copy(update={"cluster": cluster})
    if not (settings.inbox and settings.output and settings.model):
        warn("no --inbox/--output/--model: serving the on-demand deployments only")
    run_serve(settings, limit=limit)
