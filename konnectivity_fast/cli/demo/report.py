"""How the demo writes to the terminal: sections, aligned rows, and progress for anything
that takes more than a moment.

On a terminal a step shows a live line (a spinner, its elapsed time and what it has done
so far) that is replaced by its result; elsewhere (a log, a CI job) the step prints one
line when it starts and its result when it ends, so the output reads the same top down.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TextIO

__all__ = ["Out", "mb_per_s", "ms", "percentile", "us"]

# Seconds between two redraws of a live line.
REDRAW_SECONDS = 0.1
_SPINNER = "|/-\\"
LABEL_WIDTH = 20
# A step that ends sooner than this prints only its result when not on a terminal.
QUIET_SECONDS = 1.0
# Not on a terminal: how often a long step says it is still running.
STILL_RUNNING_SECONDS = 10.0


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value below which ``fraction`` of ``values`` fall (nearest rank)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs"


def mb_per_s(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class Out:
    """The demo's output stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)

    def section(self, title: str) -> None:
        self.line()
        self.line(title)

    def row(self, label: str, text: str, *more: str) -> None:
        """``label`` then ``text``; ``more`` lines aligned under ``text``."""
        self.line(f"  {label:<{LABEL_WIDTH}} {text}")
        for extra in more:
            self.line(f"  {'':<{LABEL_WIDTH}} {extra}")

    @contextlib.asynccontextmanager
    async def step(
        self, label: str, status: Callable[[], str] = lambda: ""
    ) -> AsyncIterator[Callable[[str], None]]:
        """A step that may take a while: yields ``done(result)``, to call with the result
        line; ``status()`` says how far it is while it runs (shown on a terminal)."""
        result: list[str] = []
        started = time.monotonic()
        painter: asyncio.Task[None] | None = None
        if self.live:
            painter = asyncio.create_task(self._paint(label, status, started))
        else:
            painter = asyncio.create_task(self._log(label, status))
        try:
            yield result.append
        finally:
            if painter is not None:
                painter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await painter
                if self.live:
                    self.stream.write("\r\x1b[2K")
            elapsed = time.monotonic() - started
            outcome = result[-1] if result else f"interrupted after {elapsed:.1f} s"
            self.row(label, outcome)

    async def _log(self, label: str, status: Callable[[], str]) -> None:
        """Not on a terminal: a line once the step has run QUIET_SECONDS, then now and
        then, so a log shows what a long step is doing."""
        await asyncio.sleep(QUIET_SECONDS)
        while True:
            self.line(f"  {label} ... {status()}")
            await asyncio.sleep(STILL_RUNNING_SECONDS)

    async def _paint(self, label: str, status: Callable[[], str], started: float) -> None:
        turn = 0
        while True:
            elapsed = time.monotonic() - started
            now = status()
            spin = _SPINNER[turn % len(_SPINNER)]
            self.stream.write(f"\r\x1b[2K  {label:<{LABEL_WIDTH}} {spin} {elapsed:4.1f} s {now}")
            self.stream.flush()
            turn += 1
            await asyncio.sleep(REDRAW_SECONDS)
