"""Run state kept in the output store: ownership, leases, image identity, completeness.

What a store holds so that runs can trust it (see DESIGN.md, "Run state")::

    store/zarr.json            segflow.created_by = "segflow": segflow made this store and
                               may write into it or delete it (``--overwrite``); it never
                               writes into a non-empty folder or store without this mark
    store/segflow-lease.json   the lease: holder, host, pid, what, heartbeat, expiry. One run
                               writes a store's outputs at a time; a second run waits or
                               refuses naming the holder; a lease whose holder died (or
                               whose heartbeat is older than its ttl) is taken over
    labels/<name>/zarr.json    segflow.key (the run key of the labels) and segflow.complete,
                               true only once every block is written; every reader refuses
                               incomplete labels (:func:`require_complete`)
    zarr.json (image)          segflow.image_digest: the image's identity, part of every
                               run key (combined per-unit checksums written at ingest; for
                               images segflow did not ingest, a digest of chunk names,
                               sizes and modification times or ETags)

Reading what a run wrote, with missing chunks as errors, is :mod:`tasks.reads`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import zarr

from tasks.store import (
    attributes,
    filesystem,
    is_remote,
    join,
    open_group,
)
from unet_core.errors import (
    IncompleteError,
    InvalidVolumeError,
    LeaseHeldError,
    SegflowError,
    StorageAccessError,
    StoreConflictError,
)

log = logging.getLogger(__name__)

LEASE_FILE = "segflow-lease.json"
#: Seconds after its last heartbeat that a lease expires (SEGFLOW_LEASE_TTL_S overrides).
LEASE_TTL_S = 60.0
OWNER = "segflow"


# ---------------------------------------------------------------------------- ownership


def _children(url: str) -> list[str]:
    """What a store folder holds, less segflow's lease (a run's own, taken before writing)."""
    if is_remote(url):
        fs = filesystem(url)
        try:
            names = (
                [str(p) for p in fs.ls(url, refresh=True, detail=False)] if fs.exists(url) else []
            )
        except FileNotFoundError:
            return []
        names = [f"{url.split('://', 1)[0]}://{n}" if "://" not in n else n for n in names]
    elif os.path.isdir(url):
        names = [os.path.join(url, n) for n in os.listdir(url)]
    else:
        return [url] if os.path.exists(url) else []
    return [n for n in names if not n.rstrip("/").rsplit("/", 1)[-1].startswith(LEASE_FILE)]


def store_exists(url: str) -> bool:
    """Whether ``url`` holds anything (an empty folder, or one with only a lease, is
    nothing)."""
    return bool(_children(url))


def owned_by_segflow(url: str) -> bool:
    """Whether ``url`` is a zarr store that segflow made (its root attributes say so)."""
    try:
        seg = attributes(open_group(url, "r")).get("segflow")
    except SegflowError:
        return False
    except Exception:
        return False
    if not isinstance(seg, dict):
        return False
    # ``created_by`` since this version; stores of earlier versions carry ingest/role
    return seg.get("created_by") == OWNER or "ingest" in seg or "role" in seg


def refuse_foreign(url: str, hint: str = "choose a new or empty location") -> None:
    """Raise :class:`StoreConflictError` unless ``url`` is absent, empty or a store segflow
    made: segflow never writes into, or replaces, anything else."""
    if store_exists(url) and not owned_by_segflow(url):
        what = "a zarr store" if _is_zarr(url) else "other files"
        raise StoreConflictError(
            f"{url}: already holds {what} that segflow did not make; it is never replaced, "
            f"not even with --overwrite, and segflow writes only into stores it made ({hint})"
        )


def check_output(url: str, lease_wait_s: float = 0.0, hint: str | None = None) -> None:
    """Before any work: can a run write its outputs to ``url``? Reachable (S3), a folder
    that can be made or written (local), absent or made by segflow (:func:`refuse_foreign`),
    and not being written by another run (its lease; only when not waiting for it).
    Writes nothing."""
    url = str(url).rstrip("/")
    if is_remote(url):
        from tasks.store import check_access

        check_access(url)
    else:
        check_writable(url)
    refuse_foreign(url, *([hint] if hint else []))
    if lease_wait_s <= 0:
        lease = Lease(url)
        info = lease.read()
        if not lease.free(info, quiet=True):
            assert info is not None
            raise lease.held_error(info)


def check_writable(url: str) -> None:
    """A local folder or store that exists and can be written, or can be made."""
    path = os.path.abspath(url)
    if os.path.exists(path) and not os.path.isdir(path):
        raise StoreConflictError(f"{url}: is a file, not a store (choose another location)")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise StoreConflictError(f"{url}: {probe} is a file, so no store can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageAccessError(f"{url}: cannot write here (permission denied on {probe})")


def claim_store(url: str, role: str, **attrs: Any) -> zarr.Group:
    """Open ``url`` for writing outputs: create it (marked as segflow's) when absent or
    empty, reuse it when segflow made it, refuse anything else in one sentence."""
    refuse_foreign(url)
    if store_exists(url):
        return open_group(url, "r+")
    root = open_group(url, "a")  # "w" would delete the run's lease
    root.attrs.update({"segflow": {"created_by": OWNER, "role": role, **attrs}})
    return root


def delete_owned_store(url: str) -> None:
    """Delete a store segflow made (``--overwrite``); anything else is refused."""
    if not store_exists(url):
        return
    if not owned_by_segflow(url):
        raise StoreConflictError(
            f"{url}: is not a store made by segflow, so it is not deleted even with "
            "--overwrite; choose another destination"
        )
    # everything but the lease, which the deleting run holds
    fs = filesystem(url)
    for child in _children(url):
        fs.rm(child, recursive=True)


def _is_zarr(url: str) -> bool:
    if is_remote(url):
        return bool(filesystem(url).exists(join(url, "zarr.json")))
    return os.path.isfile(os.path.join(url, "zarr.json"))


def write_beside(path: str, write: Callable[[Any], None], binary: bool = False) -> str:
    """Write a file next to a store under a temporary name, then rename it into place.

    A crash or a full disk leaves the old file (or none), never a truncated one under the
    final name. On S3 one object PUT is atomic already."""
    mode = "wb" if binary else "w"
    if is_remote(path):
        fs = filesystem(path)
        with fs.open(path, mode) as f:
            write(f)
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    return path


# -------------------------------------------------------------------------------- lease


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    host: str
    pid: int
    what: str
    started: float
    heartbeat: float
    expires: float

    def describe(self) -> str:
        age = max(time.time() - self.heartbeat, 0.0)
        return (
            f"{self.what} run {self.holder[:8]} on {self.host} (pid {self.pid}), "
            f"last heartbeat {age:.0f} s ago"
        )


_PROCESS_HOLDER = uuid.uuid4().hex
_held: dict[str, tuple[Lease, int]] = {}
_held_lock = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """Exclusive right to write a store's outputs, kept alive by a heartbeat thread.

    Use as a context manager. Within one process leases are re-entrant (the segment
    flow's steps share the run's lease). ``wait_s``: how long to wait for another holder
    before refusing with :class:`LeaseHeldError`.
    """

    def __init__(
        self, store: str, what: str = "segflow", wait_s: float = 0.0, ttl_s: float | None = None
    ) -> None:
        self.store = str(store).rstrip("/")
        self.what = what
        self.wait_s = wait_s
        self.ttl_s = float(ttl_s or os.environ.get("SEGFLOW_LEASE_TTL_S") or LEASE_TTL_S)
        self.holder = _PROCESS_HOLDER
        self.path = join(self.store, LEASE_FILE)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        self._started = time.time()

    # -- file access

    def read(self) -> LeaseInfo | None:
        fs = filesystem(self.store)
        try:
            with fs.open(self.path, "r") as f:
                data = json.load(f)
            return LeaseInfo(**data)
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            return None  # a torn or foreign file: treat as no lease

    def _text(self) -> str:
        now = time.time()
        info = LeaseInfo(
            self.holder,
            socket.gethostname(),
            os.getpid(),
            self.what,
            self._started,
            now,
            now + self.ttl_s,
        )
        return json.dumps(asdict(info))

    def _write_aside(self) -> str:
        """A fresh lease file beside the lease's name in a local store; returns its path."""
        os.makedirs(self.store, exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "w") as f:
            f.write(self._text())
        return tmp

    def _write(self) -> None:
        if is_remote(self.store):
            filesystem(self.store).pipe(self.path, self._text().encode())
        else:
            os.replace(self._write_aside(), self.path)

    def _create(self) -> bool | None:
        """Create the lease file where none exists, atomically: a local store's file is
        written aside and hard-linked to its name, which fails if the name is taken.
        True: created; False: the name is taken (another run was first, or the file is
        torn); None: not possible here (a remote store, or no hard links): the caller
        writes and verifies instead."""
        if is_remote(self.store):
            return None
        tmp = self._write_aside()
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            return None
        finally:
            os.unlink(tmp)
        return True

    def free(self, info: LeaseInfo | None, quiet: bool = False) -> bool:
        """Whether this run may take the lease described by ``info`` (none, its own, an
        expired one or one of a dead process); ``quiet``: without logging a takeover."""
        if info is None or info.holder == self.holder:
            return True
        if info.expires < time.time():
            if not quiet:
                log.warning("%s: taking over an expired lease (%s)", self.store, info.describe())
            return True
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            if not quiet:
                log.warning(
                    "%s: taking over the lease of a dead run (%s)", self.store, info.describe()
                )
            return True
        return False

    def held_error(self, info: LeaseInfo) -> LeaseHeldError:
        return LeaseHeldError(
            f"{self.store}: another segflow run is writing these outputs "
            f"({info.describe()}); wait for it to finish or stop it (its lease "
            f"expires {self.ttl_s:.0f} s after its last heartbeat)"
        )

    # -- life cycle

    def acquire(self) -> Lease:
        with _held_lock:
            held = _held.get(self.store)
            if held is not None:
                _held[self.store] = (held[0], held[1] + 1)
                return held[0]
        deadline = time.monotonic() + self.wait_s
        while True:
            info = self.read()
            if self.free(info):
                created = self._create() if info is None else None
                if created:
                    break  # a new lease file, created atomically: no other writer
                if created is False and self.read() is not None:
                    continue  # another run created it first: read it as any other lease
                self._write()
                time.sleep(0.2)  # a concurrent taker writes too: the last writer wins
                check = self.read()
                if check is not None and check.holder == self.holder:
                    break
                info = check
            if time.monotonic() >= deadline:
                assert info is not None
                raise self.held_error(info)
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0.05)))
        self._thread = threading.Thread(
            target=self._beat, name=f"segflow-lease-{self.store[-20:]}", daemon=True
        )
        self._thread.start()
        with _held_lock:
            _held[self.store] = (self, 1)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                info = self.read()
                if info is not None and info.holder != self.holder:
                    self.lost = True
                    log.error("%s: lease lost to %s", self.store, info.describe())
                    return
                self._write()
            except Exception as exc:  # storage hiccup: try again at the next beat
                log.warning("%s: lease heartbeat failed: %s", self.store, exc)

    def release(self) -> None:
        with _held_lock:
            held = _held.get(self.store)
            if held is None:
                return
            lease, count = held
            if count > 1:
                _held[self.store] = (lease, count - 1)
                return
            del _held[self.store]
        lease._stop.set()
        if lease._thread is not None:
            lease._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            info = lease.read()
            if info is not None and info.holder == lease.holder:
                filesystem(lease.store).rm(lease.path)

    def check(self) -> None:
        """Raise if the lease was lost (another run took the outputs over)."""
        lease = _held.get(self.store, (self, 0))[0]
        if lease.lost:
            raise LeaseHeldError(
                f"{self.store}: another run took over these outputs while this one was writing"
            )

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------- image identity


