"""Per-tunnel credit flow control between our own peers (``flow.v1``): the arithmetic.

On an agent stream where both peers negotiated ``flow.v1`` (``wire.contract``), every
established connection has a credit window in each direction (docs/flow-control.md):

- ``SendCredit``: what this side may still send for one connection. It starts at
  ``INITIAL_WINDOW`` when the connection is established (DIAL_RSP), each DATA spends its
  payload size, each ``FLOW_CREDIT`` from the peer adds to it. A sender sends a DATA only
  while its credit is positive, so it overshoots by less than one packet (plus what its own
  source had in flight when it paused it; ``OVERSHOOT_LIMIT`` bounds both).
- ``ReceiveWindow``: what this side lets its peer send for one connection. It keeps ``in
  flight + buffered <= window`` (in flight: granted and not yet received; buffered:
  received and not yet taken by the consumer) and grants the rest, in pieces of at least
  half the window (``GRANT_DIVISOR``), as the consumer drains; ``drain_target`` is the
  consumer's backlog at which the next grant is due, which the adapters wait for (not an
  empty queue: the peer would get credit only once the consumer had run dry). The window
  *turns* when the consumer has taken a whole window. It doubles, up to ``MAX_WINDOW``,
  when it turned within ``TURN_TIME`` (it holds less than that much of the tunnel's
  rate), or when the consumer holds little and the peer has spent most of its credit; it
  halves back toward ``INITIAL_WINDOW`` when the consumer holds most of it and it has not
  turned for ``TURN_TIME`` (a slow consumer is the limit: a bigger window would only sit
  in its queue). A fast consumer that is merely behind for a moment keeps its window:
  halving on that collapsed a download's 4 MiB to 256 KiB in 12 ms, and the frontend then
  ran dry between grants. Growth beyond the initial window is shared process-wide
  (``GrowthBudget``), which bounds what all tunnels together can hold.

Sans-IO: sizes in, decisions out; the adapters (server/flow.py, agent/) move the bytes.

Invariants:
- A ``ReceiveWindow`` never grants more than keeps ``in flight + buffered <= window``.
- A window's growth is charged to its ``GrowthBudget`` before it happens and given back when
  it shrinks or the connection ends (``release``), so the budget's total is exact.
"""

from __future__ import annotations

__all__ = [
    "GRANT_DIVISOR",
    "GROWTH_BUDGET",
    "INITIAL_WINDOW",
    "MAX_WINDOW",
    "OVERSHOOT_LIMIT",
    "TURN_TIME",
    "GrowthBudget",
    "ReceiveWindow",
    "SendCredit",
]

#: Credit of a new connection in each direction: an interactive tunnel (exec, logs) never
#: waits for credit, and 10,000 idle tunnels promise at most 2.5 GiB they will not use.
INITIAL_WINDOW = 256 << 10
#: A grant is at least this share of the window (``window // GRANT_DIVISOR``): every credit
#: packet wakes the peer and costs both sides a TLS record, so grants come in halves of
#: the window, not quarters; the peer still has the other half to send while the grant
#: travels (2 MiB at MAX_WINDOW: ~4 ms at 500 MB/s, against a credit round trip under 1 ms).
GRANT_DIVISOR = 2
#: Largest window of one connection: when a grant is sent, its peer still has half of it
#: (2 MiB, ``GRANT_DIVISOR``) to send, enough for ~1 GB/s across a 2 ms credit round trip;
#: more only buys memory a stalled reader can hold.
MAX_WINDOW = 4 << 20
#: What a peer may send past its credit before it is in breach: the rest of the HTTP/2
#: window of its own source (1 MiB) plus one gRPC message of the largest default size
#: (4 MiB), rounded up; a sender stops its source at zero credit but cannot recall those.
OVERSHOOT_LIMIT = 8 << 20
#: Bytes of window above INITIAL_WINDOW that all connections of a process may hold
#: together: fast tunnels grow while others keep their initial window, and if every grown
#: tunnel stalled at once they could hold no more than this.
GROWTH_BUDGET = 256 << 20
#: A window doubles when its consumer takes a whole window in less than this: the window
#: then covers less than this much of the tunnel's rate, and a credit round trip that long
#: (a loaded machine's scheduling delays, a link across zones) would make the window, not
#: the peer or the consumer, the limit. Watching for the peer to run out of credit instead
#: misses a steady window-bound tunnel: its credit is always on its way, so the receiver
#: sees the whole window in flight. A window halves only when it has not turned for this
#: long (a slow consumer). A tunnel under ~5 MB/s (256 KiB in 50 ms) keeps its initial
#: window.
TURN_TIME = 0.05


