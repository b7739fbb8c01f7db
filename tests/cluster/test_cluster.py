"""tasks.cluster without a batch system: the spec, GPU pinning, the job script it asks for."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from segflow.errors import ExitCode, describe_error
from tasks.cluster import (
    ClusterSpec,
    cluster_spec,
    dask_client,
    gpu_worker_env,
    job_cluster_kwargs,
    visible_gpus,
)
from unet_core.errors import ConfigError


def test_gpu_pinning_gives_each_worker_its_own_device():
    assert gpu_worker_env(["0", "3", "GPU-5e1c"]) == {
        "gpu-0": {"CUDA_VISIBLE_DEVICES": "0"},
        "gpu-3": {"CUDA_VISIBLE_DEVICES": "3"},
        "gpu-GPU-5e1c": {"CUDA_VISIBLE_DEVICES": "GPU-5e1c"},
    }
    with pytest.raises(ConfigError, match="distinct"):
        gpu_worker_env(["1", "1"])


@pytest.mark.parametrize(
    ("value", "gpus"),
    [
        ("0,1,2,3", ["0", "1", "2", "3"]),
        ("2, 5", ["2", "5"]),
        ("", []),
        ("-1", []),
        ("0,-1,2", ["0"]),
        ("NoDevFiles", []),
    ],
)
def test_visible_gpus_follow_cuda_visible_devices(value, gpus):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == gpus


def test_local_cuda_run_starts_one_worker_process_per_visible_gpu(monkeypatch):
    """Two (pretend) GPUs: two worker processes, each seeing exactly one of them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    with dask_client(cluster=ClusterSpec(), device="cuda") as client:
        seen = client.run(lambda: os.environ["CUDA_VISIBLE_DEVICES"])
        info = client.scheduler_info()["workers"]
    assert sorted(seen.values()) == ["4", "6"]
    assert sorted(w["name"] for w in info.values()) == ["gpu-4", "gpu-6"]
    assert len({w["id"] for w in info.values()}) == 2  # separate processes


