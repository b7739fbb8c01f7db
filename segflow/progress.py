"""Progress displays of the CLI: blockwise steps (ingest, segment, stitch) and training.

Both follow one rule: figures are measured from the start of the work they describe, and
say only what this run did. On a terminal a rich bar (blocks or steps done, rate, time
left); elsewhere (logs, CI, a pipe) one plain line every :data:`PLAIN_EVERY_S` seconds
while a step runs (also while a long block keeps the count still) and one when it ends.
``-q`` shows nothing. Re-runs say what they reused: blocks already done under the run's
key count as reused, never in the rate.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from segflow.output import is_quiet
from tasks.blockwise import Progress

#: Seconds between plain-text progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 5.0
#: Environment variable that sets those seconds (e.g. 60 for a quieter log).
EVERY_ENV = "SEGFLOW_PROGRESS_EVERY"


def plain_every_s() -> float:
    """:data:`PLAIN_EVERY_S`, or what :data:`EVERY_ENV` says."""
    try:
        return max(float(os.environ.get(EVERY_ENV, PLAIN_EVERY_S)), 0.1)
    except ValueError:
        return PLAIN_EVERY_S


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}:{secs:02d} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d} h"


def blocks_text(n: int) -> str:
    return "1 block" if n == 1 else f"{n} blocks"


def _bars(label: str) -> Any:
    """A rich progress display on stderr: label, bar, n/N, a note, elapsed time."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bars

    return Bars(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Ticker:
    """A daemon thread that calls ``tick`` about once a second until stopped."""

    def __init__(self, tick: Any, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(tick,), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self, tick: Any) -> None:
        while not self._stop.wait(self.every_s):
            tick()


@dataclass
class _Step:
    """What the display knows of one blockwise step."""

    total: int  # blocks to compute
    skipped: int  # blocks reused
    done: int = 0
    voxels: int = 0
    started: float = 0.0  # monotonic, when the first block was submitted
    printed: float = 0.0  # monotonic, the last plain line
    finished: bool = False

    def rate(self, now: float) -> float | None:
        """Voxels per second since the first block was submitted (None before any)."""
        elapsed = now - self.started
        return self.voxels / elapsed if self.voxels and elapsed > 0 else None

    def eta(self, now: float) -> float | None:
        if not self.done or self.done >= self.total:
            return None
        return (now - self.started) / self.done * (self.total - self.done)


class BlockProgress:
    """Context manager; pass the instance itself as the runner's ``progress`` callback.

    ``quiet`` (default: the command's ``-q``) shows nothing; ``plain`` (default: stderr is
    not a terminal) prints lines instead of a bar.
    """

    def __init__(self, quiet: bool | None = None, plain: bool | None = None) -> None:
        self.quiet = is_quiet() if quiet is None else quiet
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.every_s = plain_every_s()
        self._bars: Any = None
        self._ids: dict[str, Any] = {}
        self._steps: dict[str, _Step] = {}
        self._lock = threading.Lock()
        self._ticker: _Ticker | None = None

    def __enter__(self) -> BlockProgress:
        if self.quiet:
            return self
        if self.plain:
            self._ticker = _Ticker(self._tick, min(self.every_s / 2, 1.0))
            self._ticker.start()
            return self
        self._bars = _bars("[bold]{task.description}[/bold]")
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        with self._lock:
            step = self._update(event)
            now = time.monotonic()
            if self._bars is not None:
                self._draw(event.step, step, now)
            elif step.finished or now - step.printed >= self.every_s:
                self._print(event.step, step, now)

    def _update(self, event: Progress) -> _Step:
        step = self._steps.get(event.step)
        if step is None or event.done == 0:  # a step's (re)start
            step = _Step(event.total, event.skipped, started=event.started)
            step.printed = event.started  # the first plain line comes after PLAIN_EVERY_S
            self._steps[event.step] = step
        step.total, step.skipped, step.done = event.total, event.skipped, event.done
        if isinstance(event.result, dict) and "voxels" in event.result:
            step.voxels += int(event.result["voxels"])
        step.finished = event.done >= event.total
        return step

    def line(self, name: str, step: _Step, now: float) -> str:
        """The plain-text line of a step (also what the bar's note is made of)."""
        if step.total == 0:
            if not step.skipped:
                return f"{name}: no blocks"
            reused = "all " + blocks_text(step.skipped) if step.skipped > 1 else "its one block"
            return f"{name}: {reused} reused from an earlier run"
        reused = f" ({step.skipped} reused)" if step.skipped else ""
        text = f"{name}: {step.done}/{blocks_text(step.total)}{reused}"
        return text + self._figures(step, now)

    def _figures(self, step: _Step, now: float) -> str:
        parts = [_duration(now - step.started)]
        rate = step.rate(now)
        if rate is not None:
            parts.append(f"{rate / 1e6:.2f} Mvox/s")
        eta = step.eta(now)
        if eta is not None:
            parts.append(f"about {_duration(eta)} left")
        return ", " + ", ".join(parts)

    def _print(self, name: str, step: _Step, now: float) -> None:
        step.printed = now
        _say(self.line(name, step, now))

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            for name, step in self._steps.items():
                if not step.finished and now - step.printed >= self.every_s:
                    self._print(name, step, now)

    def _draw(self, name: str, step: _Step, now: float) -> None:
        total = max(step.total + step.skipped, 1)
        if step.total == 0:
            note = f"all {step.skipped} reused" if step.skipped else "no blocks"
        else:
            note = ", ".join(
                [f"{step.skipped} reused"] * bool(step.skipped)
                + [f"{r / 1e6:.2f} Mvox/s" for r in [step.rate(now)] if r is not None]
                + [f"about {_duration(e)} left" for e in [step.eta(now)] if e is not None]
            )
        if name not in self._ids:
            self._ids[name] = self._bars.add_task(name, total=total, note=note)
        self._bars.update(
            self._ids[name], completed=step.done + step.skipped, total=total, note=note
        )


class TrainProgress:
    """Training progress: a line per epoch (epoch i/n, loss, validation Dice, elapsed,
    time left) and, between epochs, a bar on a terminal or a plain line every
    :data:`PLAIN_EVERY_S` seconds elsewhere. Pass :meth:`update` as the training loop's
    ``progress`` callback. ``quiet`` (default: the command's ``-q``) shows nothing."""

    def __init__(
        self,
        steps: int,
        epoch_steps: int,
        quiet: bool | None = None,
        plain: bool | None = None,
        prefix: str = "",
    ) -> None:
        self.steps = steps
        self.epoch_steps = max(epoch_steps, 1)
        self.epochs = math.ceil(steps / self.epoch_steps)
        self.quiet = is_quiet() if quiet is None else quiet
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self.every_s = plain_every_s()
        self.prefix = prefix
        self._started = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, step) of the first update
        self._last: Any = None
        self._printed = 0.0
        self._bar: Any = None
        self._task: Any = None
        self._lock = threading.Lock()
        self._ticker: _Ticker | None = None

    def __enter__(self) -> TrainProgress:
        self._started = time.monotonic()
        if self.quiet:
            return self
        if self.plain:
            self._printed = self._started
            self._ticker = _Ticker(self._tick, min(self.every_s / 2, 1.0))
            self._ticker.start()
            return self
        self._bar = _bars(f"{self.prefix}training")
        self._task = self._bar.add_task("train", total=self.steps, note="preparing the data")
        self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.stop()
        if self._bar is not None:
            self._bar.stop()

    def eta(self, now: float) -> float | None:
        """Seconds left at the rate of this run's steps so far (validation included)."""
        if self._first is None or self._last is None:
            return None
        t0, s0 = self._first
        done = self._last.step - s0
        if done <= 0 or now <= t0:
            return None
        return (self.steps - self._last.step) * (now - t0) / done

    def update(self, p: Any) -> None:
        """The loop's callback: a :class:`unet_core.training.loop.TrainProgress`."""
        if self.quiet:
            return
        with self._lock:
            now = time.monotonic()
            if self._first is None:
                self._first = (now, p.step - 1)
            self._last = p
            if p.event == "epoch" or p.step >= self.steps:
                self._emit(self.epoch_line(p, now))
            elif self._bar is None and now - self._printed >= self.every_s:
                self._emit(self.step_line(p, now))
            if self._bar is not None:
                self._bar.update(self._task, completed=p.step, note=self._note(p, now))

    def epoch_line(self, p: Any, now: float) -> str:
        epoch = min(math.ceil(p.step / self.epoch_steps), self.epochs)
        dice = "-" if p.metric is None else f"{p.metric:.3f}"
        eta = self.eta(now)
        left = f", about {_duration(eta)} left" if eta and eta >= 1 else ""
        return (
            f"{self.prefix}epoch {epoch}/{self.epochs}: step {p.step}/{self.steps}, "
            f"loss {p.loss:.4f}, val dice {dice}, {_duration(now - self._started)}{left}"
        )

    def step_line(self, p: Any, now: float) -> str:
        eta = self.eta(now)
        left = f", about {_duration(eta)} left" if eta and eta >= 1 else ""
        return (
            f"{self.prefix}training: step {p.step}/{self.steps}, loss {p.loss:.4f}, "
            f"{p.steps_per_s:.2f} steps/s, {_duration(now - self._started)}{left}"
        )

    def _note(self, p: Any, now: float) -> str:
        dice = "-" if p.metric is None else f"{p.metric:.3f}"
        eta = self.eta(now)
        left = f", about {_duration(eta)} left" if eta and eta >= 1 else ""
        return f"loss {p.loss:.4f}, val dice {dice}, {p.steps_per_s:.2f} steps/s{left}"

    def _emit(self, line: str) -> None:
        self._printed = time.monotonic()
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            _say(line)

    def _tick(self) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._printed < self.every_s:
                return
            if self._last is None:
                self._emit(
                    f"{self.prefix}training: preparing the data and the first steps, "
                    f"{_duration(now - self._started)}"
                )
            elif self._last.step < self.steps:
                self._emit(self.step_line(self._last, now))
