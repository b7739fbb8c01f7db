"""The one blockwise runner: every piece of block work in segflow goes through :class:`Runner`.

A *step* (ingest units, statistics, pyramid levels, segmentation, stitch passes, export)
declares its block grid, a pure per-block function and its run key; the runner does the
rest, the same way for all of them::

    Step(name, store, grid, key, process, plan, box)
      │
      ├─ skip      blocks whose marker in ``store/segflow-done/<name>`` equals this key's token
      ├─ fence     the lease the driver holds on ``store`` travels with every block: a block
      │              checks it before its work and before its marker, and a run whose
      │              lease was taken over stops (:class:`tasks.lease.Fence`)
      ├─ submit    process(plan, index) on Dask (a distributed Client, or local threads)
      │              · transient storage errors (connection reset, throttling, timeouts)
      │                are retried with backoff; permanent ones never are
      │              · the marker is written by the worker only after the block's writes are
      │                stored, so a crash leaves the block unmarked
      ├─ progress  one callback, :class:`Progress`, per finished block (CLI bar, Prefect)
      ├─ timeout   blocks unfinished after ``timeout_s`` are cancelled
      └─ errors    a failed block raises :class:`BlockError` naming the step, the block
                   index, its voxel box and the store; the other blocks finish first

Markers are one uint64 per block (one zarr chunk each, so blocks never share a chunk).
A block is done when its marker holds the *token* of the run key (a 63-bit number derived
from the key): a block written under another key (another model, image, parameters) is not
done, whatever the array's history. Regions (the Prefect batching unit) are runs of blocks
in C order; a region reads only its own markers.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from tasks.cluster import share
from tasks.lease import Fence, held_fence
from tasks.storage_errors import is_transient
from tasks.store import DONE_GROUP, open_group
from unet_core.errors import BlockError, LeaseLostError, SegflowError
from unet_core.geometry import Box

log = logging.getLogger(__name__)

Index = tuple[int, ...]

#: Suffix of the array of taint flags beside a step's markers (:meth:`Markers.taint`).
TAINT_SUFFIX = "-tainted"
#: Retries of a block's transient storage errors, and the first backoff delay (doubles).
DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 0.5
#: Test hook: seconds every block of a resumable step (and every export slab) sleeps before
#: its work, to interrupt a run on purpose at a chosen point (the kill harness).
DELAY_ENV = "SEGFLOW_TEST_BLOCK_DELAY"


def injected_delay() -> None:
    """Sleep for :data:`DELAY_ENV` seconds, if that test hook is set."""
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def key_token(key: str) -> int:
    """The 63-bit marker value of a run key (never 0, the value of an unmarked block)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return (int(digest[:16], 16) & ((1 << 63) - 1)) | 1


@dataclass(frozen=True)
class Step:
    """One kind of block work, as descriptors only (cheap to ship to workers).

    ``process(plan, index)`` does one block's reads and writes and returns a small,
    picklable result; it must be a module-level function. ``box(plan, index)`` gives the
    block's voxel box for messages. ``resumable=False`` steps (passes whose results are
    needed again, e.g. the stitch's per-chunk tables) keep no markers: all their blocks run.
    """

    name: str
    store: str
    grid: tuple[int, ...]
    key: str
    process: Callable[[Any, Index], Any]
    plan: Any
    box: Callable[[Any, Index], Box] | None = None
    resumable: bool = True
    #: groups of ``store`` whose completeness rests on this step's blocks: a block whose
    #: write raced the loss of the lease takes their ``complete`` mark back
    outputs: tuple[str, ...] = ()

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def token(self) -> int:
        return key_token(self.key)

    def indices(self) -> list[Index]:
        return [tuple(int(i) for i in idx) for idx in np.ndindex(*self.grid)]

    def describe(self, index: Index) -> str:
        where = ""
        if self.box is not None:
            try:
                b = self.box(self.plan, index)
                where = " voxels " + " ".join(
                    f"{a}:{e}" for a, e in zip(b.begin, b.end, strict=True)
                )
            except Exception:  # a message must never fail
                where = ""
        return f"{self.name} block {list(index)}{where} of {self.store}"


# ------------------------------------------------------------------------------ markers


