"""The sinks of the proxy-server's gRPC calls (``transport.grpc.CallSink``): what
``server.proxy.ProxyServer`` gives each ``/ProxyService/Proxy`` and ``/AgentService/Connect``
call it accepts, and the services that choose them by path (``MethodService``).

- ``FrontendStream``: one frontend's ``Proxy`` call; DATA takes the router's fast path to
  its agent, anything else is decoded and routed. It is the call's buffer toward the
  frontend (``server.buffering``) and, with ``flow.v1``, its ``server.flow.FlowSource``.
- ``AgentStream``: one admitted agent's ``Connect`` call; ``FLOW_CREDIT`` goes to
  ``server.flow``, an agent-initiated connection's packets to ``server.reverse``, DATA to
  its frontend, anything else to the router.
- ``AuthenticatingSink``: a ``Connect`` call while its token is reviewed.
- ``NullSink``: a refused call.

Invariants:
- A call's end removes its frontend or agent once, after every message the call delivered
  was handed on: a sink may report both the clean end and the close, and the server's
  ``_remove_frontend``/``_remove_backend`` are idempotent.
- A frontend's reading is paused only while its agent's call is behind
  (``CALL_SEND_HIGH_WATER``) or, with ``flow.v1``, while its credit is spent; it resumes
  when neither holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from konnectivity_fast.metrics import server as metrics
from konnectivity_fast.server.buffering import TunnelBuffer
from konnectivity_fast.server.flow import FlowTunnel, payload_size
from konnectivity_fast.server.reverse import ReverseTunnels
from konnectivity_fast.server.reverse import receive as receive_reverse
from konnectivity_fast.transport.call import CALL_SEND_HIGH_WATER
from konnectivity_fast.transport.grpc import CallSink, GrpcCall
from konnectivity_fast.transport.ratelog import RateLimitedLog
from konnectivity_fast.tunnel import Backend, Frontend
from konnectivity_fast.wire.codec import decode_packet, peek_packet
from konnectivity_fast.wire.contract import (
    AgentIdentifiers,
    unmarshal_error,
)
from konnectivity_fast.wire.errors import CodecError, StatusCode
from konnectivity_fast.wire.packets import PacketType

if TYPE_CHECKING:
    from konnectivity_fast.server.proxy import ProxyServer

__all__ = [
    "MAX_PACKETS_BEFORE_AUTH",
    "AgentStream",
    "AuthenticatingSink",
    "Authenticator",
    "FrontendStream",
    "MethodService",
    "NullSink",
    "log_refused",
]

log = logging.getLogger(__name__)
# Refused agent streams: one line each, but a peer opening streams in a loop gets a few.
log_refused = RateLimitedLog(log)

# Packets an agent may send before its token review ends: it waits for our headers first,
# so anything beyond a handful is a broken or hostile peer.
MAX_PACKETS_BEFORE_AUTH = 16


class Authenticator(Protocol):
    """Agent token checks (``server.auth.TokenAuthenticator``): raise to refuse, with
    upstream's message."""

    async def authenticate(self, authorization_values: list[str]) -> None: ...


_DATA = int(PacketType.DATA)
_FLOW_CREDIT = int(PacketType.FLOW_CREDIT)
# Packets an agent sends only for node-to-cp.v1 (server.reverse), whatever their connectID.
_REVERSE_CONTROL = frozenset({int(PacketType.DIAL_REQ), int(PacketType.DIAL_CLS)})


def _unknown_path(path: str, service: str) -> str:
    """grpc-go's UNIMPLEMENTED message for a path this server does not serve."""
    svc, _, method = path.lstrip("/").rpartition("/")
    if svc == service:
        return f"unknown method {method} for service {svc}"
    return f"unknown service {svc or method}"


def _receive_cancelled(segment: str) -> None:
    """A stream reset by its peer, or whose connection went: upstream's receive loop gets
    Canceled and counts it (``stream_errors_total{packet_type="Unknown"}``)."""
    metrics.observe_stream_error_no_packet(segment, StatusCode.CANCELLED)


class NullSink:
    """The sink of a call that was refused: input is ignored."""

    __slots__ = ("_method",)

    def __init__(self, method: str | None = None) -> None:
        self._method = method

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        pass

    def on_end(self, call: GrpcCall) -> None:
        pass

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        if self._method is not None:
            metrics.grpc_connection_closed(self._method)


