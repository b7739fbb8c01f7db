"""Scaling: blocks per second with 1 and 2 Dask worker processes, and Prefect's overhead.

    python -m bench.scaling [--shape 64,512,512] [--chunks 4,256,256] [--workers 1,2]
    python -m bench.scaling --slurm --shape 16,512,512 --chunks 2,256,256 --tile 1,348,348

One uint16 volume in an OME-Zarr store and a small 2D U-Net (depth 2, 4 base channels,
valid padding: the engine benchmark's). For each worker count k, a
``distributed.LocalCluster(n_workers=k, threads_per_worker=1, processes=True)`` with one
torch thread per worker segments the whole volume through ``tasks.segment.segment_image``
(``client=``). Every worker loads the model before the clock starts. Reported: blocks per
second, voxels per second, the speed-up from 1 to 2 workers, and the summed per-block
compute (forward passes) against the wall time, so a reader can extrapolate to a cluster
(blocks are independent: throughput should grow with workers until storage saturates).

Prefect: in a separate process, the same volume is segmented (tiny network, in-process
cluster, warm) once by ``segment_image`` (Dask only) and once by the ``segment-volume`` flow
(``flows.segment.segment_volume``: one Prefect task per region, stitch off). The overhead
per region is (the flow's region-phase wall time - the Dask-only wall time) / regions.

SLURM (``--slurm``, on its own): the same volume and model with Dask workers as SLURM batch
jobs (dask-jobqueue, one core and one worker process per job), on the site's SLURM when
``sinfo`` answers, else on the tests' single-node SLURM on 127.0.0.1
(``tests/cluster/local_slurm.py``). Reported: the time from submitting the first worker job
to the first finished block (``segment_image(cluster=ClusterSpec(kind="slurm"))`` from a
cold start: sbatch, job start, worker start, model load, one block), and blocks per second
with 1 and 2 worker jobs already running and warm (their ratio).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

from bench.common import OUT, emit, load_average, machine, run_child
from unet_core.runtime import configure

WORK = OUT / "scaling"


def _warm(plan) -> int:
    """On a worker: one torch thread, the model loaded (not timed)."""
    import torch

    from tasks.segment import get_predictor

    torch.set_num_threads(1)
    get_predictor(plan)
    return torch.get_num_threads()


def run_workers(k: int, src: str, ckpt: str, out: str, params) -> dict:
    from distributed import Client, LocalCluster

    from tasks.segment import plan_segmentation, segment_image

    plan = plan_segmentation(src, ckpt, out, params)
    blocks: list[dict] = []
    with (
        LocalCluster(
            n_workers=k, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        threads = client.run(_warm, plan)
        t0 = time.perf_counter()
        res = segment_image(
            src,
            ckpt,
            out,
            params,
            client=client,
            force=True,
            plan=plan,
            progress=lambda r, _n: blocks.append(r),
        )
        wall = time.perf_counter() - t0
    compute = sum(b["compute_s"] for b in blocks)
    return {
        "workers": k,
        "torch_threads_per_worker": sorted(set(threads.values())),
        "blocks": res.blocks_computed,
        "wall_s": round(wall, 2),
        "blocks_per_s": round(res.blocks_computed / wall, 3),
        "voxels_per_s": round(res.voxels / wall, 1),
        "summed_compute_s": round(compute, 2),
        "summed_read_s": round(sum(b["read_s"] for b in blocks), 2),
        "summed_write_s": round(sum(b["write_s"] for b in blocks), 2),
        "compute_share_of_worker_time": round(compute / (wall * k), 3),
    }


def prefect_overhead(src: str, workdir: str) -> dict:
    """In a child process: the same blocks through ``segment_image`` (Dask only) and through
    the ``segment-volume`` flow (one Prefect task per region); the difference per region."""
    import importlib.util
    import os

    if importlib.util.find_spec("flows.segment") is None:
        return {
            "prefect_overhead_per_region_s": None,
            "reason": "TODO: flows/segment.py (segment_volume flow) does not exist yet",
        }
    from bench.common import ROOT

    os.environ.setdefault("PREFECT_HOME", str(ROOT / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    import torch

    from flows.segment import SegmentVolumeParams, segment_volume
    from tasks.segment import SegmentParams, segment_image
    from unet_core import UNet, UNetConfig, save_checkpoint

    torch.manual_seed(0)
    config = UNetConfig(ndim=2, depth=1, base_channels=2)
    ckpt = f"{workdir}/tiny.ckpt"
    save_checkpoint(ckpt, UNet(config))
    params = SegmentParams(device="cpu")
    segment_image(src, ckpt, f"{workdir}/warm.zarr", params)  # model loaded, caches warm
    t0 = time.perf_counter()
    direct = segment_image(src, ckpt, f"{workdir}/direct.zarr", params, force=True)
    direct_s = time.perf_counter() - t0
    flow_params = SegmentVolumeParams(
        source=src, model=ckpt, output=f"{workdir}/flow.zarr", device="cpu", instances=False
    )
    t0 = time.perf_counter()
    summary = segment_volume(**flow_params.flow_parameters())
    flow_total = time.perf_counter() - t0
    regions = int(summary["regions"])
    seg_phase = float(summary["timings"]["segment"])
    return {
        "prefect_overhead_per_region_s": round((seg_phase - direct.seconds) / regions, 4),
        "prefect": {
            "model": config.model_dump(include={"ndim", "depth", "base_channels"}),
            "regions": regions,
            "blocks_per_region": summary["blocks_per_region"],
            "flow_wall_s": round(flow_total, 2),
            "flow_region_phase_s": round(seg_phase, 2),
            "summed_region_task_s": round(float(summary["region_seconds"]), 2),
            "summed_block_s": round(float(summary["block_seconds"]), 2),
            "dask_only_s": round(direct.seconds, 2),
            "dask_only_wall_s": round(direct_s, 2),
            "definition": (
                "(wall time of the flow's region phase - wall time of segment_image over "
                "the same blocks on the same kind of in-process cluster) / regions; "
                "flow_wall_s also includes the ephemeral Prefect server start, planning "
                "and the report"
            ),
        },
    }


def region_overhead(n: int, workdir: str) -> dict:
    """In a child process against a real ``prefect server`` (``PREFECT_API_URL`` set): a
    volume of ``n`` blocks (n x 64 x 64, chunks 1 x 64 x 64, a tiny 2D net), segmented once
    by ``segment_image`` (Dask only) and once by the flow with one block per region."""
    import torch

    from bench.common import write_image_store
    from flows.segment import SegmentVolumeParams, segment_volume
    from tasks.segment import SegmentParams, segment_image
    from unet_core import UNet, UNetConfig, save_checkpoint

    src = f"{workdir}/regions-{n}.ome.zarr"
    write_image_store(src, (n, 64, 64), (1, 64, 64))
    torch.manual_seed(0)
    ckpt = f"{workdir}/tiny-{n}.ckpt"
    save_checkpoint(ckpt, UNet(UNetConfig(ndim=2, depth=1, base_channels=2)))
    params = SegmentParams(device="cpu", tile=(1, 64, 64))
    segment_image(src, ckpt, f"{workdir}/warm-{n}.zarr", params)
    direct = segment_image(src, ckpt, f"{workdir}/direct-{n}.zarr", params, force=True)
    flow_params = SegmentVolumeParams(
        source=src,
        model=ckpt,
        output=f"{workdir}/flow-{n}.zarr",
        device="cpu",
        tile=(1, 64, 64),
        instances=False,
        max_regions=n,
        region_retries=0,
    )
    t0 = time.perf_counter()
    summary = segment_volume(**flow_params.flow_parameters())
    wall = time.perf_counter() - t0
    seg_phase = float(summary["timings"]["segment"])
    return {
        "regions": int(summary["regions"]),
        "blocks": int(summary["blocks"]),
        "flow_wall_s": round(wall, 2),
        "flow_region_phase_s": round(seg_phase, 2),
        "dask_only_s": round(direct.seconds, 2),
        "overhead_per_region_s": round((seg_phase - direct.seconds) / summary["regions"], 4),
    }


def regions_scaling(counts: list[int]) -> dict:
    """Orchestration cost per region and memory at several region counts, each in a fresh
    child process, against one real ``prefect server`` on 127.0.0.1."""
    import os
    import socket
    import subprocess

    from bench.common import ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    api = f"http://127.0.0.1:{port}/api"
    home = WORK / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }
    log = open(WORK / "prefect-server.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import httpx

        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("prefect server did not start")
            time.sleep(1)
        rows = []
        for n in counts:
            row = run_child("bench.scaling", ["--child-regions", str(n), str(WORK)])
            rows.append(row)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    worst = max((r["overhead_per_region_s"] for r in rows), default=None)
    rss = [r.get("child_peak_rss_mib") for r in rows]
    return {
        "regions_scaling": rows,
        "overhead_per_region_s_max": worst,
        "peak_rss_mib_by_regions": dict(zip(counts, rss, strict=True)),
        "regions_definition": (
            "(wall time of the flow's region phase - segment_image over the same blocks) / "
            "regions, one block per region, against a real prefect server on 127.0.0.1; "
            "peak RSS of the child process running the flow (one fresh process per count)"
        ),
    }


def _slurm_throughput(k: int, src: str, ckpt: str, out: str, params) -> dict:
    """Blocks per second with ``k`` SLURM worker jobs, started and warmed before the clock."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from tasks.cluster import ClusterSpec, job_cluster_kwargs, job_ids
    from tasks.segment import plan_segmentation, segment_image

    plan = plan_segmentation(src, ckpt, out, params)
    spec = ClusterSpec(kind="slurm", workers=k, worker_memory="2GB")
    with (
        SLURMCluster(n_workers=k, **job_cluster_kwargs(spec)) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(k, timeout=300)
        client.run(_warm, plan)
        t0 = time.perf_counter()
        res = segment_image(src, ckpt, out, params, client=client, force=True, plan=plan)
        wall = time.perf_counter() - t0
        jobs = job_ids(cluster)
    return {
        "worker_jobs": k,
        "job_ids": jobs,
        "blocks": res.blocks_computed,
        "wall_s": round(wall, 2),
        "blocks_per_s": round(res.blocks_computed / wall, 3),
        "voxels_per_s": round(res.voxels / wall, 1),
    }


def slurm_scaling(src: str, ckpt: str, params, workdir: str) -> dict:
    """Submit-to-first-block time and 1 / 2 worker-job throughput on SLURM (see the module
    docstring); starts the tests' single-node SLURM when no site SLURM answers."""
    import contextlib
    import os
    import subprocess

    import dask

    from tasks.cluster import ClusterSpec
    from tasks.segment import plan_segmentation, segment_image

    sinfo = shutil.which("sinfo")
    site = sinfo is not None and subprocess.run([sinfo], capture_output=True).returncode == 0
    with contextlib.ExitStack() as stack:
        if site:
            where = "site SLURM (sinfo answered)"
        else:
            from tests.cluster.local_slurm import LocalSlurm

            slurm = stack.enter_context(LocalSlurm.start())
            os.environ["SLURM_CONF"] = str(slurm.conf)
            stack.enter_context(
                dask.config.set(
                    {
                        "jobqueue.slurm.scheduler-options": {"host": "127.0.0.1"},
                        "jobqueue.slurm.log-directory": str(slurm.worker_logs),
                    }
                )
            )
            where = "single-node SLURM on 127.0.0.1 (tests/cluster/local_slurm.py)"
        plan = plan_segmentation(src, ckpt, f"{workdir}/slurm-cold.zarr", params)
        first: list[float] = []

        def on_block(_res: dict, _todo: int) -> None:
            if not first:
                first.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        cold = segment_image(
            src,
            ckpt,
            plan=plan,
            force=True,
            cluster=ClusterSpec(kind="slurm", workers=2, worker_memory="2GB"),
            progress=on_block,
        )
        cold_wall = time.perf_counter() - t0
        runs = [
            _slurm_throughput(k, src, ckpt, f"{workdir}/slurm-{k}.zarr", params) for k in (1, 2)
        ]
    return {
        "slurm": where,
        "submit_to_first_block_s": round(first[0], 2),
        "cold_run": {
            "blocks": cold.blocks_computed,
            "wall_s": round(cold_wall, 2),
            "definition": "segment_image with ClusterSpec(kind='slurm', workers=2): sbatch, "
            "adaptive scale-up, model load in each worker and all blocks",
        },
        "runs": runs,
        "speedup_2_over_1_worker_jobs": round(runs[1]["blocks_per_s"] / runs[0]["blocks_per_s"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="64,512,512")
    parser.add_argument("--chunks", default="4,256,256")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--tile", default=None, help="largest tile, e.g. 1,348,348")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--regions", default="", help="Region counts for the orchestration cost, e.g. 20,200,2000"
    )
    parser.add_argument("--slurm", action="store_true", help="only the SLURM part (see above)")
    parser.add_argument("--child-flow", nargs=2, metavar=("SRC", "WORK"), help=argparse.SUPPRESS)
    parser.add_argument("--child-regions", nargs=2, metavar=("N", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    configure()  # segflow's CPU settings, as its entry points apply them
    if args.child_flow:
        print(json.dumps(prefect_overhead(*args.child_flow)))
        return
    if args.child_regions:
        print(json.dumps(region_overhead(int(args.child_regions[0]), args.child_regions[1])))
        return
    if args.regions:
        WORK.mkdir(parents=True, exist_ok=True)
        counts = [int(c) for c in args.regions.split(",")]
        emit({"benchmark": "scaling-regions", **regions_scaling(counts), "machine": machine()})
        return

    import torch

    from bench.common import write_image_store
    from tasks.segment import SegmentParams
    from unet_core import UNet, UNetConfig, save_checkpoint

    shape = tuple(int(s) for s in args.shape.split(","))
    chunks = tuple(int(s) for s in args.chunks.split(","))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    src = str(WORK / "volume.ome.zarr")
    write_image_store(src, shape, chunks)
    config = UNetConfig(ndim=2, depth=2, base_channels=4)
    torch.manual_seed(0)
    ckpt = str(WORK / "model.ckpt")
    save_checkpoint(ckpt, UNet(config))
    tile = tuple(int(s) for s in args.tile.split(",")) if args.tile else None
    params = SegmentParams(device="cpu", tile=tile)
    if args.slurm:
        result = slurm_scaling(src, ckpt, params, str(WORK))
        _finish(args.keep, "scaling-slurm", shape, chunks, tile=list(tile or []), **result)
        return
    runs = [
        run_workers(int(k), src, ckpt, str(WORK / f"out-{k}.zarr"), params)
        for k in args.workers.split(",")
    ]
    by_k = {r["workers"]: r for r in runs}
    speedup = None
    if 1 in by_k and 2 in by_k:
        speedup = round(by_k[2]["blocks_per_s"] / by_k[1]["blocks_per_s"], 3)
    try:
        prefect = run_child("bench.scaling", ["--child-flow", src, str(WORK)])
        for key in ("child_peak_rss_mib", "child_wall_s"):
            prefect.setdefault("prefect", {})[key] = prefect.pop(key)
    except RuntimeError as exc:
        prefect = {"prefect_overhead_per_region_s": None, "reason": str(exc)[-500:]}
    _finish(
        args.keep,
        "scaling",
        shape,
        chunks,
        model=config.model_dump(include={"ndim", "depth", "base_channels", "padding"}),
        runs=runs,
        speedup_2_over_1_workers=speedup,
        **prefect,
        notes=(
            "wall time from the first block submitted to the last written (cluster "
            "start and model loading excluded); compute = forward passes only; on a "
            "2-core machine shared with other work the ideal 2-worker speed-up is 2"
        ),
    )


def _finish(keep: bool, name: str, shape, chunks, **figures) -> None:
    """Remove the work folder (unless kept) and print the result with the machine."""
    if not keep:
        shutil.rmtree(WORK, ignore_errors=True)
    emit(
        {
            "benchmark": name,
            "volume_shape": list(shape),
            "chunks": list(chunks),
            **figures,
            "machine": machine(),
            "load_average_after": load_average(),
        }
    )


if __name__ == "__main__":
    main(sys.argv[1:])