class Markers:
    """The done markers of one step in its store (``segflow-done/<name>``)."""

    def __init__(self, array: zarr.Array, store: str, name: str) -> None:
        self.array = array
        self.store = store
        self.name = name

    @classmethod
    def require(cls, step: Step) -> Markers:
        """The step's marker array, created (all unmarked) if missing or of another grid."""
        root = open_group(step.store, "a")
        group = root.require_group(DONE_GROUP)
        existing = group.get(step.name)
        if isinstance(existing, zarr.Array) and tuple(existing.shape) == step.grid:
            if existing.attrs.get("key") != step.key:
                existing.attrs["key"] = step.key  # the key of the latest run (for readers)
            return cls(existing, step.store, step.name)
        arr = group.create_array(
            step.name,
            shape=step.grid,
            chunks=(1,) * len(step.grid),
            dtype="uint64",
            fill_value=0,
            overwrite=True,
            attributes={"key": step.key},
        )
        return cls(arr, step.store, step.name)

    @classmethod
    def open(cls, store: str, name: str, mode: str = "r") -> Markers | None:
        """The markers of a step as they are in the store (None if there are none)."""
        try:
            group = open_group(store, mode)
        except SegflowError:
            return None
        node = group.get(f"{DONE_GROUP}/{name}")
        return cls(node, str(store), name) if isinstance(node, zarr.Array) else None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def key(self) -> str:
        """The key of the latest run that prepared these markers."""
        return str(self.array.attrs.get("key", ""))

    def _tainted(self) -> zarr.Array | None:
        """The taint flags of this step (blocks a superseded run wrote into), if any."""
        try:
            node = open_group(self.store, "r").get(f"{DONE_GROUP}/{self.name}{TAINT_SUFFIX}")
        except SegflowError:
            return None
        return node if isinstance(node, zarr.Array) and tuple(node.shape) == self.grid else None

    def done_mask(self, key: str | None = None) -> np.ndarray:
        """Boolean per block: marked under ``key`` (default: the latest run's key) and not
        tainted by a superseded run's late write."""
        key = self.key if key is None else key
        if not key:
            return np.zeros(self.grid, dtype=bool)
        done = np.asarray(self.array[...]) == np.uint64(key_token(key))
        tainted = self._tainted()
        if tainted is not None:
            done &= np.asarray(tainted[...]) == 0
        return done

    def done_of(self, indices: Sequence[Index], key: str) -> np.ndarray:
        """Boolean per given block (reads only those blocks' chunks)."""
        if not indices:
            return np.zeros(0, dtype=bool)
        coords = tuple(np.asarray(c, dtype=np.int64) for c in zip(*indices, strict=True))
        values = np.asarray(self.array.get_coordinate_selection(coords))
        done = values == np.uint64(key_token(key))
        tainted = self._tainted()
        if tainted is not None:
            done &= np.asarray(tainted.get_coordinate_selection(coords)) == 0
        return done

    @staticmethod
    def taint(step: Step, index: Index) -> None:
        """Flag a block a superseded run wrote into: it is not done under any key until a
        run computes it again (whoever marks it meanwhile)."""
        group = open_group(step.store, "r+").require_group(DONE_GROUP)
        name = f"{step.name}{TAINT_SUFFIX}"
        arr = group.get(name)
        if not (isinstance(arr, zarr.Array) and tuple(arr.shape) == step.grid):
            arr = group.create_array(
                name, shape=step.grid, chunks=(1,) * len(step.grid), dtype="uint8",
                fill_value=0, overwrite=True,
            )  # fmt: skip
        arr[tuple(index)] = 1

    @staticmethod
    def untaint(step: Step, indices: Sequence[Index]) -> None:
        """Clear the taint of blocks about to be computed again (driver side)."""
        try:
            arr = open_group(step.store, "r+").get(f"{DONE_GROUP}/{step.name}{TAINT_SUFFIX}")
        except SegflowError:
            return
        if not (isinstance(arr, zarr.Array) and tuple(arr.shape) == step.grid):
            return
        coords = tuple(np.asarray(c, dtype=np.int64) for c in zip(*indices, strict=True))
        flags = np.asarray(arr.get_coordinate_selection(coords))
        if flags.any():
            arr.set_coordinate_selection(coords, np.zeros_like(flags))

    def count(self, key: str | None = None) -> int:
        return int(self.done_mask(key).sum())

    def all_done(self, key: str | None = None) -> bool:
        return bool(self.done_mask(key).all())

    def mark(self, index: Index, key: str) -> None:
        self.array[tuple(index)] = key_token(key)

    def clear(self, indices: Iterable[Index]) -> None:
        for index in indices:
            self.array[tuple(index)] = 0