class FrontendStream:
    """The sink of one ``Proxy`` call, and its buffer toward the frontend (``buffering``).
    ``held``: its reading is paused until the agent call it writes to drains."""

    __slots__ = ("buffer", "credit_paused", "ended", "flow", "frontend", "held", "server")

    def __init__(self, server: ProxyServer, frontend: Frontend) -> None:
        self.server = server
        self.frontend = frontend
        call: GrpcCall = frontend.conn
        self.buffer = TunnelBuffer(call.outbound_pending, self._abandon)
        self.held = False
        self.ended = False  # the client half-closed (a clean EOF)
        self.flow: FlowTunnel | None = None  # flow.v1 with its agent (server/flow.py)
        self.credit_paused = False

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        server = self.server
        frontend = self.frontend
        try:
            ptype, connect_id = peek_packet(message)
        except CodecError as exc:
            server._frontend_failed(frontend, StatusCode.INTERNAL, unmarshal_error(exc))
            return
        metrics.observe_packet(metrics.SEGMENT_FROM_CLIENT, ptype)
        if ptype == _DATA:
            frontend.bytes_up += len(message)
            backend = server.router.route_frontend_data(frontend, connect_id)
            if backend is not None:
                agent: GrpcCall = backend.conn
                server._send(agent, message, metrics.SEGMENT_TO_AGENT, _DATA)
                if agent in server.flow.agents:
                    tunnel = self.flow_tunnel(agent, connect_id)
                    server.flow.sent(tunnel, payload_size(message))
                if not self.held and agent.outbound_pending() >= CALL_SEND_HIGH_WATER:
                    # The agent is behind: pause this frontend's stream, and only it.
                    self.held = True
                    call.pause_reading()
                    agent.when_drained(self._agent_drained)
                return
        try:
            packet = decode_packet(message)
        except CodecError as exc:
            server._frontend_failed(frontend, StatusCode.INTERNAL, unmarshal_error(exc))
            return
        server._apply(
            server.router.receive_from_frontend(frontend, packet, server.loop.time(), message)
        )
        backend = frontend.backend
        if ptype == _DATA and backend is not None and backend.conn in server.flow.agents:
            # The stream's first DATA, sent by the router (it learns the connection).
            tunnel = self.flow_tunnel(backend.conn, frontend.connect_id)
            server.flow.sent(tunnel, payload_size(message))

    def _agent_drained(self) -> None:
        self.held = False
        if not self.credit_paused:
            self.frontend.conn.resume_reading()

    # -- flow.v1: server/flow.py's FlowSource --

    def flow_tunnel(self, agent: GrpcCall, connect_id: int) -> FlowTunnel:
        """This stream's tunnel with ``agent`` (its connection ``connect_id``), made by
        the first DATA or credit either way."""
        tunnel = self.flow
        if tunnel is None:
            tunnel = self.flow = self.server.flow.tunnel(agent, connect_id, self)
        return tunnel

    def flow_backlog(self) -> int:
        call: GrpcCall = self.frontend.conn
        return call.outbound_pending()

    def when_drained_to(self, level: int, callback: Callable[[], None]) -> None:
        call: GrpcCall = self.frontend.conn
        call.when_drained(callback, below=level + 1)

    def pause_for_credit(self) -> None:
        self.credit_paused = True
        call: GrpcCall = self.frontend.conn
        call.pause_reading()

    def resume_for_credit(self) -> None:
        self.credit_paused = False
        if not self.held:
            call: GrpcCall = self.frontend.conn
            call.resume_reading()

    def flow_breached(self) -> None:
        self._abandon()

    @property
    def source_paused(self) -> bool:
        """The admin listing's "paused": this stream is not read until its agent drains
        (or, with flow.v1, until its agent grants credit)."""
        return self.held or self.credit_paused

    def _abandon(self) -> None:
        """The client stalled with its budget spent: reset its stream (CLOSE_REQ for its
        connections goes to the agent as the stream is removed)."""
        call: GrpcCall = self.frontend.conn
        call.cancel()
        self.server._remove_frontend(self.frontend)

    def on_end(self, call: GrpcCall) -> None:
        # Client half-close: the handler returns OK, then the stream's cleanup (upstream's
        # pkg/server/server.go ProxyServer.Proxy and its deferred cleanup).
        self.ended = True
        call.finish(StatusCode.OK)
        self.server._remove_frontend(self.frontend)

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        if error_code and not self.ended:  # reset or connection lost: grpc-go's receive
            _receive_cancelled(metrics.SEGMENT_FROM_CLIENT)  # fails with Canceled
        if self.flow is not None:
            self.server.flow.close(self.flow)
            self.flow = None
        self.server._remove_frontend(self.frontend)
        metrics.grpc_connection_closed(metrics.PROXY)


