"""The proxy-server's half of node-to-control-plane tunneling (node-to-cp.v1;
docs/node-to-control-plane.md): connections an agent asks this server to open to an
allow-listed destination.

``ReverseTunnels`` holds one agent stream's agent-initiated connections; ``server.proxy``
creates one for each agent stream that negotiated ``node-to-cp.v1`` and hands it that
stream's DIAL_REQ and DIAL_CLS, and the DATA and CLOSE_REQ of odd connectIDs. Per packet:

- ``DIAL_REQ{address, random:R}``: refused at once with ``DIAL_RSP{random:R, error}`` when
  the address is not on the allow-list or the stream's cap is reached; else its normalised
  form (``tunnel.allowlist``), the one that was checked, is dialled in a task (never in
  the receive path) within the dial timeout, and answered with ``DIAL_RSP{random:R,
  connectID:X}`` (X odd: 1, 3, 5, ... per stream) or the dial's Go-shaped error;
- ``DIAL_CLS{random:R}``: the pending dial is cancelled; a connection it made anyway is
  closed, and no DIAL_RSP is sent;
- ``DATA{X}``: written to the destination; ``CLOSE_REQ{X}``: the destination gets what is
  queued (within ``transport.dial.CLOSE_FLUSH_TIMEOUT``) and is closed, and
  ``CLOSE_RSP{X}`` answers;
- the destination closing: ``CLOSE_RSP{X}`` unsolicited, after all its DATA;
- this server shutting down (``drain``): ``DRAIN``, so the agent dials through others.

Flow control: every reverse connection has ``flow.v1``'s per-connection credit both ways
(docs/flow-control.md), whether or not the stream negotiated ``flow.v1`` for its forward
tunnels: both ends of a node-to-cp.v1 stream are ours, so the credit is part of the
extension. Destination -> agent, a destination is read while its credit lasts and the
agent stream's queue is under ``REVERSE_SEND_HIGH_WATER``; agent -> destination, the agent
sends within the window this server grants as the destination takes the bytes
(``server.flow.FlowControl``). So a local client that stops reading holds its own window
and never the agent's stream, nor does a destination that stops reading; an agent that
sends far past its credit (``tunnel.flow.OVERSHOOT_LIMIT``) loses that connection only.

Invariants:
- Tables are this stream's only: its loss (``close``) aborts its connections and cancels
  its pending dials, and touches no other stream's.
- Connection IDs are odd and never reused on a stream; the agent's forward IDs on such a
  stream are even, so the two never collide. DATA for an ID of ours that is closed is
  dropped (it crossed the CLOSE_RSP); an ID never allocated is answered with
  ``CLOSE_RSP{error: "unrecognized connectID"}`` (a per-connection protocol error), never
  raised.
- Every dial task ends with its connection either registered (and answered) or closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from konnectivity_fast.metrics import node_to_cp as metrics
from konnectivity_fast.server.flow import FlowControl, FlowTunnel
from konnectivity_fast.transport.call import CALL_SEND_HIGH_WATER, GrpcCall, GrpcError
from konnectivity_fast.transport.dial import close_after_flush, dial
from konnectivity_fast.transport.dialerr import DialError
from konnectivity_fast.transport.loop import resume_writing_at
from konnectivity_fast.tunnel.allowlist import AllowList
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.codec import decode_packet, encode_packet, peek_data
from konnectivity_fast.wire.contract import (
    ERR_AGENT_DIAL_LIMIT,
    ERR_DESTINATION_NOT_ALLOWED,
    ERR_UNRECOGNIZED_CONNECT_ID,
)
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseResponse,
    DialRequest,
    DialResponse,
    Drain,
    FlowCredit,
    Packet,
    PacketType,
)

__all__ = [
    "AGENT_INITIATED_DIAL_TIMEOUT",
    "MAX_AGENT_INITIATED_CONNECTIONS",
    "REVERSE_SEND_HIGH_WATER",
    "NodeToCpConfig",
    "ReverseTunnels",
    "receive",
]

log = logging.getLogger(__name__)

#: ``--agent-initiated-dial-timeout`` default: name lookup plus connect, as the agent's own
#: dials (upstream's 5 s ``dialTimeout``); a control-plane address answers far sooner.
AGENT_INITIATED_DIAL_TIMEOUT = 5.0
#: ``--max-agent-initiated-connections-per-agent`` default: open plus pending connections
#: one agent stream may have; a node's pods rarely hold more than a few hundred API
#: connections, and this bounds the sockets and buffers one agent can make us hold.
MAX_AGENT_INITIATED_CONNECTIONS = 1000
#: The agent stream's queued output above which destinations stop being read (the
#: transport's own per-call high-water mark): what a slow agent makes us hold is this, per
#: stream, plus one read per destination.
REVERSE_SEND_HIGH_WATER = CALL_SEND_HIGH_WATER
ERR_PAST_CREDIT = "agent sent past its credit"


@dataclass(frozen=True, slots=True)
class NodeToCpConfig:
    """The server's node-to-cp.v1 settings (cli flags): the allow-list, the dial timeout
    in seconds and the per-agent-stream cap."""

    allowed: AllowList
    dial_timeout: float = AGENT_INITIATED_DIAL_TIMEOUT
    max_per_agent: int = MAX_AGENT_INITIATED_CONNECTIONS


def _not_allowed(address: str) -> str:
    return ERR_DESTINATION_NOT_ALLOWED.format(address=address)


class _Destination(asyncio.Protocol):
    """One destination socket of one agent-initiated connection, and its credit's
    ``server.flow.FlowSource``. One read is one DATA packet (the loop's read size, at most
    256 KiB: far inside the 4 MiB gRPC message limit)."""

    __slots__ = (
        "closed",
        "connect_id",
        "credit_paused",
        "early",
        "emptied",
        "flow",
        "owner",
        "paused",
        "transport",
    )

    def __init__(self, owner: ReverseTunnels) -> None:
        self.owner = owner
        self.connect_id = 0  # set once answered
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] | None = []  # read before the DIAL_RSP went out
        self.closed = False  # closed by us or the agent: nothing more on the wire
        self.paused = False  # the agent stream's queue is full
        self.credit_paused = False  # the agent granted no more for this connection
        self.flow: FlowTunnel | None = None  # set once answered
        self.emptied: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        t.pause_reading()  # nothing is read before the DIAL_RSP is sent
        # pause_writing/resume_writing then say "holds bytes" / "took everything": the
        # moment to grant credit again (``when_drained_to`` moves the level).
        t.set_write_buffer_limits(0, 0)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.early is not None:
            self.early.append(data)  # uvloop may read once despite pause_reading
            return
        self.owner.send_data(self, data)

    def eof_received(self) -> bool:
        return False  # no half-close in Konnectivity: the whole connection ends

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.destination_lost(self)

    def established(self, connect_id: int, flow: FlowTunnel) -> None:
        self.connect_id = connect_id
        self.flow = flow
        early, self.early = self.early, None
        for data in early or ():
            self.owner.send_data(self, data)
        self._update_reading()

    def write(self, payload: bytes | memoryview) -> None:
        """Agent -> destination: what it has not taken is bounded by the credit window."""
        t = self.transport
        if t is not None and not self.closed and not t.is_closing():
            t.write(payload)

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self._update_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or self.closed or self.early is not None:
            return
        if self.paused or self.credit_paused:
            t.pause_reading()
        else:
            t.resume_reading()

    # -- server.flow.FlowSource --

    def flow_backlog(self) -> int:
        t = self.transport
        return 0 if t is None or self.closed else t.get_write_buffer_size()

    def when_drained_to(self, level: int, callback: Callable[[], None]) -> None:
        self.emptied = callback
        t = self.transport
        if t is not None and not self.closed:
            resume_writing_at(t, level)  # see connection_made

    def pause_writing(self) -> None:
        pass  # see connection_made

    def resume_writing(self) -> None:
        callback, self.emptied = self.emptied, None
        if callback is not None:
            callback()

    def pause_for_credit(self) -> None:
        self.credit_paused = True
        self._update_reading()

    def resume_for_credit(self) -> None:
        self.credit_paused = False
        self._update_reading()

    def flow_breached(self) -> None:
        self.owner.breached(self)

    def close(self) -> None:
        """Flush what is queued, boundedly, then close."""
        self.closed = True
        close_after_flush(self.transport)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _PendingDial:
    __slots__ = ("address", "canceled", "made", "task")

    def __init__(self, address: str) -> None:
        self.address = address
        self.canceled = False
        self.made: _Destination | None = None
        self.task: asyncio.Task[None] | None = None


class ReverseTunnels:
    """One agent stream's agent-initiated connections (module docstring). ``call``: the
    agent stream; ``agent``: its agent ID, for logs."""

    def __init__(
        self, call: GrpcCall, agent: str, config: NodeToCpConfig, flow: FlowControl
    ) -> None:
        self.call = call
        self.agent = agent
        self.config = config
        self.flow = flow  # the server's: its growth budget is shared with forward tunnels
        self.pending: dict[int, _PendingDial] = {}
        self.connections: dict[int, _Destination] = {}
        self._next_id = 1
        self._paused: list[_Destination] = []
        self._closed = False

    # --- from the agent -------------------------------------------------------------------

    def dial_request(self, protocol: str, address: str, random: int) -> None:
        if random == 0 or random in self.pending:
            log.log(V(2), "agent %s: DIAL_REQ with bad random %d ignored", self.agent, random)
            return
        allowed = self.config.allowed.match(address)
        if allowed is None:
            log.log(V(2), "agent %s: destination %r not allowed", self.agent, address)
            metrics.AGENT_DIALS.labels("not_allowed").inc()
            self._send(
                PacketType.DIAL_RSP, DialResponse(error=_not_allowed(address), random=random)
            )
            return
        if len(self.pending) + len(self.connections) >= self.config.max_per_agent:
            metrics.AGENT_DIALS.labels("limit").inc()
            error = ERR_AGENT_DIAL_LIMIT.format(limit=self.config.max_per_agent)
            log.log(V(2), "agent %s: %s", self.agent, error)
            self._send(PacketType.DIAL_RSP, DialResponse(error=error, random=random))
            return
        # Dial exactly what was checked: the normalised form (``LocalHost.:6443`` is
        # dialled as ``localhost:6443``, ``[FD00:0::1]:443`` as ``[fd00::1]:443``).
        target = str(allowed)
        dial_ = _PendingDial(target)
        self.pending[random] = dial_
        loop = asyncio.get_running_loop()
        dial_.task = loop.create_task(self._dial(protocol, target, random, dial_))

    def dial_close(self, random: int) -> None:
        dial_ = self.pending.pop(random, None)
        if dial_ is None:
            return
        dial_.canceled = True
        metrics.AGENT_DIALS.labels("canceled").inc()
        log.log(V(3), "agent %s: dial %d to %s canceled", self.agent, random, dial_.address)
        if dial_.task is not None:
            dial_.task.cancel()

    def data(self, connect_id: int, payload: bytes | memoryview) -> None:
        dest = self.connections.get(connect_id)
        if dest is None:
            if connect_id < self._next_id:
                return  # ours, closed meanwhile: DATA that crossed its CLOSE_RSP
            self._send(
                PacketType.CLOSE_RSP,
                CloseResponse(error=ERR_UNRECOGNIZED_CONNECT_ID, connect_id=connect_id),
            )
            return
        metrics.AGENT_BYTES.labels(metrics.TO_DESTINATION).add(len(payload))
        dest.write(payload)
        if dest.flow is not None:
            self.flow.received(dest.flow, len(payload))

    def credit(self, connect_id: int, nbytes: int) -> None:
        """FLOW_CREDIT: the agent's client took ``nbytes`` more of this connection."""
        dest = self.connections.get(connect_id)
        if dest is not None and dest.flow is not None:  # else closed: the credit is moot
            self.flow.credit(dest.flow, nbytes)

    def breached(self, dest: _Destination) -> None:
        """The agent sent far past its credit (``server.flow``): only this connection pays."""
        if dest.connect_id not in self.connections:
            return
        log.log(V(2), "agent %s: connection %d: %s", self.agent, dest.connect_id, ERR_PAST_CREDIT)
        self._forget(dest)
        dest.abort()
        error = CloseResponse(error=ERR_PAST_CREDIT, connect_id=dest.connect_id)
        self._send(PacketType.CLOSE_RSP, error)

    def close_request(self, connect_id: int) -> None:
        dest = self.connections.get(connect_id)
        if dest is not None:
            self._forget(dest)
            dest.close()
        self._send(PacketType.CLOSE_RSP, CloseResponse(connect_id=connect_id))

    def drain(self) -> None:
        """This server is shutting down: ``DRAIN``, so the agent sends its new dials to
        other servers (the connections open carry on until the stream ends)."""
        self._send(PacketType.DRAIN, Drain())

    def close(self) -> None:
        """The agent stream is gone: abort its connections, cancel its dials."""
        self._closed = True
        for dial_ in self.pending.values():
            dial_.canceled = True
            if dial_.task is not None:
                dial_.task.cancel()
        self.pending.clear()
        for dest in list(self.connections.values()):
            self._forget(dest)
            dest.abort()
        self._paused.clear()

    # --- dialling -------------------------------------------------------------------------

    async def _dial(self, protocol: str, address: str, random: int, dial_: _PendingDial) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()

        def factory() -> _Destination:
            dial_.made = _Destination(self)
            return dial_.made

        try:
            dest = await dial(protocol, address, factory, self.config.dial_timeout)
        except asyncio.CancelledError:
            if dial_.made is not None:
                dial_.made.abort()  # connected just as it was canceled: never leak it
            return
        except DialError as exc:
            metrics.AGENT_DIAL_DURATION.observe(loop.time() - started)
            if self.pending.pop(random, None) is None:
                return
            metrics.AGENT_DIALS.labels("timeout" if exc.timeout else "dial_error").inc()
            log.log(V(2), "agent %s: dial %s failed: %s", self.agent, address, exc)
            self._send(PacketType.DIAL_RSP, DialResponse(error=str(exc), random=random))
            return
        if dial_.canceled or self._closed or self.pending.pop(random, None) is None:
            dest.abort()
            return
        metrics.AGENT_DIAL_DURATION.observe(loop.time() - started)
        if dest.closed or dest.transport is None or dest.transport.is_closing():
            # Gone before we could answer: report it as a dial failure.
            metrics.AGENT_DIALS.labels("dial_error").inc()
            error = f"dial {protocol} {address}: connection closed"
            self._send(PacketType.DIAL_RSP, DialResponse(error=error, random=random))
            return
        connect_id = self._next_id
        self._next_id += 2
        self.connections[connect_id] = dest
        metrics.AGENT_DIALS.labels("ok").inc()
        metrics.AGENT_CONNECTIONS.inc()
        log.log(V(3), "agent %s: connection %d to %s open", self.agent, connect_id, address)
        self._send(PacketType.DIAL_RSP, DialResponse(connect_id=connect_id, random=random))
        dest.established(connect_id, self.flow.tunnel(self.call, connect_id, dest))

    # --- from the destinations ------------------------------------------------------------

    def send_data(self, dest: _Destination, data: bytes) -> None:
        if dest.closed or dest.connect_id not in self.connections:
            return
        metrics.AGENT_BYTES.labels(metrics.FROM_DESTINATION).add(len(data))
        try:
            self.call.send_data_packet(dest.connect_id, data)
        except GrpcError:
            return  # the stream is gone: its end closes everything
        if dest.flow is not None:
            self.flow.sent(dest.flow, len(data))
        if self.call.outbound_pending() >= REVERSE_SEND_HIGH_WATER:
            dest.pause()
            if not self._paused:
                self.call.when_drained(self._drained, below=REVERSE_SEND_HIGH_WATER)
            self._paused.append(dest)

    def _drained(self) -> None:
        paused, self._paused = self._paused, []
        for dest in paused:
            dest.resume()

    def destination_lost(self, dest: _Destination) -> None:
        if dest.closed or dest.connect_id not in self.connections:
            dest.closed = True
            return
        dest.closed = True
        self._forget(dest)
        log.log(
            V(3), "agent %s: connection %d closed by its destination", self.agent, dest.connect_id
        )
        self._send(PacketType.CLOSE_RSP, CloseResponse(connect_id=dest.connect_id))

    # --- helpers --------------------------------------------------------------------------

    def _forget(self, dest: _Destination) -> None:
        if self.connections.pop(dest.connect_id, None) is not None:
            metrics.AGENT_CONNECTIONS.dec()
        if dest.flow is not None:
            self.flow.close(dest.flow)
            dest.flow = None

    def _send(self, ptype: PacketType, payload: DialResponse | CloseResponse | Drain) -> None:
        if self._closed:
            return
        try:
            self.call.send(encode_packet(Packet(ptype, payload)))
        except GrpcError as exc:
            log.log(V(4), "agent %s: send dropped: %s", self.agent, exc)