def mark_done(store: str, name: str, index: Index, token: int) -> None:
    """Mark one block (worker side, after its writes are stored)."""
    path = f"{DONE_GROUP}/{name}"
    arr = open_group(store, "r+").get(path)
    if not isinstance(arr, zarr.Array):
        raise SegflowError(
            f"{store}: the done markers '{path}' were removed while the run was writing "
            "(another run replaced these outputs?)"
        )
    arr[tuple(index)] = token


# ----------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """What a progress callback receives after each finished block (and once at start)."""

    step: str
    done: int  # blocks finished in this run so far
    total: int  # blocks this run computes (skipped ones excluded)
    skipped: int  # blocks already done under the key, not recomputed
    started: float  # time.monotonic() when the first block was submitted
    result: Any = None  # the finished block's result (None at start)

    @property
    def elapsed(self) -> float:
        return max(time.monotonic() - self.started, 0.0)

    @property
    def eta(self) -> float | None:
        if not self.done or self.done >= self.total:
            return None
        return self.elapsed / self.done * (self.total - self.done)


ProgressFn = Callable[[Progress], None]


@dataclass
class StepResult:
    """What a run of a step did."""

    step: str
    total: int
    computed: int
    skipped: int
    seconds: float
    results: list[Any] = field(default_factory=list)  # results of computed blocks


# --------------------------------------------------------------------------------- stop


class BlocksStoppedError(SegflowError):
    """A run was asked to stop (a cancelled flow run): its blocks that had not started were
    not started; those already running finished and are marked."""

    def __init__(self, step: str, finished: int, not_started: int) -> None:
        super().__init__(
            f"{step}: stopped on request: {finished} block(s) finished, {not_started} not "
            "started (a later run computes them)"
        )
        self.finished, self.not_started = finished, not_started


_stop = threading.Event()
_active: dict[int, Callable[[], None]] = {}  # id -> cancel the blocks of a run not started
_active_lock = threading.Lock()


def stop_blocks() -> None:
    """Start no more blocks in this process: the blocks of running :meth:`Runner.run` calls
    that have not started are cancelled, running ones finish (and are marked); each such
    call then raises :class:`BlocksStoppedError`. Until :func:`allow_blocks`."""
    _stop.set()
    with _active_lock:
        cancels = list(_active.values())
    for cancel in cancels:
        with contextlib.suppress(Exception):  # a cluster already gone has nothing to cancel
            cancel()


def allow_blocks() -> None:
    """Undo :func:`stop_blocks` (a new run in this process)."""
    _stop.clear()


def blocks_stopped() -> bool:
    return _stop.is_set()


def _not_started_dask(client: Any, futures: list[Any]) -> list[Any]:
    """Futures of blocks no worker is running yet (queued on the scheduler)."""
    running = {key for keys in client.processing().values() for key in keys}
    return [f for f in futures if not f.done() and f.key not in running]


# ------------------------------------------------------------------------------- worker


_local = threading.local()


def current_fence() -> Fence | None:
    """The fence of the block this thread runs (None outside a fenced block): a step that
    writes late in its block checks it once more right before the write."""
    return getattr(_local, "fence", None)


def _take_back(step: Step, index: Index) -> None:
    """A block wrote after its run lost the lease: the block is tainted (not done under any
    key, whoever marks it, until it is computed again) and the completeness of the step's
    outputs is withdrawn, so whatever the write mixed into another run's outputs is never
    read as complete; the next run recomputes the block."""
    from tasks.runstate import set_complete

    with contextlib.suppress(Exception):
        Markers.taint(step, index)
    for path in step.outputs:
        with contextlib.suppress(Exception):
            set_complete(step.store, path, False)


