"""Process-wide glibc allocator settings for the two long-running programs, and the
return of idle memory (``IdleTrimmer``).

Both programs move data in pieces of up to a few hundred KiB (a socket read, a DATA
payload, a TLS record batch), each allocated and freed within a loop turn. With glibc's
defaults the top of the heap is given back to the kernel (``brk``) as soon as more than
about twice the largest recent piece is free there, and taken back on the next read: every
cycle costs page faults and the kernel zero-filling fresh pages. ``bench/`` measured 10-28 %
less CPU per GiB moved with fixed thresholds like the ones below (bench/README.md).

Invariants: applied once, before the event loop starts; skipped when the C library has no
``mallopt`` (musl) or when the operator already tunes malloc through ``GLIBC_TUNABLES``.
The idle trimmer never trims a busy process (see below). The calls go through the
compiled core (``csrc/process.pxi``), not ``ctypes``, which would stay loaded in both
programs for two calls.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections.abc import Callable

from konnectivity_fast._compiled import require_compiled
from konnectivity_fast.verbosity import V

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Free memory kept at the top of the heap before it is returned to the kernel: a few dozen
# 256 KiB buffers in flight at once, so steady transfers stop trimming and regrowing the
# heap. At most this much idle memory stays mapped after a burst (the buffer budgets allow
# far more while data is in flight).
TRIM_THRESHOLD = 32 << 20
# Allocations above this size get their own mmap. Above the 4 MiB gRPC message limit and
# the engine's output batches, so no per-message mmap/munmap; fixing it also stops glibc
# from lowering the trim threshold again when such a block is freed.
MMAP_THRESHOLD = 8 << 20


def tune_malloc() -> bool:
    """Apply the thresholds; True if they were applied."""
    if "malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    # A missing or stale build fails here, before the import below could load it
    # unchecked; the name comes from the stub, so mypy checks its use (_compiled.py).
    require_compiled()
    from konnectivity_fast._wire import mallopt

    results = (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    )
    if -1 in results:
        return False  # no mallopt in this C library
    ok = all(r == 1 for r in results)
    if not ok:
        log.warning("mallopt refused the allocator thresholds; using glibc's defaults")
    return ok


# -- giving memory back when idle ------------------------------------------------------------
#
# The thresholds above keep freed memory mapped while data flows, and glibc never returns a
# free page in the middle of its heap by itself: after a burst that filled the buffer
# budgets (docs/data-path.md), the process kept its peak RSS for ever (190 MiB after 20
# stalled 8 MiB downloads, 30 MiB before). ``IdleTrimmer`` asks glibc to give it all back
# (``malloc_trim(0)``, which also releases free pages inside the heap) once the process is
# idle and has grown since it last did, after a full collection of cyclic garbage.
#
# A process that is never idle needs it too when connections come and go: agents joining
# and leaving in rounds (a balancer or server restart, the duplicate-server reconnects
# behind every balancer) free each TLS connection's 256 KiB read buffer (uvloop's, on the
# heap under these thresholds), and the next round's land elsewhere in the heap and touch
# other pages: a server under churn grew by 10-20 MiB a round with nothing leaked. So a
# busy process is trimmed too once ``TRIM_AFTER_CLOSED`` connections closed since the last
# trim (and it grew), without the collection (a full one on a busy server is a pause): at
# most one trim per look, never for a steady transfer, whose connections stay.

#: Seconds between two looks at the process: memory comes back within two of them of the
#: end of a burst, and a server under agent churn is trimmed soon after each round left
#: (at 10 s, the looks fell as often while a round was connected, when there was little
#: to give back: 20 rounds of 2,000 agents still grew 1.3x). A look reads two counters.
TRIM_CHECK_INTERVAL = 2.0
#: A process that used less than this share of one core since the last look is idle.
#: Keepalives, probes and scrapes use well under 1 %; a tunnel moving data uses more.
TRIM_IDLE_CPU = 0.05
#: Growth of the resident set since the last trim (or the start) worth a trim: below it the
#: heap is at its working size and trimming would only make the next burst fault it in.
TRIM_MIN_GROWTH = 8 << 20
#: Connections closed since the last trim that make a busy process worth trimming: their
#: TLS read buffers alone are 64 MiB of heap.
TRIM_AFTER_CLOSED = 256


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl). Asking
    trims once, at start-up, which costs nothing."""
    require_compiled()  # as in tune_malloc
    from konnectivity_fast._wire import malloc_trim

    if malloc_trim(0) == -1:
        return None
    return lambda: malloc_trim(0)


class IdleTrimmer:
    """Looks at the process every ``TRIM_CHECK_INTERVAL`` s (``check``) and trims the heap
    when it grew by ``TRIM_MIN_GROWTH`` since the last trim and is idle, or saw
    ``TRIM_AFTER_CLOSED`` connections close (``closed``: a running count). The readers are
    arguments so the decision can be watched; by default they read this process."""

    def __init__(
        self,
        trim: Callable[[], int],
        rss: Callable[[], int] = _rss_bytes,
        cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
        collect: Callable[[], int] = gc.collect,
        *,
        closed: Callable[[], int] = lambda: 0,
    ) -> None:
        self._trim = trim
        self._collect = collect
        self._closed = closed
        self._last_closed = closed()
        self._rss = rss
        self._cpu = cpu
        self._clock = clock
        self.baseline = rss()
        self._last_cpu = cpu()
        self._last_time = clock()

    def check(self) -> bool:
        """One look; True if the heap was trimmed."""
        now, cpu = self._clock(), self._cpu()
        elapsed = now - self._last_time
        busy = (cpu - self._last_cpu) / elapsed if elapsed > 0 else 1.0
        self._last_time, self._last_cpu = now, cpu
        rss = self._rss()
        self.baseline = min(self.baseline, rss)
        idle = busy < TRIM_IDLE_CPU
        churned = self._closed() - self._last_closed >= TRIM_AFTER_CLOSED
        if rss - self.baseline < TRIM_MIN_GROWTH or not (idle or churned):
            return False
        self._last_closed = self._closed()
        if idle:
            # Garbage in reference cycles first (a flood's connections: protocols, calls,
            # exceptions with their tracebacks): an idle process allocates nothing, so the
            # collector's oldest generation would keep it, and the memory under it, for ever.
            self._collect()
        self._trim()
        after = self._rss()
        # An idle trim gave back all it could: growth is counted from here. A busy one ran
        # with connections still alive, so the lower of the two stays the reference: when
        # those go, the idle look gives their memory back too (a reset flood trimmed while
        # it lasted kept 41 MiB of 30 for good when this was ``after``).
        self.baseline = after if idle else min(self.baseline, after)
        log.log(
            V(2),
            "%s: gave %d MiB back to the system (RSS %d -> %d MiB)",
            "idle" if idle else "busy",
            (rss - after) >> 20,
            rss >> 20,
            after >> 20,
        )
        return True

    def look(self) -> bool:
        """``check``, where a process out of descriptors cannot read /proc: that look is
        skipped (the trimmer must outlive the exhaustion it may follow)."""
        try:
            return self.check()
        except OSError as exc:
            log.log(V(4), "memory trimmer: look skipped: %s", exc)
            return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TRIM_CHECK_INTERVAL)
            self.look()


def idle_trimmer(closed: Callable[[], int] = lambda: 0) -> IdleTrimmer | None:
    """A trimmer for this process, or None without glibc; ``closed``: the running count of
    connections closed."""
    trim = _malloc_trim()
    return None if trim is None else IdleTrimmer(trim, closed=closed)
