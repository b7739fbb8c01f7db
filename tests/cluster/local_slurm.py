"""A real single-node SLURM on 127.0.0.1, for the tests and the scaling benchmark.

Debian's ``slurm-wlm`` and ``munge`` (installed with apt-get when missing and allowed):
munged, slurmctld and slurmd run as this machine's daemons would, but every file they use
(key, socket, slurm.conf, state, spool, pid files, logs, the job-completion record that
``sacct -c`` reads) lives in one temporary folder, and they are stopped by the pids in
their pid files. Two partitions: ``debug`` (default, up) and ``down`` (jobs stay pending).

    with LocalSlurm.start() as slurm:
        subprocess.run(["sinfo"], env=slurm.env)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sacct", "sinfo")
PACKAGES = ("slurm-wlm", "munge")


class SlurmUnavailableError(RuntimeError):
    """SLURM cannot be installed or started here (the message says why)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{name}", os.X_OK)),
        None,
    )


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get when a binary is missing (root only)."""
    missing = [b for b in BINARIES if _which(b) is None]
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailableError(
            f"{', '.join(missing)} missing and apt-get cannot install {' '.join(PACKAGES)} here "
            "(needs root on Debian/Ubuntu)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update"],
        ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
    ):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            tail = " ".join((res.stderr or res.stdout).split())[-300:]
            raise SlurmUnavailableError(f"{' '.join(cmd)} failed: {tail}")
    missing = [b for b in BINARIES if _which(b) is None]
    if missing:
        raise SlurmUnavailableError(f"{', '.join(missing)} still missing after installing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalSlurm:
    """A running single-node SLURM; ``env`` points its client commands (and dask-jobqueue's
    sbatch/scancel) at it, and makes Dask workers reach a scheduler on 127.0.0.1."""

    root: Path
    pids: dict[str, Path] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def logs(self) -> Path:
        return self.root / "log"

    @property
    def worker_logs(self) -> Path:
        return self.root / "worker-logs"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "DASK_JOBQUEUE__SLURM__SCHEDULER_OPTIONS": '{"host": "127.0.0.1"}',
            "DASK_JOBQUEUE__SLURM__LOG_DIRECTORY": str(self.worker_logs),
        }

    def run(self, *cmd: str) -> str:
        """A SLURM client command against this cluster; its stdout."""
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {res.stderr.strip()}")
        return res.stdout

    def jobs(self) -> list[dict[str, str]]:
        """Every job SLURM recorded as finished (``sacct -c``: the job-completion log)."""
        out = self.run("sacct", "-c", "-n", "-P", "-o", "jobid,jobname,state")
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        return [{"id": r[0], "name": r[1], "state": r[2]} for r in rows]

    def queue(self) -> list[dict[str, str]]:
        """Jobs in the queue now (``squeue``): id, name, state."""
        out = self.run("squeue", "-h", "-o", "%i|%j|%T")
        rows = [line.split("|") for line in out.splitlines() if line.strip()]
        return [{"id": r[0], "name": r[1], "state": r[2]} for r in rows]

    def cancel_all(self, timeout: float = 60.0) -> None:
        """Cancel every job of this cluster (all are the tests' own) and wait for them."""
        ids = [j["id"] for j in self.queue()]
        if ids:
            self.run("scancel", *ids)
        deadline = time.monotonic() + timeout
        while self.queue() and time.monotonic() < deadline:
            time.sleep(0.5)

    # -- life cycle

    @classmethod
    @contextmanager
    def start(cls, timeout: float = 60.0) -> Iterator[LocalSlurm]:
        ensure_installed()
        root = Path(tempfile.mkdtemp(prefix="segflow-slurm-"))
        root.chmod(0o755)  # munged wants every folder above its socket traversable
        slurm = cls(root)
        try:
            slurm._start_munge()
            slurm._start_slurm(timeout)
            yield slurm
        finally:
            slurm.stop()

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o755)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cmd = [
            _which("munged") or "munged",
            f"--key-file={key}",
            f"--socket={d / 'munge.socket'}",
            f"--pid-file={d / 'munged.pid'}",
            f"--log-file={d / 'munged.log'}",
            f"--seed-file={d / 'munged.seed'}",
        ]
        if os.geteuid() == 0:  # munged refuses root: run it as its own user
            shutil.chown(d, "munge", "munge")
            shutil.chown(key, "munge", "munge")
            cmd = ["runuser", "-u", "munge", "--", *cmd]
        self.pids["munged"] = d / "munged.pid"
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise SlurmUnavailableError(f"munged did not start: {res.stderr.strip()}")

    def _start_slurm(self, timeout: float) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailableError("slurmd needs root to start jobs")
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool", "log", "worker-logs"):
            (self.root / sub).mkdir()
        r = self.root
        cpus = max(os.cpu_count() or 1, 2)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=segflowtest",
                    f"SlurmctldHost={host}(127.0.0.1)",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"SlurmctldPort={_free_port()}",
                    f"SlurmdPort={_free_port()}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/filetxt",
                    f"JobCompLoc={r / 'log' / 'jobcomp.log'}",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core_Memory",
                    "SchedulerParameters=sched_min_interval=100000",
                    "ReturnToService=2",
                    "MpiDefault=none",
                    "SlurmdParameters=config_overrides",
                    f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=8000 State=UNKNOWN",
                    f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
                    f"PartitionName=down Nodes={host} MaxTime=INFINITE State=DOWN",
                    "",
                ]
            )
        )
        for daemon in ("slurmctld", "slurmd"):
            self.pids[daemon] = r / f"{daemon}.pid"
            res = subprocess.run(
                [_which(daemon) or daemon, "-f", str(self.conf)],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if res.returncode != 0:
                raise SlurmUnavailableError(f"{daemon} did not start: {res.stderr.strip()}")
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            try:
                state = self.run("sinfo", "-h", "-p", "debug", "-o", "%T").strip()
            except RuntimeError as exc:
                state = str(exc)
            if state == "idle":
                return
            time.sleep(0.5)
        raise SlurmUnavailableError(
            f"the SLURM node did not become idle within {timeout:g} s (last: {state!r}); "
            f"see {self.logs}"
        )

    def stop(self) -> None:
        """Cancel the jobs, stop slurmd, slurmctld and munged by their pids, remove files."""
        if "slurmd" in self.pids:
            with suppress(RuntimeError, OSError, subprocess.SubprocessError):
                self.cancel_all()
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid_file = self.pids.get(daemon)
            if pid_file is not None:
                _stop_pid(pid_file)
        self.pids.clear()
        shutil.rmtree(self.root, ignore_errors=True)


def _stop_pid(pid_file: Path, timeout: float = 15.0) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
