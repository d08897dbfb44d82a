"""What the command shows on a terminal while it works: one status line.

Only when stderr is a terminal; redrawn four times a second, and at once
when the phase changes.  The texts are pure functions of the figures, so
tests call them directly.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .units import duration, size

if TYPE_CHECKING:
    from .vmm.precopy import Status
    from .vmm.transfers import Progress


class StatusLine:
    """Shows ``render(now)`` on stderr while the block runs, if stderr is a terminal.

    Args:
        render: the line's text at ``time.monotonic()`` ``now``.
        phase: what changes warrant an immediate redraw.
    """

    def __init__(self, render: Callable[[float], str], phase: Callable[[], object] = lambda: None) -> None:
        self._render = render
        self._phase = phase
        self._task: asyncio.Task[None] | None = None
        self._shown = False

    async def __aenter__(self) -> None:
        if sys.stderr.isatty():
            self._task = asyncio.ensure_future(self._show())

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            if self._shown:
                self._write("\r\x1b[K")

    async def _show(self) -> None:
        phase, drawn = object(), 0.0
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if self._phase() != phase or now - drawn >= 0.25:
                phase, drawn = self._phase(), now
                self._write(f"\r{self._render(now)}\x1b[K")
                self._shown = True

    @staticmethod
    def _write(text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except OSError:
            pass


def progress_line(progress: Progress, file: str, now: float) -> str:
    """The progress line's text: phase, done/total, percentage, rate, ETA."""
    phase = progress.phase
    what = {
        "verifying": f"verifying {file}",
        "saving": f"saving {progress.backends} back-end(s)",
        "loading": f"loading {progress.backends} back-end(s)",
        "syncing": f"syncing {file} to disk",
        "committing": f"committing {progress.backends} back-end(s)",
    }.get(phase, phase)
    if phase not in ("verifying", "saving", "loading"):
        return f"{what}..."
    done = sum(progress.done.values())
    total = sum(progress.expected.values())
    elapsed = now - progress.started
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{size(done)} of {size(total)} ({100 * done / total if total else 100:.0f}%)" if progress.expected else size(done)]
    parts.append(f"{size(rate)}/s")
    if progress.expected and rate > 0 and done < total:
        parts.append(f"ETA {duration((total - done) / rate)}")
    return f"{what}: {', '.join(parts)}"


def live_line(status: Status | None, progress: Progress, file: str, now: float) -> str:
    """A live save's line: phase, round, pending bytes, rate, expected downtime."""
    if status is None or progress.phase == "syncing":
        return progress_line(progress, file, now)
    parts = [f"live save of {len(status.backends)} back-end(s), {status.phase}"]
    if status.sending_initial:
        parts.append(f"initial data: {size(sum(b.received for b in status.backends))} sent")
    else:
        parts.append(f"round {status.rounds}/{status.max_rounds}")
    if status.pending_bytes is not None:
        parts.append(f"{size(status.pending_bytes)} pending")
    if status.rate is not None:
        parts.append(f"{size(status.rate)}/s")
    if status.expected_downtime is not None:
        limit = f" (limit {status.downtime_limit * 1000:.0f} ms)"
        expected = "unbounded" if status.expected_downtime == float("inf") else f"{status.expected_downtime * 1000:.0f} ms"
        parts.append(f"expected downtime {expected}{limit}")
    return ", ".join(parts)