def test_local_cpu_run_keeps_one_in_process_worker(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with dask_client(device="cpu", threads=2) as client:
        info = list(client.scheduler_info()["workers"].values())
    assert len(info) == 1
    assert info[0]["nthreads"] == 2


def test_job_script_requests_what_the_spec_asks_and_keeps_site_settings(tmp_path):
    import dask
    from dask_jobqueue import SLURMCluster

    spec = ClusterSpec(
        kind="slurm",
        workers=8,
        worker_cores=6,
        worker_memory="32GB",
        gpus_per_worker=1,
        walltime="04:00:00",
        queue="gpu",
        account="imaging-lab",
    )
    site = {
        "jobqueue.slurm.job-extra-directives": ["--constraint=a100"],
        "jobqueue.slurm.job-script-prologue": ["module load cuda"],
        "jobqueue.slurm.log-directory": str(tmp_path / "logs"),
    }
    with dask.config.set(site):
        kw = job_cluster_kwargs(spec)
        kw["scheduler_options"] = {**kw["scheduler_options"], "host": "127.0.0.1"}
        with SLURMCluster(**kw) as cluster:
            script = cluster.job_script()
    for line in (
        "#SBATCH -J segflow-worker",
        "#SBATCH -p gpu",
        "#SBATCH -A imaging-lab",
        "#SBATCH -t 04:00:00",
        "#SBATCH --cpus-per-task=6",
        "#SBATCH --constraint=a100",
        "#SBATCH --gres=gpu:1",
        f"#SBATCH -e {tmp_path / 'logs'}/segflow-worker-%J.err",
        "module load cuda",
        "unset DASK_LOGGING__DISTRIBUTED",
        "--nthreads 6",
    ):
        assert line in script, (line, script)
    assert "#SBATCH --mem=30G" in script  # 32 GB as SLURM counts it


def test_spec_defaults_and_config_fallback():
    import dask

    kw = job_cluster_kwargs(ClusterSpec(kind="pbs", account="p1"))
    assert (kw["cores"], kw["memory"], kw["processes"], kw["account"]) == (1, "4GB", 1, "p1")
    with dask.config.set({"jobqueue.lsf.cores": 4, "jobqueue.lsf.memory": "20GB"}):
        kw = job_cluster_kwargs(ClusterSpec(kind="lsf", account="p2", gpus_per_worker=2))
    assert (kw["cores"], kw["memory"], kw["project"]) == (4, "20GB", "p2")
    assert kw["job_extra_directives"] == ['-gpu "num=2"']


def test_bad_cluster_values_are_one_sentence():
    assert cluster_spec(kind="tcp://10.0.0.5:8786").is_address
    assert cluster_spec(kind="sched-1.lab:8786").kind == "tcp://sched-1.lab:8786"
    assert cluster_spec(kind="slurm", workers=None).is_job_cluster
    # the engine names the field; the CLI shows it as its flag
    for fields, start in (
        ({"kind": "slurmm"}, "--cluster 'slurmm' is neither local, slurm"),
        ({"kind": "slurm", "worker_memory": "16 gigs"}, "--worker-memory '16 gigs'"),
        ({"kind": "slurm", "walltime": "forever"}, "--walltime 'forever'"),
    ):
        with pytest.raises(ConfigError) as info:
            cluster_spec(**fields)
        assert describe_error(info.value)[0].startswith(start), describe_error(info.value)
        assert "--" not in str(info.value)  # no flag in the engine's own words
    # one place says where Dask runs: a client, or a cluster (an address is one kind)
    with pytest.raises(TypeError):
        dask_client(address="tcp://10.0.0.5:8786")  # type: ignore[call-arg]


def test_cli_rejects_a_bad_cluster_with_one_line(tmp_path):
    from segflow.cli import _register, app

    _register()
    res = CliRunner().invoke(app, ["stitch", str(tmp_path / "x.zarr"), "--cluster", "slurmm"])
    assert res.exit_code == ExitCode.USAGE
    assert res.output.strip().splitlines() == [
        "segflow: error: --cluster 'slurmm' is neither local, slurm, pbs, sge, lsf nor a "
        "scheduler address like tcp://host:8786"
    ]


def test_flows_take_the_cluster_as_a_parameter_and_serve_sets_the_nightly_default():
    from deployments.serve import ServeSettings, _options
    from flows.nightly import NightlyParams
    from flows.segment import SegmentVolumeParams

    schema = SegmentVolumeParams.model_json_schema()
    kind = schema["$defs"]["ClusterSpec"]["properties"]["kind"]
    assert {"enum": ["local", "slurm", "pbs", "sge", "lsf"], "type": "string"} in kind["anyOf"]
    params = SegmentVolumeParams(source="v.tif", model="m.ckpt", cluster={"kind": "slurm"})
    assert params.cluster.is_job_cluster
    assert SegmentVolumeParams(source="v.tif", model="m.ckpt").cluster == ClusterSpec()

    settings = ServeSettings(cluster=ClusterSpec(kind="slurm", workers=8, queue="gpu"))
    nightly = NightlyParams(inbox="in", output="out", model="m.ckpt", **_options(settings))
    assert nightly.cluster == settings.cluster
    assert nightly.options()["cluster"] == settings.cluster.model_dump()
    assert _options(ServeSettings(cluster=ClusterSpec())) == {}


def test_clients_that_tasks_opened_to_a_run_cluster_close_with_it():
    """A region task's client (cached per scheduler address) is closed when the run's own
    cluster closes, instead of trying to reconnect to a scheduler that is gone."""
    from tasks.cluster import _clients, client_for, dask_client

    with dask_client(threads=1) as client:
        address = client.scheduler.address
        cached = client_for(address)
        assert cached.submit(sum, [1, 2]).result() == 3
        assert client_for(address) is cached
    assert address not in _clients
    assert cached.status == "closed"
