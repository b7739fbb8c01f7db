"""Fenced leases: one run writes a store's outputs at a time, and a run that lost its lease
stops writing.

The lease file ``<store>/segflow-lease.json`` holds::

    holder      the run's random id        generation  1, 2, 3, ... one more per taker
    beat        a counter the heartbeat     what, host, pid, started, heartbeat (wall
                thread raises every ttl/4   clock, for messages only), ttl_s, released

Rules (each a case where a run once wrote over another's finished labels):

- **Taking a lease.** Absent: created atomically (a local file is written aside and
  hard-linked to its name, which fails when the name is taken; on S3 written and read
  back). Released, ours, or held by a dead process on this host: taken at once. Held by
  anyone else: taken only once its content has been *seen unchanged for its ttl by this
  process's monotonic clock* — expiry is never judged by comparing two machines' wall
  clocks (a holder on a machine whose clock is minutes behind is not thereby expired). A
  file that cannot be parsed (torn, foreign) counts as held by someone unknown until it too
  has stayed unchanged for the ttl. Every taker writes ``generation + 1``.
- **Fencing.** :class:`Fence` (store, holder, generation) travels with the work to the
  workers (:class:`tasks.blockwise.Runner` attaches the fence of the lease its process
  holds); a block checks it before it writes and again before it marks itself done. A run
  whose lease was taken over (it was suspended past the ttl, its heartbeat could not be
  written) finds another holder there and raises :class:`LeaseLostError`: it writes
  nothing more, marks nothing and exits non-zero. A block whose write raced a takeover
  takes back its mark and the completeness of the outputs it touched (see
  :func:`tasks.blockwise.run_block`), so a mix is never marked complete.
- **Heartbeat.** Every ttl/4 the holder re-reads the file: still its holder and
  generation, it writes ``beat + 1``; anything else (another holder, released, absent,
  torn) means the lease is lost and the heartbeat stops — it never writes a lease back.
- **Release.** The holder marks the file released, only if it still holds its own
  generation; the file stays, so generations keep counting up.

What it cannot promise: a write that has passed its fence check when the run is suspended
and lands after a takeover is caught only by the check after it (which takes the marks
back); a filesystem without atomic rename or hard links (some network file systems) can
tear the lease file, which then counts as held until it has been unchanged for the ttl.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from tasks.store import filesystem, is_remote, join
from unet_core.errors import LeaseHeldError, LeaseLostError

log = logging.getLogger(__name__)

LEASE_FILE = "segflow-lease.json"
#: Seconds without a heartbeat after which a lease may be taken over (SEGFLOW_LEASE_TTL_S
#: overrides it for every lease a process creates).
LEASE_TTL_S = 60.0
TTL_ENV = "SEGFLOW_LEASE_TTL_S"


def default_ttl() -> float:
    return float(os.environ.get(TTL_ENV) or LEASE_TTL_S)


@dataclass(frozen=True)
class LeaseInfo:
    """What a lease file says."""

    holder: str
    generation: int
    beat: int
    what: str
    host: str
    pid: int
    started: float
    heartbeat: float  # the holder's wall clock: for messages, never for expiry
    ttl_s: float
    released: bool = False

    def describe(self) -> str:
        return (
            f"{self.what} run {self.holder[:8]} on {self.host} (pid {self.pid}, "
            f"lease generation {self.generation})"
        )

    @classmethod
    def parse(cls, raw: bytes | None) -> LeaseInfo | None:
        """The lease in ``raw``; None when it cannot be read as one (torn or foreign)."""
        if raw is None:
            return None
        try:
            data = json.loads(raw.decode())
            info = cls(
                holder=str(data["holder"]),
                generation=int(data["generation"]),
                beat=int(data["beat"]),
                what=str(data["what"]),
                host=str(data["host"]),
                pid=int(data["pid"]),
                started=float(data["started"]),
                heartbeat=float(data["heartbeat"]),
                ttl_s=float(data["ttl_s"]),
                released=bool(data.get("released", False)),
            )
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            return None
        return info if info.ttl_s > 0 and info.generation >= 1 else None

    def dump(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def read_raw(store: str) -> bytes | None:
    """The lease file's bytes, or None when there is none."""
    path = join(store, LEASE_FILE)
    try:
        if is_remote(store):
            # one GET: an open file re-reads ranges with the first ETag as a precondition,
            # which fails when the holder's heartbeat replaced the object in between
            return bytes(filesystem(store).cat_file(path))
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Fence:
    """The right to write a store, as a run's workers carry it: who holds which generation.

    :meth:`check` reads the lease file and raises :class:`LeaseLostError` unless it still
    names this holder and generation and is not released. Cheap (one small read). A read
    that fails (a connection reset, throttling) is tried again for up to half the ttl: only
    a lease that reads as someone else's, or that cannot be read for that long, stops the
    run (no other run can have taken it over sooner)."""

    store: str
    holder: str
    generation: int
    ttl_s: float = LEASE_TTL_S

    def _read(self) -> bytes | None:
        deadline = time.monotonic() + self.ttl_s / 2
        delay = 0.1
        while True:
            try:
                return read_raw(self.store)
            except Exception as exc:
                if time.monotonic() + delay > deadline:  # cannot tell: do not write on a guess
                    raise LeaseLostError(
                        f"{self.store}: the lease could not be read for {self.ttl_s / 2:.0f} "
                        f"s ({type(exc).__name__}: {exc}); this run stops writing"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def check(self) -> None:
        raw = self._read()
        info = LeaseInfo.parse(raw)
        if (
            info is None
            or info.released
            or (info.holder, info.generation)
            != (
                self.holder,
                self.generation,
            )
        ):
            now = "no lease" if raw is None else "an unreadable lease"
            if info is not None:
                now = "a released lease" if info.released else f"the lease of {info.describe()}"
            raise LeaseLostError(
                f"{self.store}: this run lost its lease (generation {self.generation}; the "
                f"store now holds {now}): another run took these outputs over while this one "
                "was stopped or could not renew it, so it writes nothing more"
            )


_PROCESS_HOLDER = uuid.uuid4().hex
_held: dict[str, tuple[Lease, int]] = {}
_held_lock = threading.Lock()


def held_fence(store: str) -> Fence | None:
    """The fence of the lease this process holds on ``store`` (None when it holds none)."""
    with _held_lock:
        held = _held.get(str(store).rstrip("/"))
    return held[0].fence if held is not None else None


class Lease:
    """The exclusive right to write a store's outputs (see the module docstring).

    A context manager; re-entrant within a process (a flow's steps share the run's lease).
    ``wait_s``: how long to wait for another holder before refusing with
    :class:`LeaseHeldError` (a lease that looks abandoned is watched for its ttl even when
    ``wait_s`` is shorter, to see whether its heartbeat still moves)."""

    def __init__(
        self, store: str, what: str = "segflow", wait_s: float = 0.0, ttl_s: float | None = None
    ) -> None:
        self.store = str(store).rstrip("/") or "/"
        self.what = what
        self.wait_s = max(float(wait_s), 0.0)
        self.ttl_s = float(ttl_s or default_ttl())
        self.holder = _PROCESS_HOLDER
        self.path = join(self.store, LEASE_FILE)
        self.generation = 0
        self._beat = 0
        self._started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- the file

    def read(self) -> LeaseInfo | None:
        """The lease as the file says (None: absent or unreadable)."""
        return LeaseInfo.parse(read_raw(self.store))

    def _info(self, generation: int, beat: int, released: bool = False) -> LeaseInfo:
        return LeaseInfo(
            holder=self.holder,
            generation=generation,
            beat=beat,
            what=self.what,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=self._started,
            heartbeat=time.time(),
            ttl_s=self.ttl_s,
            released=released,
        )

    def _write_aside(self, info: LeaseInfo) -> str:
        os.makedirs(self.store, exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(info.dump())
        return tmp

    def _put(self, info: LeaseInfo) -> None:
        """Replace the lease file with ``info`` (atomic: rename, or one S3 PUT)."""
        if is_remote(self.store):
            filesystem(self.store).pipe(self.path, info.dump())
        else:
            os.replace(self._write_aside(info), self.path)

    def _create(self, info: LeaseInfo) -> bool | None:
        """Create the lease file where none exists: True created, False the name is taken,
        None not possible atomically here (remote store, no hard links)."""
        if is_remote(self.store):
            return None
        tmp = self._write_aside(info)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError:
            return None
        finally:
            os.unlink(tmp)
        return True

    @property
    def fence(self) -> Fence:
        return Fence(self.store, self.holder, self.generation, self.ttl_s)

    # -- taking it

    def _free_now(self, info: LeaseInfo | None, raw: bytes | None) -> str | None:
        """Why the lease may be taken at once (None: it is held, watch it)."""
        if raw is None:
            return "absent"
        if info is None:
            return None
        if info.released:
            return "released"
        if info.holder == self.holder:
            return "ours"
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return "dead"
        return None

    def held_error(self, info: LeaseInfo | None, seen_s: float = 0.0) -> LeaseHeldError:
        who = (
            info.describe()
            if info is not None
            else "an unreadable lease file, perhaps written by another program"
        )
        ttl = info.ttl_s if info is not None else self.ttl_s
        waited = f", its heartbeat moved while this run watched it for {seen_s:.0f} s" * (
            seen_s > 0 and info is not None
        )
        return LeaseHeldError(
            f"{self.store}: another segflow run is writing these outputs ({who}{waited}); "
            f"wait for it to finish or stop it (a lease is taken over once its heartbeat "
            f"has not moved for {ttl:.0f} s: wait at least that long)"
        )

    def acquire(self) -> Lease:
        with _held_lock:
            held = _held.get(self.store)
            if held is not None:
                _held[self.store] = (held[0], held[1] + 1)
                return held[0]
        start = time.monotonic()
        deadline = start + self.wait_s
        seen: bytes | None = None
        seen_since = start
        while True:
            raw = read_raw(self.store)
            info = LeaseInfo.parse(raw)
            why = self._free_now(info, raw)
            now = time.monotonic()
            if why is None:
                if raw != seen:
                    seen, seen_since = raw, now
                ttl = info.ttl_s if info is not None else self.ttl_s
                if now - seen_since >= ttl:
                    why = "expired"
            if why is not None and self._take(info, why):
                break
            if why is None:
                # a lease that looks abandoned (no parse, or a heartbeat older than its ttl
                # by our clock) is watched for its ttl; the decision is the observation's
                abandoned = info is None or time.time() - info.heartbeat > info.ttl_s
                ttl = info.ttl_s if info is not None else self.ttl_s
                # (watched once for its ttl from the first look: a beat that moves meanwhile
                # is a live holder, however far its clock is from ours)
                until = max(deadline, start + ttl + 0.1) if abandoned else deadline
                if now >= until:
                    raise self.held_error(info, now - start)
                if abandoned and now >= deadline and now - start < 0.05:
                    log.warning(
                        "%s: the lease (%s) looks abandoned; watching its heartbeat for "
                        "%.0f s before taking it over",
                        self.store,
                        info.describe() if info is not None else "unreadable",
                        ttl,
                    )
                time.sleep(max(min(ttl / 8, 1.0, until - now), 0.02))
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"segflow-lease-{self.store[-20:]}", daemon=True
        )
        self._thread.start()
        with _held_lock:
            _held[self.store] = (self, 1)
        return self

    def _take(self, info: LeaseInfo | None, why: str) -> bool:
        """Write this run's lease over ``info`` (generation + 1); True once it holds it."""
        generation = (info.generation if info is not None else 0) + 1
        mine = self._info(generation, 0)
        if why == "absent":
            created = self._create(mine)
            if created is False:
                return False  # another run was first: look again
            if created:
                self.generation = generation
                return True
        elif why in ("expired", "dead"):
            assert info is not None or why == "expired"
            log.warning(
                "%s: taking over the lease of %s (%s)",
                self.store,
                info.describe() if info is not None else "an unreadable lease file",
                "its process is gone" if why == "dead" else "its heartbeat stopped",
            )
        self._put(mine)
        time.sleep(0.2)  # a concurrent taker writes too: the last writer wins, so look
        check = self.read()
        if check is not None and (check.holder, check.generation) == (self.holder, generation):
            self.generation = generation
            return True
        return False

    # -- holding it

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                read_at = time.monotonic()
                info = self.read()
                if (
                    info is None
                    or info.released
                    or (info.holder, info.generation) != (self.holder, self.generation)
                ):
                    self.lost = True
                    now = "no readable lease" if info is None else info.describe()
                    log.error("%s: lease lost (the store now holds %s)", self.store, now)
                    return
                if time.monotonic() - read_at > self.ttl_s / 4:
                    # this process stood still between the read and the write (suspended,
                    # a frozen VM): another run may have taken over meanwhile, so never
                    # write on that read; the next beat reads again
                    continue
                self._beat = info.beat + 1
                self._put(self._info(self.generation, self._beat))
            except Exception as exc:  # storage hiccup: try again at the next beat
                log.warning("%s: lease heartbeat failed: %s", self.store, exc)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this run still holds the lease (reads it)."""
        lease = _held.get(self.store, (self, 0))[0]
        lease.fence.check()

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
            if info is not None and (info.holder, info.generation) == (
                lease.holder,
                lease.generation,
            ):
                lease._put(lease._info(lease.generation, info.beat + 1, released=True))

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lease_status(store: str, lease_wait_s: float = 0.0) -> None:
    """Before any work: refuse at once when another live run holds ``store``'s lease and
    the caller will not wait for it (``lease_wait_s`` 0). Writes nothing; a lease that only
    looks abandoned is left to :meth:`Lease.acquire` to watch."""
    if lease_wait_s > 0:
        return
    probe = Lease(store)
    raw = read_raw(probe.store)
    info = LeaseInfo.parse(raw)
    if probe._free_now(info, raw) is not None or info is None:
        return
    if time.time() - info.heartbeat > info.ttl_s:
        return  # looks abandoned: acquire watches it
    raise probe.held_error(info)


__all__ = [
    "LEASE_FILE",
    "LEASE_TTL_S",
    "Fence",
    "Lease",
    "LeaseInfo",
    "held_fence",
    "lease_status",
    "read_raw",
]
