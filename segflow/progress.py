"""One progress display for every blockwise step the CLI runs (ingest, segment, stitch).

It takes the runner's :class:`tasks.blockwise.Progress` events: on a terminal a rich bar
per step (blocks done of those to compute, rate from the first submitted block, time
left); elsewhere (logs, CI) one plain line per step every few seconds and at its end.
Re-runs say what they reused: blocks already done under the run's key are shown as
skipped, not counted in the rate.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tasks.blockwise import Progress

#: Seconds between plain-text progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 5.0


class BlockProgress:
    """Context manager; pass the instance itself as the runner's ``progress`` callback."""

    def __init__(self, quiet: bool = False, plain: bool | None = None) -> None:
        self.quiet = quiet
        self.plain = (not sys.stderr.isatty()) if plain is None else plain
        self._bars: Any = None
        self._ids: dict[str, Any] = {}
        self._voxels: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def __enter__(self) -> BlockProgress:
        if not self.quiet and not self.plain:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bars

            self._bars = Bars(
                TextColumn("[bold]{task.description}[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, event: Progress) -> None:
        if self.quiet:
            return
        name = event.step
        if isinstance(event.result, dict) and "voxels" in event.result:
            self._voxels[name] = self._voxels.get(name, 0) + int(event.result["voxels"])
        note = self._note(event)
        if self._bars is not None:
            if name not in self._ids:
                self._ids[name] = self._bars.add_task(name, total=max(event.total, 1), note=note)
            self._bars.update(
                self._ids[name],
                completed=event.done if event.total else 1,
                total=max(event.total, 1),
                note=note,
            )
            return
        now = time.monotonic()
        first = name not in self._last
        last = event.done >= event.total
        if first or last or now - self._last[name] >= PLAIN_EVERY_S:
            self._last[name] = now
            eta = event.eta
            tail = f", about {eta:.0f} s left" if eta is not None else ""
            print(
                f"{name}: {event.done}/{event.total} blocks{note and ', ' + note}{tail}",
                file=sys.stderr,
                flush=True,
            )

    def _note(self, event: Progress) -> str:
        parts = []
        if event.skipped:
            parts.append(f"{event.skipped} reused")
        voxels = self._voxels.get(event.step, 0)
        if voxels and event.done and event.elapsed > 0:
            parts.append(f"{voxels / event.elapsed / 1e6:.2f} Mvox/s")
        return ", ".join(parts)
