"""Where Dask work runs: the one module that creates Dask clients and clusters.

:class:`dask_client` gives a client for one run, from (first match wins):

- a given ``client`` (the caller owns it);
- a scheduler ``address`` (or ``ClusterSpec(kind="tcp://host:8786")``);
- ``ClusterSpec(kind="slurm" | "pbs" | "sge" | "lsf")``: a dask-jobqueue cluster whose Dask
  workers are batch jobs, scaled adaptively between 0 and ``workers`` jobs;
- ``ClusterSpec(kind="local")`` (the default): an in-process cluster of ``threads`` threads,
  ``workers`` worker processes, or, with ``device="cuda"`` on a machine with k GPUs,
  k worker processes each seeing only its own GPU (:func:`gpu_worker_env`).

A job cluster::

    dask_client.__enter__
      │  sbatch one worker job (a rejected job fails here: sbatch's own message)
      │  wait for its worker, at most ``start_timeout_s``; else cancel the jobs and raise
      │  ClusterStartError naming the job ids and the folder of their logs
      ▼
    adaptive 0..workers jobs: jobs are added while blocks wait, released after
    ``IDLE_RELEASE_S`` idle; a job lost to walltime, preemption or scancel takes its
    running blocks with it and the scheduler runs them again on the other workers (block
    markers make re-running safe), while a replacement job is submitted
      │
    __exit__: every job of the cluster is cancelled

Everything a site sets once (interface, job prologue, extra directives, log folder,
Python) comes from dask-jobqueue's own configuration, ``jobqueue.<kind>.*`` in
``~/.config/dask/jobqueue.yaml`` or ``DASK_JOBQUEUE__SLURM__...`` environment variables;
the fields of :class:`ClusterSpec` override it per run.

Kept free of torch and Prefect imports so light steps (stitch, export) stay light.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from unet_core.errors import ClusterStartError, ConfigError, opt

JOB_KINDS = ("slurm", "pbs", "sge", "lsf")

#: How a worker job asks its batch system for ``n`` GPUs (a site with other conventions
#: sets ``jobqueue.<kind>.job-extra-directives`` and leaves ``gpus_per_worker`` at 0).
GPU_DIRECTIVES = {
    "slurm": "--gres=gpu:{n}",
    "pbs": "-l ngpus={n}",
    "sge": "-l gpu={n}",
    "lsf": '-gpu "num={n}"',
}

#: The batch systems that call the charged account "account"; the others call it "project".
_ACCOUNT_PARAMETER = {"slurm": "account", "pbs": "account", "sge": "project", "lsf": "project"}

#: Seconds a job cluster's worker may sit idle before its job is released.
IDLE_RELEASE_S = 60

#: Where worker job logs go when neither the spec nor jobqueue's config names a folder.
DEFAULT_LOG_DIRECTORY = "segflow-worker-logs"

#: The HTTP endpoint (dashboard, health) of a local cluster's scheduler: any free port on
#: loopback (the default, 8787, is often taken by another cluster and then warns).
LOCAL_HTTP = "127.0.0.1:0"
#: Environment variable that asks for the Dask dashboard of a local cluster: ``1`` (any
#: free loopback port) or an address such as ``127.0.0.1:8787``. Off by default: a
#: command's own progress display says how far it is, and the dashboard costs start-up.
DASHBOARD_ENV = "SEGFLOW_DASHBOARD"

log = logging.getLogger(__name__)


def local_dashboard(environ: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(address, on) of a local cluster's scheduler HTTP server and its dashboard."""
    asked = (os.environ if environ is None else environ).get(DASHBOARD_ENV, "").strip()
    if asked.lower() in ("", "0", "false", "no", "off"):
        return LOCAL_HTTP, False
    return (LOCAL_HTTP if asked.lower() in ("1", "true", "yes", "on") else asked), True


ADDRESS_PATTERN = r"^[a-z][a-z0-9+]*://\S+$"

Address = Annotated[str, StringConstraints(pattern=ADDRESS_PATTERN, max_length=300)]