def run_block(
    step: Step, index: Index, retries: int, backoff_s: float, fence: Fence | None = None
) -> Any:
    """Run one block with retries of transient errors, then mark it (worker side).

    With a ``fence``: checked before the work (a superseded run writes nothing more) and
    after it, before the marker; a block that finds the lease lost after its write takes
    its marker and its outputs' completeness back (:func:`_take_back`)."""
    if step.resumable:
        injected_delay()
    if fence is not None:
        fence.check()
    _local.fence = fence
    attempt = 0
    try:
        while True:
            try:
                result = step.process(step.plan, index)
                break
            except LeaseLostError:
                raise  # the block checked the fence before writing: it wrote nothing
            except Exception as exc:
                if is_transient(exc) and attempt < retries and not blocks_stopped():
                    delay = backoff_s * 2**attempt
                    attempt += 1
                    log.warning(
                        "%s: transient error (%s), retry %d/%d in %.1f s",
                        step.describe(index),
                        exc,
                        attempt,
                        retries,
                        delay,
                    )
                    time.sleep(delay)
                    continue
                raise BlockError.wrap(step.describe(index), exc) from exc
    finally:
        _local.fence = None
    if fence is not None:
        try:
            fence.check()
        except LeaseLostError:
            _take_back(step, index)
            raise
    if step.resumable:
        try:
            mark_done(step.store, step.name, index, step.token)
        except Exception as exc:
            raise BlockError.wrap(step.describe(index), exc) from exc
    return result


# ------------------------------------------------------------------------------- runner


