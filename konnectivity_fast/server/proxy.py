"""The proxy-server's gRPC adapter: ``ProxyServer`` drives one ``tunnel.Router``.

Two callback-style services (``transport.grpc``: ``open_call`` returns the call's sink, no
task per call) feed the router:

- ``ProxyServer.frontend_service``: ``/ProxyService/Proxy`` streams (kube-apiserver's
  konnectivity-client), served on a Unix socket (h2c) or TCP+mTLS;
- ``ProxyServer.agent_service``: ``/AgentService/Connect`` streams, served on TCP+TLS.

The listeners that serve them are in ``listeners``.

Each received message is peeked at with the codec: DATA takes the router's fast path
(``route_frontend_data``/``route_agent_data``) and its bytes are forwarded unchanged on the
target's call; anything else is decoded and given to ``receive_from_frontend`` /
``receive_from_agent``, whose effects (``tunnel.events``) are carried out in order. One
loop timer follows ``Router.get_timer()`` (``--backend-dial-timeout``).

Extensions (``wire.contract``): a stream's ``kf-capabilities`` request metadata is
intersected with what this server offers (``ProxyServer.extensions``); a non-empty result
is echoed in the stream's response headers and kept on its ``Backend`` or ``Frontend``.
An empty result sends nothing, so upstream's peers see upstream's headers. An agent stream
that negotiated ``server-endpoints.v1`` also gets ``kf-server-endpoints`` in those headers
(``wire.endpoints``), from ``ProxyServer.server_endpoints``. An agent stream that
negotiated ``node-to-cp.v1`` (offered only with a non-empty allow-list, ``node_to_cp``)
gets a ``server.reverse.ReverseTunnels``, which takes its DIAL_REQ and DIAL_CLS and the
DATA and CLOSE_REQ of odd connectIDs (agent-initiated connections); on other streams those
go to the router as always (an agent's DIAL_REQ is ignored, as upstream).

Invariants:
- ``Backend.conn`` and a gRPC ``Frontend.conn`` are the ``GrpcCall`` to write to; an
  HTTP-CONNECT ``Frontend.conn`` is its ``http_connect.HttpConnectProtocol``
  (``tunnel_established``, ``write_agent_data``, ``close_frontend``).
- A send on a call that already ended is dropped (upstream logs it and carries on).
- A stream's end is reported to the router once (``remove_*`` are idempotent), after every
  message received on it was processed.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from random import Random
from time import perf_counter
from typing import Any, Protocol

from konnectivity_fast.metrics import server as metrics
from konnectivity_fast.server.buffering import TUNNEL_WRITE_HIGH_WATER, BufferBudget, TunnelBuffer
from konnectivity_fast.server.flow import FlowControl, FlowTunnel, data_size, payload_size
from konnectivity_fast.server.reverse import NodeToCpConfig, ReverseTunnels
from konnectivity_fast.server.reverse import receive as receive_reverse
from konnectivity_fast.transport.call import CALL_SEND_HIGH_WATER
from konnectivity_fast.transport.grpc import CallSink, GrpcCall, GrpcError
from konnectivity_fast.transport.ratelog import RateLimitedLog
from konnectivity_fast.tunnel import (
    Backend,
    CloseFrontend,
    ConnectionDuration,
    DialDuration,
    DialFailure,
    Effect,
    EndPeer,
    ForwardDial,
    Frontend,
    Message,
    PeeringRouter,
    PendingDial,
    RetireBackend,
    Router,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
)
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.codec import decode_packet, encode_packet, peek_packet
from konnectivity_fast.wire.contract import (
    AGENT_SERVICE,
    CONNECT_PATH,
    MD_AGENT_ID,
    MD_AGENT_IDENTIFIERS,
    MD_AUTHORIZATION,
    MD_SERVER_COUNT,
    MD_SERVER_ID,
    NO_EXTENSIONS,
    PROXY_PATH,
    PROXY_SERVICE,
    AgentIdentifiers,
    AgentMetadataError,
    DialBalance,
    Extension,
    ExtensionSet,
    FrontendMode,
    ProxyStrategy,
    agent_from_metadata,
    capabilities_metadata,
    check_extensions,
    negotiate_extensions,
    unmarshal_error,
)
from konnectivity_fast.wire.endpoints import (
    MD_FORWARDED_FROM,
    MD_SERVER_ENDPOINTS,
    Address,
    format_server_endpoints,
)
from konnectivity_fast.wire.errors import CodecError, StatusCode
from konnectivity_fast.wire.packets import FlowCredit, Packet, PacketType

__all__ = ["ProxyServer"]

log = logging.getLogger(__name__)
# Refused agent streams: one line each, but a peer opening streams in a loop gets a few.
_log_refused = RateLimitedLog(log)

# Packets an agent may send before its token review ends: it waits for our headers first,
# so anything beyond a handful is a broken or hostile peer.
MAX_PACKETS_BEFORE_AUTH = 16


class DialForwarder(Protocol):
    """Server peering's adapter (``server.peering.PeerForwarder``): carries out
    ``ForwardDial`` and ``EndPeer``."""

    def forward(self, dial: PendingDial, protocol: str) -> None: ...

    def end(self, backend: Backend) -> None: ...


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


class _NullSink:
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


class _FrontendStream:
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


class _AgentStream:
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


class _AuthenticatingSink:
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
        self.stream: _AgentStream | None = None
        self.task: asyncio.Task[None] | None = None

    async def authenticate(
        self, auth: Authenticator, tokens: list[str], identifiers: AgentIdentifiers
    ) -> None:
        try:
            await auth.authenticate(tokens)
        except Exception as exc:  # any failure refuses this agent only, as upstream
            if not self.gone:
                _log_refused("agent %s refused: %s", self.agent_id, exc)
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


class _FrontendService:
    __slots__ = ("server",)

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def open_call(self, call: GrpcCall) -> CallSink:
        if call.path != PROXY_PATH:
            call.finish(StatusCode.UNIMPLEMENTED, _unknown_path(call.path, PROXY_SERVICE))
            return _NullSink()
        return self.server._open_frontend(call)


class _AgentService:
    __slots__ = ("server",)

    def __init__(self, server: ProxyServer) -> None:
        self.server = server

    def open_call(self, call: GrpcCall) -> CallSink:
        if call.path != CONNECT_PATH:
            call.finish(StatusCode.UNIMPLEMENTED, _unknown_path(call.path, AGENT_SERVICE))
            return _NullSink()
        return self.server._open_agent(call)


class ProxyServer:
    """The routing state of one proxy-server and the gRPC services that feed it.

    ``server_id``: ``--server-id`` (default: a random UUID, as upstream). ``server_count``:
    ``--server-count``, sent to agents. ``strategies``: the validated
    ``--proxy-strategies``. ``dial_timeout``: ``--backend-dial-timeout`` in seconds.
    ``budget``: the buffers toward slow frontends (``buffering``; tests shrink it).
    ``authenticator``: agent token auth (``--agent-namespace``), or None.
    ``extensions``: the extensions this server offers to agents and frontends
    (``wire.contract``; every implemented one by default). ``dial_balance``: how a dial
    chooses among its strategy's candidate agents (``tunnel.balance``; upstream's random
    choice by default). ``server_endpoints``: every replica's agent-facing address, this
    one's included (``server.directory.ServerDirectory.agent_endpoints``), read for each
    agent stream that negotiated ``server-endpoints.v1``; None or empty: no header.
    ``forward_dials``: server peering (``tunnel.peering``); dials no agent takes go to
    ``forwarder``, set before the listeners start. ``node_to_cp``: agent-initiated
    connections (``server.reverse``); ``node-to-cp.v1`` is offered iff it is given with a
    non-empty allow-list, whatever ``extensions`` says.
    """

    def __init__(
        self,
        *,
        server_id: str | None = None,
        server_count: int = 1,
        strategies: Sequence[str] = (ProxyStrategy.DEFAULT,),
        dial_timeout: float = 0.0,
        rng: Random | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        budget: BufferBudget | None = None,
        authenticator: Authenticator | None = None,
        extensions: ExtensionSet = NO_EXTENSIONS,
        dial_balance: DialBalance = DialBalance.RANDOM,
        server_endpoints: Callable[[], Mapping[str, Address]] | None = None,
        forward_dials: bool = False,
        node_to_cp: NodeToCpConfig | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        if node_to_cp is not None and node_to_cp.allowed:
            extensions = extensions | {Extension.NODE_TO_CP}
        else:
            node_to_cp = None
            extensions = extensions - {Extension.NODE_TO_CP}
        self.node_to_cp = node_to_cp
        self.reverse: dict[Backend, ReverseTunnels] = {}
        self.extensions = check_extensions(extensions)
        self.server_id = server_id or str(uuid.uuid4())
        self.server_count = server_count
        self.server_endpoints = server_endpoints
        router_class = PeeringRouter if forward_dials else Router
        self.router = router_class(
            strategies, rng or Random(), dial_timeout=dial_timeout, balance=dial_balance
        )
        self.forwarder: DialForwarder | None = None
        self.frontend_service = _FrontendService(self)
        self.agent_service = _AgentService(self)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._closed = False
        self.budget = budget or BufferBudget()
        self.flow = FlowControl()
        self.authenticator = authenticator
        self._gauges = (0, 0)  # pending dials, established connections, as last set
        self._backend_gauges: tuple[object, ...] | None = None  # as last set

    # --- streams --------------------------------------------------------------------------

    def _open_frontend(self, call: GrpcCall, *, forwarded: bool = False) -> CallSink:
        """``forwarded``: from the peer listener; a stream naming ``kf-forwarded-from`` is
        forwarded too, wherever it came (server peering's hop limit)."""
        metrics.grpc_connection_opened(metrics.PROXY)
        if self.forwarder is not None and not forwarded:
            forwarded = any(key == MD_FORWARDED_FROM for key, _ in call.metadata)
        accepted = self._negotiate(call)
        if accepted:  # else the headers go out with the first message, as upstream's
            try:
                call.send_headers(capabilities_metadata(accepted))
            except (KeyError, RuntimeError) as exc:  # the stream is already gone
                log.log(V(2), "frontend stream: sending headers failed: %s", exc)
                return _NullSink(metrics.PROXY)
        frontend = self.router.add_frontend(FrontendMode.GRPC, call, accepted, forwarded=forwarded)
        return _FrontendStream(self, frontend)

    def _negotiate(self, call: GrpcCall) -> ExtensionSet:
        """The extensions both this server and the stream's client offer."""
        accepted = negotiate_extensions(call.metadata, self.extensions)
        if accepted:
            log.log(V(2), "stream %d: extensions %s", call.stream_id, ",".join(sorted(accepted)))
        return accepted

    def _open_agent(self, call: GrpcCall) -> CallSink:
        metrics.grpc_connection_opened(metrics.CONNECT)
        agent_ids: list[str] = []
        identifiers: list[str] = []
        tokens: list[str] = []
        for key, value in call.metadata:
            if key == MD_AGENT_ID:
                agent_ids.append(value)
            elif key == MD_AGENT_IDENTIFIERS:
                identifiers.append(value)
            elif key == MD_AUTHORIZATION:
                tokens.append(value)
        try:
            agent_id, parsed = agent_from_metadata(agent_ids, identifiers)
        except AgentMetadataError as exc:
            _log_refused("agent stream refused: %s", exc)
            call.finish(StatusCode.UNKNOWN, str(exc))
            return _NullSink(metrics.CONNECT)
        if self.authenticator is None:
            return self._admit_agent(call, agent_id, parsed) or _NullSink(metrics.CONNECT)
        sink = _AuthenticatingSink(self, call, agent_id)
        sink.task = self.loop.create_task(sink.authenticate(self.authenticator, tokens, parsed))
        return sink

    def _admit_agent(
        self, call: GrpcCall, agent_id: str, identifiers: AgentIdentifiers
    ) -> _AgentStream | None:
        """Send ``serverid``/``servercount`` (and the accepted extensions, if any), then
        route to the agent (pkg/server/server.go ``Connect``)."""
        accepted = self._negotiate(call)
        headers = [(MD_SERVER_ID, self.server_id), (MD_SERVER_COUNT, str(self.server_count))]
        headers += capabilities_metadata(accepted) + self._endpoints_metadata(accepted)
        try:
            call.send_headers(headers)
        except (KeyError, RuntimeError) as exc:  # the stream is already gone (reset)
            log.log(V(2), "agent %s: sending headers failed: %s", agent_id, exc)
            return None
        backend = self.router.add_backend(agent_id, identifiers, call, accepted)
        if Extension.FLOW in accepted:
            self.flow.agents.add(call)
        reverse = None
        if Extension.NODE_TO_CP in accepted and self.node_to_cp is not None:
            reverse = ReverseTunnels(call, agent_id, self.node_to_cp, self.flow)
            self.reverse[backend] = reverse
        self._update_backend_gauges()
        return _AgentStream(self, backend, reverse)

    def _endpoints_metadata(self, accepted: ExtensionSet) -> list[tuple[str, str]]:
        """``kf-server-endpoints`` for an agent stream that negotiated it, else nothing."""
        if Extension.SERVER_ENDPOINTS not in accepted or self.server_endpoints is None:
            return []
        endpoints = format_server_endpoints(self.server_endpoints())
        return [(MD_SERVER_ENDPOINTS, endpoints)] if endpoints else []

    def _remove_frontend(self, frontend: Frontend) -> None:
        if not frontend.closed:
            self._apply(self.router.remove_frontend(frontend))

    def _remove_backend(self, backend: Backend) -> None:
        self.flow.agents.discard(backend.conn)
        reverse = self.reverse.pop(backend, None)
        if reverse is not None:
            reverse.close()
        if not backend.closed:
            self._apply(self.router.remove_backend(backend, self.loop.time()))
            self._update_backend_gauges()

    def _frontend_failed(self, frontend: Frontend, status: int, message: str) -> None:
        call: GrpcCall = frontend.conn
        call.finish(status, message)
        self._remove_frontend(frontend)

    def _backend_failed(self, backend: Backend, status: int, message: str) -> None:
        call: GrpcCall = backend.conn
        call.finish(status, message)
        self._remove_backend(backend)

    # --- effects --------------------------------------------------------------------------

    def _send(self, call: GrpcCall, message: Message, segment: str, ptype: int) -> None:
        data: Any = encode_packet(message) if isinstance(message, Packet) else message
        metrics.observe_packet(segment, ptype)
        try:
            call.send(data)
        except GrpcError as exc:
            # Upstream logs a failed send and carries on; the stream's end cleans up.
            metrics.observe_stream_error(segment, exc.status, ptype)
            log.debug("send on stream %d dropped: %s", call.stream_id, exc)

    def _to_frontend(
        self,
        frontend: Frontend,
        message: Message,
        ptype: int,
        agent: GrpcCall | None,
        *,
        timed: bool = True,
    ) -> None:
        """Queue ``message`` on ``frontend``; charge it to the tunnel's buffer if the
        frontend is behind (``buffering``). ``agent``: the call it came from. ``timed``:
        a write upstream makes through the connection record, observed in
        ``frontend_write_duration_seconds`` (not the server's own answers)."""
        started = perf_counter()
        if frontend.mode is not FrontendMode.GRPC:  # HTTP-CONNECT: only ever DATA
            frontend.conn.write_agent_data(message, agent)
            if timed:
                metrics.observe_frontend_write_latency(perf_counter() - started)
            return
        call: GrpcCall = frontend.conn
        self._send(call, message, metrics.SEGMENT_TO_CLIENT, ptype)
        if ptype == _DATA and not isinstance(message, Packet):
            frontend.bytes_down += len(message)
        if timed:
            metrics.observe_frontend_write_latency(perf_counter() - started)
        if agent is not None and ptype == _DATA and agent in self.flow.agents:
            stream = call.sink
            if isinstance(stream, _FrontendStream):  # flow.v1: its window, not a budget
                connect_id, size = data_size(message)
                self.flow.received(stream.flow_tunnel(agent, connect_id), size)
            return
        if agent is None or call.outbound_pending() < TUNNEL_WRITE_HIGH_WATER:
            return
        sink = call.sink
        if not isinstance(sink, _FrontendStream):
            return
        buffer = sink.buffer
        if not buffer.blocked:
            buffer.blocked = True
            call.when_drained(functools.partial(self.budget.release, buffer))
        self.budget.charge(buffer, len(message) if not isinstance(message, Packet) else 0, agent)

    def _flow_credit(self, backend: Backend, message: bytes, connect_id: int) -> None:
        """A FLOW_CREDIT from a flow.v1 agent: its tunnel may send more."""
        frontend = self.router.route_agent_data(backend, connect_id)
        if frontend is None:
            return  # closed meanwhile: the credit is moot
        source = frontend.conn if frontend.mode is not FrontendMode.GRPC else frontend.conn.sink
        try:
            packet = decode_packet(message)
        except CodecError as exc:
            self._backend_failed(backend, StatusCode.INTERNAL, unmarshal_error(exc))
            return
        if isinstance(packet.payload, FlowCredit) and source is not None:
            tunnel = source.flow_tunnel(backend.conn, connect_id)
            self.flow.credit(tunnel, packet.payload.bytes)

    def _message_type(self, message: Message) -> int:
        if isinstance(message, Packet):
            return int(message.type)
        try:
            return int(peek_packet(message)[0])
        except CodecError:  # cannot happen: received messages were peeked already
            return -1

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SendToAgent):
                if effect.backend.conn is None:  # a peer stream not open yet (tunnel.peering)
                    continue
                self._send(
                    effect.backend.conn,
                    effect.message,
                    metrics.SEGMENT_TO_AGENT,
                    self._message_type(effect.message),
                )
            elif isinstance(effect, SendToFrontend):
                frontend = effect.frontend
                backend = frontend.backend
                self._to_frontend(
                    frontend,
                    effect.message,
                    self._message_type(effect.message),
                    backend.conn if backend is not None else None,
                    timed=effect.via_connection,
                )
            elif isinstance(effect, TunnelEstablished):
                effect.frontend.conn.tunnel_established(effect.connect_id)
            elif isinstance(effect, CloseFrontend):
                effect.frontend.conn.close_frontend(effect.reason, effect.error)
            elif isinstance(effect, DialFailure):
                metrics.observe_dial_failure(effect.reason.value)
            elif isinstance(effect, DialDuration):
                metrics.observe_dial_latency(effect.seconds)
            elif isinstance(effect, ConnectionDuration):
                pass  # v0.36.0 exports no connection-duration histogram
            elif isinstance(effect, RetireBackend):
                backend = effect.backend
                backend.conn.finish(StatusCode.OK)
                self._apply(self.router.remove_backend(backend, self.loop.time()))
                self._update_backend_gauges()
            elif isinstance(effect, ForwardDial):
                self._forward(effect)
            elif isinstance(effect, EndPeer) and self.forwarder is not None:
                for message in effect.final:
                    self._send(
                        effect.backend.conn,
                        message,
                        metrics.SEGMENT_TO_AGENT,
                        self._message_type(message),
                    )
                self.forwarder.end(effect.backend)
        self._arm_timer()
        self._update_gauges()

    def _forward(self, effect: ForwardDial) -> None:
        """Server peering: offer the dial to the peers, or fail it at once without any."""
        if self.forwarder is not None:
            self.forwarder.forward(effect.dial, effect.protocol)
        elif isinstance(self.router, PeeringRouter):
            self._apply(self.router.peer_unavailable(effect.dial))

    def _update_gauges(self) -> None:
        """Set the routing gauges that changed. Like upstream's, the pending-dial and
        established gauges appear with their first change; unlike upstream's they never
        go stale after a frontend stream's cleanup."""
        router = self.router
        current = (router.pending_dials, router.established_connections)
        if current != self._gauges:
            if current[0] != self._gauges[0]:
                metrics.set_pending_dial_count(current[0])
            if current[1] != self._gauges[1]:
                metrics.set_established_connection_count(current[1])
            self._gauges = current

    def _update_backend_gauges(self) -> None:
        """Set the agent gauges, when they changed: an agent reconnecting (or a flapping
        one) adds and removes a stream of an agent the gauges already count."""
        managers = self.router.backend_managers
        ready = managers.ready_backends()
        current = (*ready.items(), managers.ready_backend_connections)
        if current == self._backend_gauges:
            return
        self._backend_gauges = current
        for strategy, count in ready.items():
            metrics.set_ready_backends(strategy, count)
        metrics.set_backend_count_deprecated(managers.ready_backend_connections)

    # --- timer ----------------------------------------------------------------------------

    def _arm_timer(self) -> None:
        when = self.router.get_timer()
        if when == self._timer_when or self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        now = self.loop.time()
        # Upstream retires an agent whose DIAL_REQ could not even be sent within
        # --backend-dial-timeout (pkg/server/server.go sendDialRequestToBackend): here,
        # output queued that the agent does not read.
        stalled = {
            dial.backend
            for dial in self.router.dials_due(now)
            if not dial.backend.closed
            and dial.backend.conn is not None
            and dial.backend.conn.send_blocked()
        }
        self._apply(self.router.handle_timer(now))
        for backend in stalled:
            log.info("agent %s does not read its stream: retiring it", backend.agent_id)
            self._apply(self.router.retire_backend(backend))

    def drain_agents(self) -> None:
        """Shutting down: tell the agent streams that negotiated node-to-cp.v1 to send
        their new dials elsewhere (``DRAIN``; upstream's agents get nothing)."""
        for reverse in self.reverse.values():
            reverse.drain()

    def close(self) -> None:
        """Stop the timer and close agent-initiated connections (the listeners are closed by
        their handles)."""
        self._closed = True
        for reverse in self.reverse.values():
            reverse.close()
        self.reverse.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
