"""Log lines a peer can make us write, at a bounded rate.

A hostile or broken peer can make the programs log one line per connection it opens (a
refused flood, a failed handshake) or per call; a log line costs far more than refusing the
peer, and a full disk is its own outage. ``RateLimitedLog`` lets ``LOG_BURST`` lines of a
kind through per ``LOG_INTERVAL`` seconds, then counts the rest and says how many it held
back with the next line that gets through (klog has no such helper; the text stays klog's
usual one-line form).

Invariants: no timer and no task: the clock is read when a line is offered, so a quiet
kind costs nothing; what is held back is never lost from the count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["LOG_BURST", "LOG_INTERVAL", "RateLimitedLog"]

#: Lines of one kind written per interval before the rest are only counted: enough to see
#: what happens, few enough that a flood of connections cannot flood the log.
LOG_BURST = 5
#: Seconds of that interval.
LOG_INTERVAL = 10.0


class RateLimitedLog:
    """``LOG_BURST`` lines per ``LOG_INTERVAL`` s at ``level`` on ``logger``; the next line
    after a suppressed stretch ends with "(N similar lines suppressed in the last Ts)"."""

    def __init__(
        self,
        logger: logging.Logger,
        level: int = logging.INFO,
        *,
        burst: int = LOG_BURST,
        interval: float = LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._level = level
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = -interval
        self._written = 0
        self._suppressed = 0
        self._suppressed_since = 0.0

    def __call__(self, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless over the rate; True if it was written."""
        if not self._logger.isEnabledFor(self._level):
            return False
        now = self._clock()
        if now - self._window_start >= self._interval:
            self._window_start = now
            self._written = 0
        if self._written >= self._burst:
            if not self._suppressed:
                self._suppressed_since = now
            self._suppressed += 1
            return False
        self._written += 1
        if self._suppressed:
            held, since = self._suppressed, now - self._suppressed_since
            self._suppressed = 0
            msg = f"{msg} ({held} similar lines suppressed in the last {since:.0f}s)"
        self._logger.log(self._level, msg, *args, stacklevel=2)
        return True