class Runner:
    """Runs steps on a Dask ``client`` (distributed), or on local threads when it is None.

    ``threads``: size of the local pool (default: two per core — a block waits on reads
    and compression as much as it computes). ``progress`` receives a :class:`Progress`
    after every block of every step. ``timeout_s`` bounds one :meth:`run`.
    """

    def __init__(
        self,
        client: Any = None,
        *,
        threads: int | None = None,
        progress: ProgressFn | None = None,
        timeout_s: float | None = None,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        self.client = client
        self.threads = threads or 2 * (os.cpu_count() or 1)
        self.progress = progress
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    # -- what is left

    def pending(self, step: Step, indices: Sequence[Index] | None = None) -> list[Index]:
        """The given blocks (default: all) that are not done under the step's key."""
        wanted = step.indices() if indices is None else [tuple(map(int, i)) for i in indices]
        if not step.resumable or not wanted:
            return wanted
        markers = None
        if indices is not None:  # a region: its markers exist already, read only its own
            markers = Markers.open(step.store, step.name)
            if markers is not None and markers.grid != step.grid:
                markers = None
        markers = markers or Markers.require(step)
        if indices is None:
            done = markers.done_mask(step.key)
            return [i for i in wanted if not done[i]]
        flags = markers.done_of(wanted, step.key)
        return [i for i, d in zip(wanted, flags, strict=True) if not d]

    # -- running

    def run(self, step: Step, indices: Sequence[Index] | None = None) -> StepResult:
        """Run the pending blocks among ``indices`` (default: all) and wait for them.

        Raises the first :class:`BlockError` after all other blocks finished (their work
        is kept and marked), or a :class:`TimeoutError` after cancelling what is left.
        """
        t0 = time.perf_counter()
        fence = held_fence(step.store)
        if fence is not None:
            fence.check()  # a run that lost its lease writes nothing, markers included
        wanted = step.indices() if indices is None else [tuple(map(int, i)) for i in indices]
        todo = self.pending(step, indices)
        skipped = len(wanted) - len(todo)
        started = time.monotonic()
        if self.progress is not None:
            self.progress(Progress(step.name, 0, len(todo), skipped, started))
        results: list[Any] = []
        if todo:
            if step.resumable:
                Markers.untaint(step, todo)  # these blocks are computed again now
            if self.client is None:
                results = self._run_threads(step, todo, skipped, started, fence)
            else:
                results = self._run_dask(step, todo, skipped, started, fence)
        return StepResult(
            step.name, len(wanted), len(todo), skipped, time.perf_counter() - t0, results
        )

    def _report(self, step: Step, done: int, total: int, skipped: int, t: float, res: Any) -> None:
        if self.progress is not None:
            self.progress(Progress(step.name, done, total, skipped, t, res))

    def _finish(self, step: Step, errors: list[BaseException], finished: int, total: int) -> None:
        if not errors:
            return
        first = errors[0]
        if len(errors) > 1:
            log.info("%s: %d blocks failed; the first: %s", step.name, len(errors), first)
        if isinstance(first, BlockError):
            first.failed_blocks = len(errors)
        raise first

    def _timeout(self, step: Step, left: int) -> TimeoutError:
        return TimeoutError(
            f"{left} block(s) of step {step.name} in {step.store} did not finish within "
            f"{self.timeout_s} s; they were cancelled"
        )

    def _run_threads(
        self, step: Step, todo: list[Index], skipped: int, started: float, fence: Fence | None
    ) -> list[Any]:
        from concurrent.futures import as_completed

        pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"segflow-{step.name}")
        futures = [
            pool.submit(run_block, step, i, self.retries, self.backoff_s, fence) for i in todo
        ]
        try:
            results = self._collect(
                step,
                futures,
                as_completed(futures, timeout=self.timeout_s),
                lambda left: [f.cancel() for f in left],
                skipped,
                started,
                not_started=lambda: [f for f in futures if f.cancel()],
            )
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # running blocks finish on their own
            raise
        pool.shutdown(wait=True)
        return results

    def _run_dask(
        self, step: Step, todo: list[Index], skipped: int, started: float, fence: Fence | None
    ) -> list[Any]:
        from distributed import as_completed

        client = self.client
        # The step (plan included, no block list) travels once, held as a task result that
        # the scheduler can make again when a worker (a batch job) is lost; for a handful of
        # blocks (a small region) sending it with each is cheaper.
        shared = share(client, step, f"segflow-{step.name}-step") if len(todo) > 4 else step
        run = uuid.uuid4().hex[:8]
        futures = [
            client.submit(
                run_block,
                shared,
                index,
                self.retries,
                self.backoff_s,
                fence,
                key=f"segflow-{step.name}-{run}-{'-'.join(map(str, index))}",
                pure=False,
            )
            for index in todo
        ]
        completed = as_completed(futures, timeout=self.timeout_s)

        def not_started() -> list[Any]:
            left = _not_started_dask(client, futures)
            client.cancel(left)
            return left

        return self._collect(
            step, futures, completed, client.cancel, skipped, started, not_started=not_started
        )

    def _collect(
        self,
        step: Step,
        futures: list[Any],
        completed: Iterable[Any],
        cancel: Callable[[list[Any]], Any],
        skipped: int,
        started: float,
        not_started: Callable[[], list[Any]],
    ) -> list[Any]:
        """Results in completion order; a failed block does not stop the others (their work
        is kept and marked); the first failure is raised once all have finished.

        ``not_started()`` cancels and returns the blocks no one runs yet: on
        :func:`stop_blocks` those are dropped, the running ones finish, and
        :class:`BlocksStoppedError` says how many of each."""
        results: list[Any] = []
        errors: list[BaseException] = []
        dropped: set[int] = set()

        def stop() -> None:
            dropped.update(id(f) for f in not_started())

        with _active_lock:
            _active[id(futures)] = stop
        if blocks_stopped():
            stop()
        try:
            for fut in completed:
                try:
                    res = fut.result()
                except LeaseLostError:
                    raise  # the run was superseded: nothing more is submitted or waited for
                except Exception as exc:
                    if id(fut) not in dropped:
                        errors.append(exc)
                    continue
                results.append(res)
                self._report(step, len(results), len(futures), skipped, started, res)
        except TimeoutError:
            left = [f for f in futures if not f.done()]
            cancel(left)
            raise self._timeout(step, len(left)) from None
        except BaseException:
            cancel([f for f in futures if not f.done()])
            raise
        finally:
            with _active_lock:
                _active.pop(id(futures), None)
        if dropped and not errors:
            raise BlocksStoppedError(step.name, len(results), len(dropped))
        self._finish(step, errors, len(results), len(futures))
        return results


__all__ = [
    "BlockError",
    "BlocksStoppedError",
    "Markers",
    "Progress",
    "ProgressFn",
    "Runner",
    "Step",
    "StepResult",
    "allow_blocks",
    "blocks_stopped",
    "key_token",
    "run_block",
    "stop_blocks",
]