class ClusterSpec(BaseModel):
    """Where the Dask workers of a run come from (the same choice in the CLI and the UI)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "slurm", "pbs", "sge", "lsf"] | Address = Field(
        "local",
        description="local (this machine), slurm, pbs, sge or lsf (workers are batch jobs), "
        "or the address of a running Dask scheduler (tcp://host:8786).",
    )
    workers: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Job clusters: the most worker jobs (scaled between 0 and this; default "
        "4). Local: worker processes (default: one in-process worker, or one per GPU).",
    )
    worker_cores: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="Cores (Dask threads) per worker (default: jobqueue config, else 1).",
    )
    worker_memory: str | None = Field(
        None,
        pattern=r"^\d+(\.\d+)?\s*[KMGTP]i?B$",
        description="Memory per worker job, e.g. 16GB (default: jobqueue config, else 4GB "
        "per core).",
    )
    gpus_per_worker: int = Field(
        0, ge=0, le=64, description="GPUs each worker job requests (SLURM: --gres=gpu:N)."
    )
    walltime: str | None = Field(
        None,
        pattern=r"^(\d+-)?\d+(:\d{2}){0,2}$",
        description="Time limit of a worker job, e.g. 04:00:00 (default: jobqueue config).",
    )
    queue: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.,@+-]+$",
        description="Queue (SLURM: partition) of the worker jobs (default: jobqueue config).",
    )
    account: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.@+-]+$",
        description="Account (or project) charged for the worker jobs.",
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        le=7 * 24 * 3600,
        description="Fail when no worker job has started within this many seconds.",
    )

    @field_validator("kind", mode="before")
    @classmethod
    def _scheme(cls, value: Any) -> Any:
        """``host:port`` (as distributed accepts it) means ``tcp://host:port``; anything
        else that is neither a kind nor an address is one sentence, not a union's errors."""
        if isinstance(value, str) and re.fullmatch(r"[\w.-]+:\d+", value):
            return f"tcp://{value}"
        known = ("local", *JOB_KINDS)
        if isinstance(value, str) and value not in known and not re.match(ADDRESS_PATTERN, value):
            raise ValueError(
                "is neither local, slurm, pbs, sge, lsf nor a scheduler address like "
                "tcp://host:8786"
            )
        return value

    @property
    def is_address(self) -> bool:
        return "://" in self.kind

    @property
    def is_job_cluster(self) -> bool:
        return self.kind in JOB_KINDS


def cluster_spec(**fields: Any) -> ClusterSpec:
    """A :class:`ClusterSpec` from loose values (CLI options); a bad value raises
    :class:`ConfigError` with one sentence naming the option and the problem."""
    from pydantic import ValidationError

    try:
        return ClusterSpec.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        name = str(err["loc"][0]) if err["loc"] else "cluster"
        msg = str(err["msg"]).removeprefix("Value error, ")
        sep = " " if msg.startswith("is ") else ": "
        raise ConfigError(f"{opt(name)} {fields.get(name)!r}{sep}{msg}") from None


# ------------------------------------------------------------------------------ GPUs


def visible_gpus(environ: Mapping[str, str] | None = None) -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set, else those
    ``nvidia-smi`` lists (none when it is missing). Ids are kept as given (index or UUID)."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        ids = [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",")]
        # CUDA stops at the first invalid entry (e.g. "-1" hides every GPU)
        visible: list[str] = []
        for d in ids:
            if not d or d.startswith("-") or d.lower() == "nodevfiles":
                break
            visible.append(d)
        return visible
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def gpu_worker_env(devices: Sequence[str]) -> dict[str, dict[str, str]]:
    """One worker per GPU: worker name -> the environment that pins it to its device.

    >>> gpu_worker_env(["0", "3"])
    {'gpu-0': {'CUDA_VISIBLE_DEVICES': '0'}, 'gpu-3': {'CUDA_VISIBLE_DEVICES': '3'}}
    """
    if len(set(devices)) != len(devices):
        raise ConfigError(f"GPU ids must be distinct, got {list(devices)}")
    return {f"gpu-{d}": {"CUDA_VISIBLE_DEVICES": str(d)} for d in devices}


def gpu_cluster(devices: Sequence[str], threads: int = 1) -> Any:
    """A local cluster of one worker process per device, each seeing only its device (so
    each loads the model once, onto its own GPU)."""
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        name: {"cls": Nanny, "options": {"nthreads": threads, "env": env}}
        for name, env in gpu_worker_env(devices).items()
    }
    address, dashboard = local_dashboard()
    scheduler = {
        "cls": Scheduler,
        "options": {"dashboard_address": address, "dashboard": dashboard},
    }
    return SpecCluster(workers=workers, scheduler=scheduler, name="segflow-gpus")