def listing_digest(url: str, path: str = "0") -> str:
    """Identity of an array segflow did not ingest: its chunk names, sizes and mtimes/ETags."""
    fs = filesystem(url)
    base = join(url, path)
    try:
        entries = fs.find(base, detail=True)
    except FileNotFoundError:
        entries = {}
    h = hashlib.sha256()
    for name in sorted(entries):
        e = entries[name]
        rel = name[len(base.split("://", 1)[-1]) :] if is_remote(url) else name[len(base) :]
        stamp = e.get("ETag") or e.get("etag") or e.get("mtime") or e.get("LastModified") or ""
        h.update(f"{rel}\t{e.get('size')}\t{stamp}\n".encode())
    return "list-" + h.hexdigest()[:32]


def data_digest(data: np.ndarray) -> str:
    """Identity of an in-memory image (written by :func:`tasks.store.write_image`)."""
    h = hashlib.sha256()
    h.update(f"{data.shape}|{data.dtype.str}".encode())
    h.update(np.ascontiguousarray(data).data)
    return "data-" + h.hexdigest()[:32]


def image_digest(url: str, attrs: dict[str, Any] | None = None) -> str:
    """The identity of the image at ``url``: recorded at ingest, or from its listing."""
    attrs = attributes(open_group(url, "r")) if attrs is None else attrs
    recorded = attrs.get("segflow", {}).get("image_digest")
    return str(recorded) if recorded else listing_digest(url)


# ------------------------------------------------------------------------- completeness


def set_complete(store: str, path: str, complete: bool, **extra: Any) -> None:
    """Record in the group at ``path`` whether all of its blocks are written."""
    group = open_group(store, "r+")[path]
    meta = attributes(group).get("segflow", {})
    meta.update(extra)
    meta["complete"] = bool(complete)
    group.attrs.update({"segflow": meta})


def require_complete(store: str, path: str, what: str) -> dict[str, Any]:
    """The segflow attributes of the group at ``path``; refuse it unless complete."""
    try:
        group = open_group(store, "r")[path]
    except KeyError:
        raise InvalidVolumeError(f"{store}: there are no {what} at '{path}'") from None
    meta: dict[str, Any] = attributes(group).get("segflow", {})
    if not meta.get("complete"):
        raise IncompleteError(
            f"{store}: the {what} at '{path}' are incomplete (a run stopped before writing "
            "every block); run the step that makes them again to finish them"
        )
    return meta
