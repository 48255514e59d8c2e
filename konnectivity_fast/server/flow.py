"""The proxy-server's side of ``flow.v1``: per-tunnel credit with our own agents.

``tunnel/flow.py`` holds the arithmetic and docs/flow-control.md the protocol. A frontend's
tunnel on an agent stream that negotiated ``flow.v1`` gets a ``FlowTunnel``, made when its
first DATA or credit passes:

- agent -> frontend: DATA is queued on the frontend with no budget (server/buffering.py is
  for agents without flow.v1) and the agent's credit is given back (``FLOW_CREDIT``) as the
  frontend takes the bytes: at the end of the loop turn that queued them, and again when
  the frontend's queue falls to where a grant's worth is free
  (``ReceiveWindow.drain_target``, ``FlowSource.when_drained_to``).
- frontend -> agent: each DATA spends the tunnel's credit; at zero the frontend's own source
  is paused until the agent grants more.

So nothing ever pauses an agent's stream on a tunnel's account: a slow frontend holds at
most its window, and it is never closed for being slow.

Invariants:
- A ``FlowTunnel`` exists only for an agent call in ``FlowControl.agents``; its credit
  packets go on that call only.
- A tunnel's source is paused for credit exactly while its send credit is spent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from konnectivity_fast.metrics import flow as flow_metrics
from konnectivity_fast.transport.call import GrpcCall, GrpcError
from konnectivity_fast.transport.loop import RunningLoop
from konnectivity_fast.tunnel.events import Message
from konnectivity_fast.tunnel.flow import GrowthBudget, ReceiveWindow, SendCredit
from konnectivity_fast.wire.codec import encode_packet, peek_data
from konnectivity_fast.wire.packets import Data, FlowCredit, Packet, PacketType

__all__ = ["FlowControl", "FlowSource", "FlowTunnel", "data_size", "payload_size"]

log = logging.getLogger(__name__)


def data_size(message: Message) -> tuple[int, int]:
    """A DATA message's connectID and payload size, as both peers count credit."""
    if isinstance(message, Packet):
        payload = message.payload
        return (payload.connect_id, len(payload.data)) if isinstance(payload, Data) else (0, 0)
    peeked = peek_data(message)
    return (0, 0) if peeked is None else (peeked[0], len(peeked[1]))


def payload_size(message: Message) -> int:
    return data_size(message)[1]


class FlowSource(Protocol):
    """The frontend adapter's side of one tunnel (``HttpConnectProtocol``,
    ``server.streams.FrontendStream``)."""

    def flow_backlog(self) -> int:
        """Bytes queued toward the frontend and not yet taken."""
        ...

    def when_drained_to(self, level: int, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the queue toward the frontend holds at most ``level``
        bytes. A later call may replace an earlier one's callback, or not (both then run:
        a callback only asks for a grant decision)."""
        ...

    def pause_for_credit(self) -> None: ...
    def resume_for_credit(self) -> None: ...
    def flow_breached(self) -> None:
        """The agent sent far more than its credit: close this tunnel."""
        ...


class FlowTunnel:
    """One tunnel's credit both ways."""

    __slots__ = ("agent", "connect_id", "credit", "drain_level", "source", "window")

    def __init__(
        self, agent: GrpcCall, connect_id: int, source: FlowSource, growth: GrowthBudget
    ) -> None:
        self.agent = agent
        self.connect_id = connect_id
        self.source = source
        self.credit = SendCredit()
        self.window = ReceiveWindow(growth)
        #: The backlog level a ``when_drained_to`` callback waits for, if one does.
        self.drain_level: int | None = None


class FlowControl:
    """The server's ``flow.v1`` tunnels: credit given back as frontends drain."""

    def __init__(self) -> None:
        #: Agent calls that negotiated flow.v1.
        self.agents: set[GrpcCall] = set()
        self.growth = GrowthBudget()
        self._dirty: set[FlowTunnel] = set()
        self._running_loop = RunningLoop()

    def tunnel(self, agent: GrpcCall, connect_id: int, source: FlowSource) -> FlowTunnel:
        return FlowTunnel(agent, connect_id, source, self.growth)

    # -- agent -> frontend --

    def received(self, tunnel: FlowTunnel, nbytes: int) -> None:
        """``nbytes`` of DATA from the agent were queued on the frontend."""
        if not tunnel.window.receive(nbytes):
            log.warning(
                "agent stream %d sent %d bytes past its credit on connection %d: closing it",
                tunnel.agent.stream_id,
                -tunnel.window.in_flight,
                tunnel.connect_id,
            )
            tunnel.source.flow_breached()
            return
        self.drained(tunnel)

    def drained(self, tunnel: FlowTunnel) -> None:
        """The frontend may have taken something: grant at the end of this loop turn."""
        if not self._dirty:
            self._running_loop().call_soon(self._grant_dirty)
        self._dirty.add(tunnel)

    def _grant_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for tunnel in dirty:
            self._grant(tunnel)

    def _grant(self, tunnel: FlowTunnel) -> None:
        backlog = tunnel.source.flow_backlog()
        nbytes = tunnel.window.grant(backlog, self._running_loop().time())
        if nbytes:
            packet = Packet(PacketType.FLOW_CREDIT, FlowCredit(tunnel.connect_id, nbytes))
            try:
                tunnel.agent.send(encode_packet(packet))
            except GrpcError:
                return  # the agent stream is gone: its end closes the tunnel
            flow_metrics.granted(nbytes)
        if backlog:
            self._watch(tunnel)

    def _watch(self, tunnel: FlowTunnel) -> None:
        """Decide again once the frontend has taken enough for a grant: unless a callback
        already waits for that level or a higher one (it comes first)."""
        level = tunnel.window.drain_target()
        waiting = tunnel.drain_level
        if level is None or (waiting is not None and waiting >= level):
            return
        tunnel.drain_level = level
        tunnel.source.when_drained_to(level, lambda: self._drained_to(tunnel, level))

    def _drained_to(self, tunnel: FlowTunnel, level: int) -> None:
        if tunnel.drain_level == level:
            tunnel.drain_level = None
        self.drained(tunnel)

    # -- frontend -> agent --

    def sent(self, tunnel: FlowTunnel, nbytes: int) -> None:
        """``nbytes`` of DATA went to the agent: at zero credit, pause the source. A source
        that was already paused (a gRPC frontend's read delivers every message it holds)
        is paused and counted once."""
        credit = tunnel.credit
        if not credit.spend(nbytes) and credit.credit + nbytes > 0:
            flow_metrics.stalled()
            tunnel.source.pause_for_credit()

    def credit(self, tunnel: FlowTunnel, nbytes: int) -> None:
        """The agent granted ``nbytes`` (FLOW_CREDIT)."""
        flow_metrics.received(nbytes)
        if tunnel.credit.add(nbytes):
            tunnel.source.resume_for_credit()

    def close(self, tunnel: FlowTunnel) -> None:
        self._dirty.discard(tunnel)
        tunnel.window.release()