# ---------------------------------------------------------------------- job clusters


def _jobqueue_config(kind: str, key: str) -> Any:
    import dask

    return dask.config.get(f"jobqueue.{kind}.{key}", None)


def job_cluster_kwargs(spec: ClusterSpec) -> dict[str, Any]:
    """Keyword arguments of dask-jobqueue's cluster class for ``spec``: the spec's values
    where given, else jobqueue's configuration, else segflow's defaults (one worker
    process per job, 1 core, 4 GB per core, logs in ./segflow-worker-logs)."""
    kind = spec.kind

    def cfg(key: str) -> Any:
        return _jobqueue_config(kind, key)

    cores = spec.worker_cores or cfg("cores") or 1
    kw: dict[str, Any] = {
        "cores": cores,
        "memory": spec.worker_memory or cfg("memory") or f"{4 * cores}GB",
        "processes": cfg("processes") or 1,
        "log_directory": str(
            Path(cfg("log-directory") or Path.cwd() / DEFAULT_LOG_DIRECTORY).absolute()
        ),
        "scheduler_options": {"dashboard_address": ":0", **(cfg("scheduler-options") or {})},
    }
    # Worker logs are what an operator reads when jobs misbehave: they log at the site's
    # configured level, whatever quiets Dask on the command's own terminal.
    kw["job_script_prologue"] = [
        *(cfg("job-script-prologue") or []),
        "unset DASK_LOGGING__DISTRIBUTED",
    ]
    if cfg("name") in (None, "dask-worker"):
        kw["job_name"] = "segflow-worker"
    if spec.walltime:
        kw["walltime"] = spec.walltime
    if spec.queue:
        kw["queue"] = spec.queue
    if spec.account:
        kw[_ACCOUNT_PARAMETER[kind]] = spec.account
    if spec.gpus_per_worker:
        extra = list(cfg("job-extra-directives") or [])
        kw["job_extra_directives"] = [
            *extra,
            GPU_DIRECTIVES[kind].format(n=spec.gpus_per_worker),
        ]
    return kw


def _job_cluster_class(kind: str) -> Any:
    import dask_jobqueue

    return {
        "slurm": dask_jobqueue.SLURMCluster,
        "pbs": dask_jobqueue.PBSCluster,
        "sge": dask_jobqueue.SGECluster,
        "lsf": dask_jobqueue.LSFCluster,
    }[kind]


def job_ids(cluster: Any) -> list[str]:
    """The batch job ids of a job cluster's workers (submitted, running or pending)."""
    return [str(job.job_id) for job in list(cluster.workers.values()) if job.job_id]


def start_job_cluster(spec: ClusterSpec, **overrides: Any) -> tuple[Any, Any]:
    """A dask-jobqueue cluster and a client of it, with one worker started, then adaptive
    between 0 and ``spec.workers`` jobs. Raises :class:`ClusterStartError` when the first
    job is rejected or no worker starts within ``spec.start_timeout_s``."""
    from distributed import Client

    kind = spec.kind
    kw = {**job_cluster_kwargs(spec), **overrides}
    Path(kw["log_directory"]).mkdir(parents=True, exist_ok=True)
    cluster = _job_cluster_class(kind)(**kw)
    cluster.worker_spec.update(cluster.new_worker_spec())
    try:  # submit the first job here, so that a refusal raises rather than goes to a log
        cluster.sync(cluster._correct_state)
    except (RuntimeError, OSError) as exc:  # the submit command's own message says why
        from distributed.core import Status

        for job in cluster.workers.values():
            if not job.job_id:  # never submitted: nothing to cancel
                job.status = Status.failed
        cluster.close()
        said = str(exc).rsplit("stderr:", 1)[-1]  # dask-jobqueue quotes the command's stderr
        text = "; ".join(line.strip() for line in said.splitlines() if line.strip())
        raise ClusterStartError(
            f"the {kind.upper()} worker job was not submitted ({text[-400:]}): check the "
            "queue/partition, account and resources"
        ) from None
    client = Client(cluster)
    try:
        client.wait_for_workers(1, timeout=spec.start_timeout_s)
    except TimeoutError:
        ids = job_ids(cluster)
        client.close()
        cluster.close()
        raise ClusterStartError(
            f"no {kind.upper()} worker started within {spec.start_timeout_s:g} s (job "
            f"{', '.join(ids) or '(none)'} cancelled; logs in {kw['log_directory']}): check "
            "the partition/account and that the queue runs jobs"
        ) from None
    cluster.adapt(
        minimum_jobs=0,
        maximum_jobs=spec.workers or 4,
        interval="1s",
        wait_count=IDLE_RELEASE_S,
    )
    return cluster, client


