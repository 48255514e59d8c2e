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
the first byte). Frontend -> agent, a frontend's own source (its socket, or its HTTP/2
stream) is paused while the agent's call has ``CALL_SEND_HIGH_WATER`` bytes queued; nobody
else waits.

Invariants:
- Data is never dropped or reordered here: budgets only pause sources.
- An agent call is paused while at least one reason (a tunnel over budget, or the process
  budget) holds, and resumed when the last reason goes; a tunnel's reasons go with it
  (``release``, on drain or on close).
"""

from __future__ import annotations

import logging

from konnectivity_fast.transport.call import GrpcCall

__all__ = [
    "PROCESS_BUFFER_BUDGET",
    "TUNNEL_BUFFER_BUDGET",
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
#: All blocked tunnels together: bounds the server's buffer memory whatever the number of
#: stalled frontends (1000 stalled tunnels would otherwise be allowed 16 GiB).
PROCESS_BUFFER_BUDGET = 256 << 20


class TunnelBuffer:
    """What one frontend (an HTTP-CONNECT client, or a gRPC ``Proxy`` stream) was given
    while blocked, and the agent calls paused on its account."""

    __slots__ = ("blocked", "charge", "pausing")

    def __init__(self) -> None:
        self.blocked = False
        self.charge = 0
        self.pausing: list[GrpcCall] = []


class BufferBudget:
    """The process's charges and the agent calls paused because of them."""

    def __init__(
        self,
        tunnel_budget: int = TUNNEL_BUFFER_BUDGET,
        process_budget: int = PROCESS_BUFFER_BUDGET,
    ) -> None:
        self.tunnel_budget = tunnel_budget
        self.process_budget = process_budget
        self.total = 0
        self._reasons: dict[GrpcCall, int] = {}
        self._process_paused: set[GrpcCall] = set()

    def charge(self, tunnel: TunnelBuffer, nbytes: int, agent: GrpcCall) -> None:
        """``nbytes`` from ``agent`` were queued on the blocked ``tunnel``."""
        tunnel.charge += nbytes
        self.total += nbytes
        if tunnel.charge >= self.tunnel_budget and agent not in tunnel.pausing:
            log.info("a tunnel's frontend is %d bytes behind; pausing its agent's stream %d",
                     tunnel.charge, agent.stream_id)
            tunnel.pausing.append(agent)
            self._pause(agent)
        if self.total >= self.process_budget and agent not in self._process_paused:
            log.warning("tunnel buffers hold %d bytes (budget %d); pausing agent stream %d",
                        self.total, self.process_budget, agent.stream_id)
            self._process_paused.add(agent)
            self._pause(agent)

    def release(self, tunnel: TunnelBuffer) -> None:
        """``tunnel`` drained (or is gone): forget its charge and its pauses."""
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