class GrowthBudget:
    """The process's window growth (see ``GROWTH_BUDGET``)."""

    __slots__ = ("grown", "limit")

    def __init__(self, limit: int = GROWTH_BUDGET) -> None:
        self.limit = limit
        self.grown = 0

    def take(self, nbytes: int) -> bool:
        if self.grown + nbytes > self.limit:
            return False
        self.grown += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.grown -= nbytes


class SendCredit:
    """What this side may still send for one connection."""

    __slots__ = ("credit",)

    def __init__(self, initial: int = INITIAL_WINDOW) -> None:
        self.credit = initial

    @property
    def open(self) -> bool:
        """A DATA may be sent now."""
        return self.credit > 0

    def spend(self, nbytes: int) -> bool:
        """A DATA of ``nbytes`` went out; False when the credit is now spent (stop the
        source until ``add`` opens it again)."""
        self.credit -= nbytes
        return self.credit > 0

    def add(self, nbytes: int) -> bool:
        """The peer granted ``nbytes``; True when this reopens a spent credit."""
        was_spent = self.credit <= 0
        self.credit += nbytes
        return was_spent and self.credit > 0


class ReceiveWindow:
    """What this side lets its peer send for one connection (see the module docstring)."""

    __slots__ = ("budget", "granted", "received", "turn_at", "turn_start", "window")

    def __init__(self, budget: GrowthBudget, initial: int = INITIAL_WINDOW) -> None:
        self.budget = budget
        self.window = initial
        self.granted = initial  # the initial window counts as granted at establishment
        self.received = 0
        #: The current turn of the window: bytes the consumer had taken, and the time,
        #: at its start (None until the first grant decision).
        self.turn_start = 0
        self.turn_at: float | None = None

    @property
    def in_flight(self) -> int:
        """Granted and not yet received (negative while the peer overshoots)."""
        return self.granted - self.received

    def receive(self, nbytes: int) -> bool:
        """The peer sent ``nbytes`` of DATA; False when that breaches its credit by more
        than ``OVERSHOOT_LIMIT`` (a protocol error on this connection)."""
        self.received += nbytes
        return self.received - self.granted <= OVERSHOOT_LIMIT

    def grant(self, buffered: int, now: float) -> int:
        """The credit to send now, given ``buffered`` bytes waiting for the consumer and
        the time ``now`` (seconds, any monotonic clock); 0 when the rest is too small to be
        worth a packet yet."""
        self._adapt(buffered, now)
        room = self.window - buffered - self.in_flight
        if room < self.window // GRANT_DIVISOR:
            return 0
        self.granted += room
        return room

    def drain_target(self) -> int | None:
        """The consumer's backlog at or below which a grant is due (a grant's worth of the
        window is then free): the adapter asks its consumer to say when it gets there, so
        that a peer waiting for credit gets it while the consumer still has bytes to take,
        not once it has run dry. None while no draining can make a grant due (the peer
        holds more than the rest of the window in flight): the DATA still to come brings
        the next decision, and a watch would only cost a callback."""
        window = self.window
        level = window - window // GRANT_DIVISOR - self.in_flight
        return level if level >= 0 else None

    def release(self) -> None:
        """The connection ended: give the window's growth back."""
        self._resize(INITIAL_WINDOW)

    def _adapt(self, buffered: int, now: float) -> None:
        # A turn: the consumer took a whole window. Whether one took less than TURN_TIME
        # says whether the window covers that much of the tunnel's rate.
        taken = self.received - buffered
        if self.turn_at is None:
            self.turn_start, self.turn_at = taken, now
        window = self.window
        quarter = window // 4
        elapsed = now - self.turn_at
        fast = False
        if taken - self.turn_start >= window:
            fast = elapsed <= TURN_TIME
            self.turn_start, self.turn_at = taken, now
        if window < MAX_WINDOW and (fast or (buffered <= quarter and self.in_flight <= quarter)):
            # The window limits the tunnel: it turned within TURN_TIME, or the consumer
            # keeps up and the peer holds at most a quarter of its credit (it waits).
            self._resize(min(window * 2, MAX_WINDOW), taken, now)
        elif buffered >= window - quarter and elapsed > TURN_TIME and window > INITIAL_WINDOW:
            # Three quarters sit unread and the window has not turned for TURN_TIME: the
            # consumer is the limit, and a slow one. (A fast one that is behind for a
            # moment keeps its window, or it would run dry before the next grant came.)
            self._resize(max(window // 2, INITIAL_WINDOW), taken, now)

    def _resize(self, window: int, taken: int = 0, now: float | None = None) -> None:
        grow = window - self.window
        if grow > 0 and not self.budget.take(grow):
            return
        if grow < 0:
            self.budget.give(-grow)
        self.window = window
        if now is not None:  # a new size, a new turn
            self.turn_start, self.turn_at = taken, now
