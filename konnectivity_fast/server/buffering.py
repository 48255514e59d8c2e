"""Per-tunnel buffering toward frontends: no head-of-line blocking, within a budget.

Agent -> frontend, a DATA is always accepted and queued on its frontend (upstream writes it
synchronously instead: pkg/server/server.go ``serveRecvBackend``). A frontend whose queue is
above its high-water mark (``TUNNEL_WRITE_HIGH_WATER``) is *blocked*; what it is given then
is its *charge*, counted in its ``TunnelBuffer`` and in the process's ``BufferBudget``. A
tunnel charged within one stream window of ``TUNNEL_BUFFER_BUDGET`` *holds* the agent stream
that fed it: the stream is rationed (``GrpcCall.grant_window``, ``RATIONED_WINDOW``), so the
agent's other tunnels keep flowing; a holding tunnel whose frontend takes nothing for
``TUNNEL_STALL_TIMEOUT`` is closed; ``PROCESS_BUFFER_BUDGET`` pauses the feeding streams
outright. Why, and what that bounds: docs/data-path.md ("Server, agent to frontend").

Invariants:
- Data is never dropped or reordered here: budgets only ration or pause sources, and a
  tunnel is closed (never truncated) only after it stalled while holding its agent.
- An agent call is paused while a tunnel holds it or the process budget is spent, and
  resumed when the last reason goes; a tunnel's holds go with it (``release``, on drain or
  close, or when it is back under its budget).
- While held, an agent call's receive window never exceeds the smallest room left in a
  holding tunnel (budget minus charge) plus ``RATIONED_WINDOW``; so no tunnel is charged
  more than ``TUNNEL_BUFFER_BUDGET + RATIONED_WINDOW``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from konnectivity_fast.transport.call import GrpcCall
from konnectivity_fast.transport.grpc import STREAM_WINDOW
from konnectivity_fast.verbosity import V

__all__ = [
    "PROCESS_BUFFER_BUDGET",
    "RATIONED_WINDOW",
    "RATION_POLL_INTERVAL",
    "TUNNEL_BUFFER_BUDGET",
    "TUNNEL_STALL_TIMEOUT",
    "TUNNEL_WRITE_HIGH_WATER",
    "TUNNEL_WRITE_LOW_WATER",
    "BufferBudget",
    "TunnelBuffer",
]

log = logging.getLogger(__name__)

#: A tunnel's queue toward a frontend above which it counts as blocked: 1 MiB covers the
#: bursts of an interactive or streaming tunnel (exec, logs) without charging anything.
TUNNEL_WRITE_HIGH_WATER = 1 << 20
#: The queue below which a blocked HTTP-CONNECT tunnel is writable again.
TUNNEL_WRITE_LOW_WATER = 256 << 10
#: Bytes a blocked tunnel may be given before it holds its agent's stream: 16 MiB lets a
#: slow frontend (kubectl cp to a slow link) fall well behind, four maximum-size messages,
#: before its neighbours feel it.
TUNNEL_BUFFER_BUDGET = 16 << 20
#: What a held agent stream may have in flight beyond the holding tunnel's room: big enough
#: that the other tunnels of the agent move a useful amount per round trip when the slow
#: one has none, small enough that the slow reader's queue overshoots its budget by little
#: (at 1 MB/s it drains this in a quarter second).
RATIONED_WINDOW = 256 << 10
#: How often a holding tunnel's queue is measured: its frontend's progress is granted to
#: the agent within this delay (a 1 KiB echo behind a slow reader waits at most about this
#: plus the agent's own queue).
RATION_POLL_INTERVAL = 0.005
#: How long a tunnel holding its agent may take nothing before it is closed: long enough
#: for a slow reader to show progress, short enough that new dials and the other tunnels
#: of its agent (rationed meanwhile) recover before clients time out (10 s, as
#: konnectivity-client's read timeout: it closes a tunnel whose reader took nothing for
#: 10 s).
TUNNEL_STALL_TIMEOUT = 10.0
#: All blocked tunnels together: bounds the server's buffer memory whatever the number of
#: stalled frontends (1000 stalled tunnels would otherwise be allowed 16 GiB).
PROCESS_BUFFER_BUDGET = 256 << 20


class TunnelBuffer:
    """What one frontend (an HTTP-CONNECT client, or a gRPC ``Proxy`` stream) was given
    while blocked, and the agent calls it holds."""

    __slots__ = ("abandon", "backlog", "blocked", "charge", "fed", "last_taken", "pausing", "watch")

    def __init__(
        self,
        backlog: Callable[[], int] | None = None,
        abandon: Callable[[], None] | None = None,
    ) -> None:
        self.blocked = False
        self.charge = 0
        #: Every byte ever charged (never falls): with the backlog, what the frontend took.
        self.fed = 0
        self.pausing: list[GrpcCall] = []
        #: The adapter's: bytes still queued toward the frontend, and how to close the
        #: tunnel when it stalls while holding its agent.
        self.backlog = backlog
        self.abandon = abandon
        self.last_taken = 0
        self.watch: asyncio.TimerHandle | None = None


class BufferBudget:
    """The process's charges, and the agent calls held or paused because of them."""

    def __init__(
        self,
        tunnel_budget: int = TUNNEL_BUFFER_BUDGET,
        process_budget: int = PROCESS_BUFFER_BUDGET,
        stall_timeout: float = TUNNEL_STALL_TIMEOUT,
        rationed_window: int = RATIONED_WINDOW,
    ) -> None:
        self.tunnel_budget = tunnel_budget
        self.process_budget = process_budget
        self.stall_timeout = stall_timeout
        self.rationed_window = rationed_window
        #: A tunnel charged this much could reach its budget with what its agent may
        #: already send: from here on, its agent is rationed.
        self.hold_at = max(0, tunnel_budget - STREAM_WINDOW)
        self.total = 0
        #: Held agent calls and the tunnels holding each.
        self._holders: dict[GrpcCall, list[TunnelBuffer]] = {}
        self._process_paused: set[GrpcCall] = set()
        self._poll: asyncio.TimerHandle | None = None
        #: Held calls that received something since their last ration (one pass per loop
        #: turn, not one per message).
        self._received: set[GrpcCall] = set()

    # -- the adapters' events --

    def charge(self, tunnel: TunnelBuffer, nbytes: int, agent: GrpcCall) -> None:
        """``nbytes`` from ``agent`` were queued on the blocked ``tunnel``."""
        tunnel.charge += nbytes
        tunnel.fed += nbytes
        self.total += nbytes
        if tunnel.charge >= self.hold_at and agent not in tunnel.pausing:
            # V(2): flow control toward a slow client, several times a second on a fast
            # download, not news.
            log.log(
                V(2),
                "a tunnel's frontend is %d bytes behind; rationing its agent's stream %d",
                tunnel.charge,
                agent.stream_id,
            )
            self._hold(tunnel, agent)
        if self.total >= self.process_budget and agent not in self._process_paused:
            log.warning(
                "tunnel buffers hold %d bytes (budget %d); pausing agent stream %d",
                self.total,
                self.process_budget,
                agent.stream_id,
            )
            self._process_paused.add(agent)
            self._pause(agent)

    def received(self, agent: GrpcCall) -> None:
        """``agent`` delivered a message: if it is held, its window is rationed again at
        the end of this loop turn (what it sent for other tunnels is granted back)."""
        if agent in self._holders and agent not in self._received:
            if not self._received:
                asyncio.get_running_loop().call_soon(self._ration_received)
            self._received.add(agent)

    def release(self, tunnel: TunnelBuffer) -> None:
        """``tunnel`` drained (or is gone): forget its charge and its holds."""
        if tunnel.watch is not None:
            tunnel.watch.cancel()
            tunnel.watch = None
        tunnel.blocked = False
        self.total -= tunnel.charge
        tunnel.charge = 0
        self._unhold(tunnel)
        if self._process_paused and self.total < self.process_budget // 2:
            paused, self._process_paused = self._process_paused, set()
            for agent in paused:
                self._resume(agent)

    def paused(self, agent: GrpcCall) -> bool:
        """Whether ``agent``'s stream is held or paused by a budget."""
        return agent in self._holders or agent in self._process_paused

    # -- holding and rationing --

    def _hold(self, tunnel: TunnelBuffer, agent: GrpcCall) -> None:
        tunnel.pausing.append(agent)
        holders = self._holders.get(agent)
        if holders is None:
            self._holders[agent] = [tunnel]
            self._pause(agent)
        else:
            holders.append(tunnel)
        self._watch(tunnel)
        if self._poll is None:
            self._poll = asyncio.get_running_loop().call_later(RATION_POLL_INTERVAL, self._on_poll)
        self._ration(agent)

    def _unhold(self, tunnel: TunnelBuffer) -> None:
        pausing, tunnel.pausing = tunnel.pausing, []
        for agent in pausing:
            holders = self._holders.get(agent)
            if holders is None or tunnel not in holders:
                continue
            holders.remove(tunnel)
            if not holders:
                del self._holders[agent]
                self._resume(agent)
            else:
                self._ration(agent)

    def _on_poll(self) -> None:
        """Measure the holding tunnels: those back under budget let go; the progress of
        the others is granted to their agents."""
        self._poll = None
        tunnels = {t for holders in self._holders.values() for t in holders}
        for tunnel in tunnels:
            self._measure(tunnel)
            if tunnel.charge < self.hold_at:
                self._unhold(tunnel)
        for agent in list(self._holders):
            self._ration(agent)
        if self._holders:
            self._poll = asyncio.get_running_loop().call_later(RATION_POLL_INTERVAL, self._on_poll)

    def _ration_received(self) -> None:
        received, self._received = self._received, set()
        for agent in received:
            if agent in self._holders:
                self._ration(agent)

    def _ration(self, agent: GrpcCall) -> None:
        """Grant ``agent`` what keeps its window at the ration (see the invariants)."""
        if agent in self._process_paused:
            return
        holders = self._holders.get(agent)
        if not holders:
            return
        room = self.tunnel_budget - max(t.charge for t in holders)
        target = room + self.rationed_window
        if target > 0:
            missing = target - agent.receive_window()
            if missing > 0:
                agent.grant_window(missing)

    def _measure(self, tunnel: TunnelBuffer) -> None:
        """Re-read a tunnel's charge from its queue: it falls as its frontend reads."""
        if tunnel.backlog is None:
            return
        charge = max(0, tunnel.backlog() - TUNNEL_WRITE_HIGH_WATER)
        if charge < tunnel.charge:
            self.total -= tunnel.charge - charge
            tunnel.charge = charge

    # -- stalls --

    def _watch(self, tunnel: TunnelBuffer) -> None:
        if tunnel.backlog is None or tunnel.abandon is None or tunnel.watch is not None:
            return
        tunnel.last_taken = tunnel.fed - tunnel.backlog()
        tunnel.watch = asyncio.get_running_loop().call_later(
            self.stall_timeout, self._check_stalled, tunnel
        )

    def _check_stalled(self, tunnel: TunnelBuffer) -> None:
        tunnel.watch = None
        if not tunnel.pausing or tunnel.backlog is None or tunnel.abandon is None:
            return
        backlog = tunnel.backlog()
        # Progress is what the frontend took, not a shorter queue: a rationed tunnel is
        # refilled as it reads, so a steady reader's queue stays as long as it was.
        if tunnel.fed - backlog > tunnel.last_taken:  # slow, not stalled: keep waiting
            self._watch(tunnel)
            return
        log.warning(
            "a tunnel's frontend took nothing for %ss with %d bytes queued: closing it",
            self.stall_timeout,
            backlog,
        )
        abandon = tunnel.abandon
        self.release(tunnel)
        abandon()

    # -- the agent call's reading --

    def _pause(self, agent: GrpcCall) -> None:
        """Pause on a first reason (a hold, or the process budget)."""
        held = agent in self._holders
        process = agent in self._process_paused
        if held + process == 1:
            agent.pause_reading()

    def _resume(self, agent: GrpcCall) -> None:
        """Resume when no reason is left."""
        if agent not in self._holders and agent not in self._process_paused:
            agent.resume_reading()
        elif agent in self._holders:
            self._ration(agent)
