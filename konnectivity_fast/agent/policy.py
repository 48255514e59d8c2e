"""Pure decisions of the agent's connection upkeep (upstream's pkg/agent/clientset.go
``resetBackoff`` and pkg/agent/server_counter.go): the sync loop's backoff with jitter, and
how many proxy-servers to hold connections to.

No sockets, no loop, no clock: random numbers come from an injected ``random.Random``.
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random

__all__ = [
    "BACKOFF_FACTOR",
    "JITTER_FACTOR",
    "STICKY_MIN_WINDOW",
    "STICKY_WINDOW_PER_SERVER",
    "Backoff",
    "ServerCounter",
    "StickyDetector",
    "jitter",
]

# apimachinery's wait.Backoff as upstream configures it: each failure multiplies the delay
# by 1.5, and every delay gets up to +10% of random jitter so agents restarted together do
# not reconnect in lockstep.
BACKOFF_FACTOR = 1.5
JITTER_FACTOR = 0.1
# Server counts are never below 1: before any header arrives the agent still tries once.
MIN_SERVER_COUNT = 1


def jitter(duration: float, factor: float, rng: Random) -> float:
    """``wait.Jitter``: uniform in ``[d, d + factor*d)``."""
    return duration + rng.random() * factor * duration


class Backoff:
    """``wait.Backoff{Duration: base, Factor: 1.5, Jitter: 0.1, Cap: cap}``.

    ``step()`` returns the current delay with jitter, then grows it by the factor; once the
    grown delay would pass the cap it stays at the cap. ``reset()`` starts over at ``base``.
    """

    def __init__(self, base: float, cap: float, rng: Random) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng
        self._current = base
        self._capped = False

    def reset(self) -> None:
        self._current = self.base
        self._capped = False

    def step(self) -> float:
        if self._capped:
            return jitter(self.cap, JITTER_FACTOR, self._rng)
        delay = self._current
        grown = delay * BACKOFF_FACTOR
        if self.cap > 0 and grown > self.cap:
            self._current = self.cap
            self._capped = True
        else:
            self._current = grown
        return jitter(delay, JITTER_FACTOR, self._rng)

    def idle(self) -> float:
        """The pause after a success, a duplicate or nothing to do: the base, jittered."""
        return jitter(self.base, JITTER_FACTOR, self._rng)


class ServerCounter:
    """How many servers the agent wants connections to (upstream's
    pkg/agent/server_counter.go: the response-based and aggregate counters).

    The response-based count is the ``servercount`` header of the most recently added new
    server (never lowered). ``lease_count`` is the seam for ``--count-server-leases``: a
    callable giving the number of valid server Leases (``konnectivity_fast.kube`` provides
    one); ``source`` is ``--server-count-source`` (``""``/``default``: leases only when
    counting them; ``max``: the larger of the two). Every result is at least 1.
    """

    def __init__(
        self, lease_count: Callable[[], int] | None = None, source: str = "default"
    ) -> None:
        self.last_received = 0
        self.lease_count = lease_count
        self.source = source

    def response_count(self) -> int:
        return self.last_received if self.last_received > 0 else MIN_SERVER_COUNT

    def count(self) -> int:
        if self.lease_count is None:
            return self.response_count()
        leases = self.lease_count()
        if self.source == "max":
            leases = max(leases, self.response_count())
        return leases if leases > 0 else MIN_SERVER_COUNT


# Sticky detection looks at the last max(STICKY_MIN_WINDOW, STICKY_WINDOW_PER_SERVER x
# count) attempts through the balancer. A round-robin balancer in front of n servers
# returns a new one within a few tries; a streak of 3n duplicates from a fair one is
# unlikely even with other agents' connections interleaved ((1-1/n)^(3n) < 5 % for any n),
# and the floor of 5 keeps a single server from being judged on one or two tries.
STICKY_MIN_WINDOW = 5
STICKY_WINDOW_PER_SERVER = 3


class StickyDetector:
    """Is the load balancer sticky or short? (docs/high-availability.md, "Detect and say
    it"). Fed each attempt through the balancer; ``suspected`` while the agent holds fewer
    servers than it knows of and the last ``window(count)`` attempts all reached servers
    it already held. ``recent`` counts which servers those duplicates reached."""

    def __init__(self) -> None:
        self.in_a_row = 0
        self.recent: dict[str, int] = {}
        self.suspected = False

    @staticmethod
    def window(count: int) -> int:
        return max(STICKY_MIN_WINDOW, STICKY_WINDOW_PER_SERVER * count)

    def new_server(self) -> None:
        """An attempt reached a server not held before: the balancer moves."""
        self.in_a_row = 0
        self.recent.clear()

    def duplicate(self, server_id: str, held: int, count: int) -> bool:
        """An attempt reached ``server_id``, already held; True when this makes the
        balancer suspected (it was not before)."""
        if held >= count:
            self.satisfied()
            return False
        self.in_a_row += 1
        self.recent[server_id] = self.recent.get(server_id, 0) + 1
        if self.suspected or self.in_a_row < self.window(count):
            return False
        self.suspected = True
        return True

    def may_move(self, count: int) -> bool:
        """Fewer duplicates in a row than the window: the next attempt may well reach
        another server, so it is worth making soon."""
        return self.in_a_row < self.window(count)

    def satisfied(self) -> None:
        """Every known server is held (whatever the path): nothing to suspect."""
        self.in_a_row = 0
        self.recent.clear()
        self.suspected = False