_DATA = int(PacketType.DATA)
_CLOSE_REQ = int(PacketType.CLOSE_REQ)
_DIAL_REQ = int(PacketType.DIAL_REQ)
_DIAL_CLS = int(PacketType.DIAL_CLS)
_FLOW_CREDIT = int(PacketType.FLOW_CREDIT)


def receive(reverse: ReverseTunnels, ptype: int, connect_id: int, message: bytes) -> bool:
    """Give ``reverse`` a packet of its agent stream if it is node-to-cp.v1's: DIAL_REQ,
    DIAL_CLS, and DATA, CLOSE_REQ or FLOW_CREDIT of an odd connectID. False: not ours, the
    router's.
    Raises ``CodecError`` for a message that does not decode."""
    if connect_id & 1:
        if ptype == _FLOW_CREDIT:
            packet = decode_packet(message)
            if isinstance(packet.payload, FlowCredit):
                reverse.credit(connect_id, packet.payload.bytes)
            return True
        if ptype == _DATA:
            peeked = peek_data(message)
            if peeked is not None:
                reverse.data(connect_id, peeked[1])
            return True
        if ptype == _CLOSE_REQ:
            reverse.close_request(connect_id)
            return True
        return False
    if ptype == _DIAL_REQ:
        packet = decode_packet(message)
        if isinstance(packet.payload, DialRequest):
            request = packet.payload
            reverse.dial_request(request.protocol, request.address, request.random)
        return True
    if ptype == _DIAL_CLS:
        packet = decode_packet(message)
        if isinstance(packet.payload, CloseDial):
            reverse.dial_close(packet.payload.random)
        return True
    return False