# ------------------------------------------------------------------------- clients


class dask_client:  # noqa: N801 - used like a function in a with statement
    """A Dask client for one run (see the module docstring); closes what it started.

    ``device``: where the blocks' model runs; with ``"cuda"`` (or ``"auto"`` on a machine
    with GPUs) a local cluster gets one worker process per GPU.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        cluster: ClusterSpec | None = None,
        threads: int = 3,
        device: str = "cpu",
    ) -> None:
        self.given = client
        self.spec = cluster or ClusterSpec()
        self.threads = threads
        self.device = device
        self._owned: list[Any] = []

    def __enter__(self) -> Any:
        from distributed import Client, LocalCluster

        if self.given is not None:
            return self.given
        spec = self.spec
        if spec.is_address:
            client = Client(spec.kind)
            self._owned.append(client)
            return client
        if spec.is_job_cluster:
            cluster, client = start_job_cluster(spec)
            self._owned += [client, cluster]
            return client
        gpus = visible_gpus() if self.device in ("cuda", "auto") else []
        address, dashboard = local_dashboard()
        if gpus and spec.workers is None:
            cluster = gpu_cluster(gpus, threads=spec.worker_cores or 1)
        elif spec.workers is not None:
            cluster = LocalCluster(
                n_workers=spec.workers,
                threads_per_worker=spec.worker_cores or 1,
                processes=True,
                dashboard_address=address,
                worker_dashboard_address=LOCAL_HTTP,
                scheduler_kwargs={"dashboard": dashboard},
            )
        else:
            cluster = LocalCluster(
                n_workers=1,
                threads_per_worker=spec.worker_cores or self.threads,
                processes=False,
                dashboard_address=address,
                worker_dashboard_address=LOCAL_HTTP,
                scheduler_kwargs={"dashboard": dashboard},
            )
        client = Client(cluster)
        self._owned += [client, cluster]
        if dashboard:
            link = client.dashboard_link
            if address.startswith("127.0.0.1:"):  # bound to loopback, whatever the host name
                link = re.sub(r"//[^/:]+", "//127.0.0.1", link, count=1)
            log.warning("Dask dashboard: %s", link)
        return client

    def __exit__(self, *exc: object) -> None:
        # Clients that tasks of this run opened to the cluster it started go with it (left
        # open they would try to reconnect for 30 s and then log an error).
        for obj in self._owned:
            address = getattr(obj, "scheduler_address", None)
            if address:
                release_client(address)
        for obj in self._owned:
            obj.close()
        self._owned.clear()


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def client_for(address: str) -> Any:
    """A Dask client for a scheduler address, one per process (reused across tasks)."""
    from distributed import Client

    with _clients_lock:
        client = _clients.get(address)
        if client is None or client.status not in ("running", "connecting"):
            client = Client(address, set_as_default=False)
            _clients[address] = client
        return client


def release_client(address: str) -> None:
    """Close this process's client for ``address`` (its scheduler is going away)."""
    with _clients_lock:
        client = _clients.pop(address, None)
    if client is not None:
        client.close()


def _identity(value: Any) -> Any:
    return value


def share(client: Any, value: Any, name: str = "segflow-shared") -> Any:
    """A future of a small value every block needs (a plan), held as a task's result.

    Unlike ``client.scatter``, the value can be recomputed: a worker lost to walltime,
    preemption or ``scancel`` takes its copy with it, and the scheduler makes it again on
    another worker, where scattered data would be gone for good.
    """
    return client.submit(_identity, value, key=f"{name}-{uuid.uuid4().hex[:8]}", pure=False)


__all__ = [
    "ClusterSpec",
    "client_for",
    "cluster_spec",
    "dask_client",
    "gpu_cluster",
    "gpu_worker_env",
    "job_cluster_kwargs",
    "job_ids",
    "release_client",
    "share",
    "start_job_cluster",
    "visible_gpus",
]
