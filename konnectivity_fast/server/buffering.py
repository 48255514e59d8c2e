"""Per-tunnel buffering toward frontends: no head-of-line blocking, within a budget.

An agent has one stream per server and every tunnel it serves is multiplexed on it; the
Konnectivity protocol has no per-connection flow control. Upstream writes each DATA to its
frontend synchronously, so one frontend that stops reading stops the agent's stream, and with
it every tunnel on that agent and every new dial (reference/upstream-server.md §9.1).

Here, agent -> frontend, a DATA is always accepted and queued on its frontend: the HTTP
client's transport buffer, or the frontend's HTTP/2 stream. A frontend whose queue is above
its high-water mark (``TUNNEL_WRITE_HIGH_WATER``, or the call's ``CALL_SEND_HIGH_WATER``) is
*blocked*; the bytes it is given while blocked are *charged* to its ``TunnelBuffer`` and to
the process's ``BufferBudget``. When the frontend drains below its low-water mark the charge
is released. Budgets:

- ``TUNNEL_BUFFER_BUDGET``: a tunnel charged this much pauses the agent stream that fed it
  (HTTP/2 flow control: the agent soon stops sending on that stream) until the tunnel drains.
- ``PROCESS_BUFFER_BUDGET``: when all charges together reach it, each agent stream that
  feeds a blocked tunnel is paused until the total is back under half of it.

So one stalled frontend costs at most its tunnel budget and never delays its neighbours until
that budget is spent; only then does its agent's stream wait (which is what upstream does at
the first byte). A frontend that then takes nothing at all for ``TUNNEL_STALL_TIMEOUT`` is
given up on: its tunnel is closed (the adapter's ``abandon``: CLOSE_REQ to the agent, the
client dropped), its charge released, and the agent's stream resumes. A slow frontend that
keeps reading is never closed; it only slows its own agent's stream down.

Frontend -> agent, a frontend's own source (its socket, or its HTTP/2
stream) is paused while the agent's call has ``CALL_SEND_HIGH_WATER`` bytes queued; nobody
else waits.

Invariants:
- Data is never dropped or reordered here: budgets only pause sources, and a tunnel is
  closed (never truncated) only after it stalled with its budget spent.
- An agent call is paused while at least one reason (a tunnel over budget, or the process
  budget) holds, and resumed when the last reason goes; a tunnel's reasons go with it
  (``release``, on drain or on close).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from konnectivity_fast.transport.call import GrpcCall
from konnectivity_fast.verbosity import V

__all__ = [
    "PROCESS_BUFFER_BUDGET",
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
#: Bytes a blocked tunnel may be given before its agent's stream is paused: 16 MiB lets a
#: slow frontend (kubectl cp to a slow link) fall well behind, four maximum-size messages,
#: before its neighbours feel it.
TUNNEL_BUFFER_BUDGET = 16 << 20
#: How long a tunnel that spent its budget may take nothing before it is closed: long
#: enough for a slow reader to show progress, short enough that the other tunnels of its
#: agent (paused meanwhile) and new dials recover before clients time out (10 s, as
#: konnectivity-client's read timeout: it closes a tunnel whose reader took nothing for 10 s).
TUNNEL_STALL_TIMEOUT = 10.0
#: All blocked tunnels together: bounds the server's buffer memory whatever the number of
#: stalled frontends (1000 stalled tunnels would otherwise be allowed 16 GiB).
PROCESS_BUFFER_BUDGET = 256 << 20


class TunnelBuffer:
    """What one frontend (an HTTP-CONNECT client, or a gRPC ``Proxy`` stream) was given
    while blocked, and the agent calls paused on its account."""

    __slots__ = ("abandon", "backlog", "blocked", "charge", "last_backlog", "pausing", "watch")

    def __init__(
        self, backlog: Callable[[], int] | None = None, abandon: Callable[[], None] | None = None
    ) -> None:
        self.blocked = False
        self.charge = 0
        self.pausing: list[GrpcCall] = []
        #: The adapter's: bytes still queued toward the frontend, and how to close the
        #: tunnel when it stalls with its budget spent.
        self.backlog = backlog
        self.abandon = abandon
        self.last_backlog = 0
        self.watch: asyncio.TimerHandle | None = None


class BufferBudget:
    """The process's charges and the agent calls paused because of them."""

    def __init__(
        self,
        tunnel_budget: int = TUNNEL_BUFFER_BUDGET,
        process_budget: int = PROCESS_BUFFER_BUDGET,
        stall_timeout: float = TUNNEL_STALL_TIMEOUT,
    ) -> None:
        self.tunnel_budget = tunnel_budget
        self.process_budget = process_budget
        self.stall_timeout = stall_timeout
        self.total = 0
        self._reasons: dict[GrpcCall, int] = {}
        self._process_paused: set[GrpcCall] = set()

    def charge(self, tunnel: TunnelBuffer, nbytes: int, agent: GrpcCall) -> None:
        """``nbytes`` from ``agent`` were queued on the blocked ``tunnel``."""
        tunnel.charge += nbytes
        self.total += nbytes
        if tunnel.charge >= self.tunnel_budget and agent not in tunnel.pausing:
            # V(2): flow control toward a slow client, several times a second on a fast
            # download, not news.
            log.log(
                V(2),
                "a tunnel's frontend is %d bytes behind; pausing its agent's stream %d",
                tunnel.charge,
                agent.stream_id,
            )
            tunnel.pausing.append(agent)
            self._pause(agent)
            self._watch(tunnel)
        if self.total >= self.process_budget and agent not in self._process_paused:
            log.warning(
                "tunnel buffers hold %d bytes (budget %d); pausing agent stream %d",
                self.total,
                self.process_budget,
                agent.stream_id,
            )
            self._process_paused.add(agent)
            self._pause(agent)

    def release(self, tunnel: TunnelBuffer) -> None:
        """``tunnel`` drained (or is gone): forget its charge and its pauses."""
        if tunnel.watch is not None:
            tunnel.watch.cancel()
            tunnel.watch = None
        tunnel.blocked = False
        self.total -= tunnel.charge
        tunnel.charge = 0
        pausing, tunnel.pausing = tunnel.pausing, []
        for agent in pausing:
            self._resume(agent)
        if self._process_paused and self.total < self.process_budget // 2:
            paused, self._process_paused = self._process_paused, set()
            for agent in paused:
                self._resume(agent)

    def _watch(self, tunnel: TunnelBuffer) -> None:
        if tunnel.backlog is None or tunnel.abandon is None or tunnel.watch is not None:
            return
        tunnel.last_backlog = tunnel.backlog()
        tunnel.watch = asyncio.get_running_loop().call_later(
            self.stall_timeout, self._check_stalled, tunnel
        )

    def _check_stalled(self, tunnel: TunnelBuffer) -> None:
        tunnel.watch = None
        if not tunnel.pausing or tunnel.backlog is None or tunnel.abandon is None:
            return
        backlog = tunnel.backlog()
        if backlog < tunnel.last_backlog:  # slow, not stalled: keep waiting
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

    def paused(self, agent: GrpcCall) -> bool:
        """Whether ``agent``'s stream is paused by a budget."""
        return agent in self._reasons

    def _pause(self, agent: GrpcCall) -> None:
        count = self._reasons.get(agent, 0)
        self._reasons[agent] = count + 1
        if count == 0:
            agent.pause_reading()

    def _resume(self, agent: GrpcCall) -> None:
        count = self._reasons.pop(agent, 0) - 1
        if count > 0:
            self._reasons[agent] = count
        elif count == 0:
            agent.resume_reading()
