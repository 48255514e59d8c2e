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
    "Backoff",
    "ServerCounter",
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
