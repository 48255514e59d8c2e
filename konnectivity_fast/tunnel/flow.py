"""Per-tunnel credit flow control between our own peers (``flow.v1``): the arithmetic.

On an agent stream where both peers negotiated ``flow.v1`` (``wire.contract``), every
established connection has a credit window in each direction (docs/flow-control.md):

- ``SendCredit``: what this side may still send for one connection. It starts at
  ``INITIAL_WINDOW`` when the connection is established (DIAL_RSP), each DATA spends its
  payload size, each ``FLOW_CREDIT`` from the peer adds to it. A sender sends a DATA only
  while its credit is positive, so it overshoots by less than one packet (plus what its own
  source had in flight when it paused it; ``OVERSHOOT_LIMIT`` bounds both).
- ``ReceiveWindow``: what this side lets its peer send for one connection. It keeps
  ``in flight + buffered <= window`` (in flight: granted and not yet received; buffered:
  received and not yet taken by the consumer) and grants the rest, in pieces of at least a
  quarter window, as the consumer drains. The window doubles, up to ``MAX_WINDOW``, while
  the consumer holds little and the peer has spent most of its credit (the window, not the
  consumer, limits the tunnel), and halves back toward ``INITIAL_WINDOW`` while the
  consumer holds most of it (it is the limit: a bigger window would only sit in its
  queue). A consumer that is merely busy holds part of the window in any fast pipeline;
  halving on that kept a fast download between 256 KiB and 2 MiB (bench/ down1, gRPC:
  0.83x of flow off before, 0.97x after). Growth beyond the initial window is shared process-wide
  (``GrowthBudget``), which bounds what all tunnels together can hold.

Sans-IO: sizes in, decisions out; the adapters (server/flow.py, agent/) move the bytes.

Invariants:
- A ``ReceiveWindow`` never grants more than keeps ``in flight + buffered <= window``.
- A window's growth is charged to its ``GrowthBudget`` before it happens and given back when
  it shrinks or the connection ends (``release``), so the budget's total is exact.
"""

from __future__ import annotations

__all__ = [
    "GROWTH_BUDGET",
    "INITIAL_WINDOW",
    "MAX_WINDOW",
    "OVERSHOOT_LIMIT",
    "GrowthBudget",
    "ReceiveWindow",
    "SendCredit",
]

#: Credit of a new connection in each direction: an interactive tunnel (exec, logs) never
#: waits for credit, and 10,000 idle tunnels promise at most 2.5 GiB they will not use.
INITIAL_WINDOW = 256 << 10
#: Largest window of one connection: a bulk transfer at ~2 GB/s with a 2 ms credit round
#: trip needs 4 MiB in flight; more only buys memory a stalled reader can hold.
MAX_WINDOW = 4 << 20
#: What a peer may send past its credit before it is in breach: the rest of the HTTP/2
#: window of its own source (1 MiB) plus one gRPC message of the largest default size
#: (4 MiB), rounded up; a sender stops its source at zero credit but cannot recall those.
OVERSHOOT_LIMIT = 8 << 20
#: Bytes of window above INITIAL_WINDOW that all connections of a process may hold
#: together: fast tunnels grow while others keep their initial window, and if every grown
#: tunnel stalled at once they could hold no more than this.
GROWTH_BUDGET = 256 << 20


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

    __slots__ = ("budget", "granted", "received", "window")

    def __init__(self, budget: GrowthBudget, initial: int = INITIAL_WINDOW) -> None:
        self.budget = budget
        self.window = initial
        self.granted = initial  # the initial window counts as granted at establishment
        self.received = 0

    @property
    def in_flight(self) -> int:
        """Granted and not yet received (negative while the peer overshoots)."""
        return self.granted - self.received

    def receive(self, nbytes: int) -> bool:
        """The peer sent ``nbytes`` of DATA; False when that breaches its credit by more
        than ``OVERSHOOT_LIMIT`` (a protocol error on this connection)."""
        self.received += nbytes
        return self.received - self.granted <= OVERSHOOT_LIMIT

    def grant(self, buffered: int) -> int:
        """The credit to send now, given ``buffered`` bytes waiting for the consumer; 0
        when the rest is too small to be worth a packet yet."""
        self._adapt(buffered)
        room = self.window - buffered - self.in_flight
        if room < self.window // 4:
            return 0
        self.granted += room
        return room

    def release(self) -> None:
        """The connection ended: give the window's growth back."""
        self._resize(INITIAL_WINDOW)

    def _adapt(self, buffered: int) -> None:
        window = self.window
        quarter = window // 4
        if buffered <= quarter and self.in_flight <= quarter and window < MAX_WINDOW:
            self._resize(min(window * 2, MAX_WINDOW))
        elif buffered >= window - quarter and window > INITIAL_WINDOW:
            self._resize(max(window // 2, INITIAL_WINDOW))

    def _resize(self, window: int) -> None:
        grow = window - self.window
        if grow > 0 and not self.budget.take(grow):
            return
        if grow < 0:
            self.budget.give(-grow)
        self.window = window