class AgentStream:
    """The sink of one ``Connect`` call."""

    __slots__ = ("backend", "ended", "reverse", "server")

    def __init__(
        self, server: ProxyServer, backend: Backend, reverse: ReverseTunnels | None = None
    ) -> None:
        self.server = server
        self.backend = backend
        self.ended = False
        self.reverse = reverse  # node-to-cp.v1 negotiated (server.reverse)

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        server = self.server
        backend = self.backend
        try:
            ptype, connect_id = peek_packet(message)
        except CodecError as exc:
            server._backend_failed(backend, StatusCode.INTERNAL, unmarshal_error(exc))
            return
        reverse = self.reverse
        if ptype == _FLOW_CREDIT:
            # Reverse connections (odd IDs) always have credit; forward ones with flow.v1.
            if reverse is not None and connect_id & 1:
                self._to_reverse(reverse, ptype, connect_id, message)
                return
            if call in server.flow.agents:
                server._flow_credit(backend, message, connect_id)
                return
        metrics.observe_packet(metrics.SEGMENT_FROM_AGENT, ptype)
        server.budget.received(call)
        if (
            reverse is not None
            and (connect_id & 1 or ptype in _REVERSE_CONTROL)
            and self._to_reverse(reverse, ptype, connect_id, message)
        ):
            return
        if ptype == _DATA:
            frontend = server.router.route_agent_data(backend, connect_id)
            if frontend is not None:
                server._to_frontend(frontend, message, _DATA, call)
                return
        try:
            packet = decode_packet(message)
        except CodecError as exc:
            server._backend_failed(backend, StatusCode.INTERNAL, unmarshal_error(exc))
            return
        server._apply(
            server.router.receive_from_agent(backend, packet, server.loop.time(), message)
        )

    def _to_reverse(
        self, reverse: ReverseTunnels, ptype: int, connect_id: int, message: bytes
    ) -> bool:
        """``server.reverse.receive``; a message that does not decode fails the stream."""
        try:
            return receive_reverse(reverse, ptype, connect_id, message)
        except CodecError as exc:
            self.server._backend_failed(self.backend, StatusCode.INTERNAL, unmarshal_error(exc))
            return True

    def on_end(self, call: GrpcCall) -> None:
        # Receive EOF: the handler returns OK, then the stream's cleanup (upstream's
        # pkg/server/server.go ProxyServer.Connect).
        self.ended = True
        call.finish(StatusCode.OK)
        self.server._remove_backend(self.backend)

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        if error_code and not self.ended:
            _receive_cancelled(metrics.SEGMENT_FROM_AGENT)
        self.server._remove_backend(self.backend)
        metrics.grpc_connection_closed(metrics.CONNECT)


class AuthenticatingSink:
    """The sink of a ``Connect`` call while its token is reviewed (upstream reviews before
    it reads the stream: pkg/server/server.go ProxyServer.Connect): packets that arrive
    meanwhile (an agent waits for our headers, so there should be none) are kept, up to
    ``MAX_PACKETS_BEFORE_AUTH``, and replayed once the agent is admitted."""

    __slots__ = ("agent_id", "call", "ended", "gone", "held", "server", "stream", "task")

    def __init__(self, server: ProxyServer, call: GrpcCall, agent_id: str) -> None:
        self.server = server
        self.call = call
        self.agent_id = agent_id
        self.held: list[bytes] = []
        self.ended = False
        self.gone = False
        self.stream: AgentStream | None = None
        self.task: asyncio.Task[None] | None = None

    async def authenticate(
        self, auth: Authenticator, tokens: list[str], identifiers: AgentIdentifiers
    ) -> None:
        try:
            await auth.authenticate(tokens)
        except Exception as exc:  # any failure refuses this agent only, as upstream
            if not self.gone:
                log_refused("agent %s refused: %s", self.agent_id, exc)
                self.call.finish(StatusCode.UNKNOWN, str(exc))
            return
        if self.gone:
            return
        self.stream = self.server._admit_agent(self.call, self.agent_id, identifiers)
        if self.stream is None:
            return
        held, self.held = self.held, []
        for message in held:
            self.stream.on_message(self.call, message)
        if self.ended:
            self.stream.on_end(self.call)

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        if self.stream is not None:
            self.stream.on_message(call, message)
        elif len(self.held) < MAX_PACKETS_BEFORE_AUTH:
            self.held.append(message)
        else:
            call.finish(StatusCode.RESOURCE_EXHAUSTED, "too many packets before authentication")

    def on_end(self, call: GrpcCall) -> None:
        if self.stream is not None:
            self.stream.on_end(call)
        else:
            self.ended = True

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        self.gone = True
        if self.stream is not None:
            self.stream.on_closed(call, error_code)
        else:
            metrics.grpc_connection_closed(metrics.CONNECT)
            if self.task is not None:
                self.task.cancel()


class MethodService:
    """A gRPC service of one method: a call to ``path`` (of ``service``) is opened by
    ``open_call``; any other path ends UNIMPLEMENTED with grpc-go's text."""

    __slots__ = ("_open", "_path", "_service")

    def __init__(self, path: str, service: str, open_call: Callable[[GrpcCall], CallSink]) -> None:
        self._path = path
        self._service = service
        self._open = open_call

    def open_call(self, call: GrpcCall) -> CallSink:
        if call.path != self._path:
            call.finish(StatusCode.UNIMPLEMENTED, _unknown_path(call.path, self._service))
            return NullSink()
        return self._open(call)
