"""The proxy-server's gRPC adapter: ``ProxyServer`` drives one ``tunnel.Router``.

Two callback-style services (``transport.grpc``: ``open_call`` returns the call's sink, no
task per call) feed the router:

- ``ProxyServer.frontend_service``: ``/ProxyService/Proxy`` streams (kube-apiserver's
  konnectivity-client), served on a Unix socket (h2c) or TCP+mTLS;
- ``ProxyServer.agent_service``: ``/AgentService/Connect`` streams, served on TCP+TLS.

The listeners that serve them are in ``listeners``; each accepted call gets a sink from
``streams`` (``FrontendStream``, ``AgentStream``), which hands its messages back here.

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
from konnectivity_fast.server.buffering import TUNNEL_WRITE_HIGH_WATER, BufferBudget
from konnectivity_fast.server.flow import FlowControl, data_size
from konnectivity_fast.server.reverse import NodeToCpConfig, ReverseTunnels
from konnectivity_fast.server.streams import (
    AgentStream,
    AuthenticatingSink,
    Authenticator,
    FrontendStream,
    MethodService,
    NullSink,
    log_refused,
)
from konnectivity_fast.transport.grpc import CallSink, GrpcCall, GrpcError
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


_DATA = int(PacketType.DATA)


class DialForwarder(Protocol):
    """Server peering's adapter (``server.peering.PeerForwarder``): carries out
    ``ForwardDial`` and ``EndPeer``."""

    def forward(self, dial: PendingDial, protocol: str) -> None: ...

    def end(self, backend: Backend) -> None: ...


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
        self.frontend_service = MethodService(PROXY_PATH, PROXY_SERVICE, self._open_frontend)
        self.agent_service = MethodService(CONNECT_PATH, AGENT_SERVICE, self._open_agent)
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
                return NullSink(metrics.PROXY)
        frontend = self.router.add_frontend(FrontendMode.GRPC, call, accepted, forwarded=forwarded)
        return FrontendStream(self, frontend)

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
            log_refused("agent stream refused: %s", exc)
            call.finish(StatusCode.UNKNOWN, str(exc))
            return NullSink(metrics.CONNECT)
        if self.authenticator is None:
            return self._admit_agent(call, agent_id, parsed) or NullSink(metrics.CONNECT)
        sink = AuthenticatingSink(self, call, agent_id)
        sink.task = self.loop.create_task(sink.authenticate(self.authenticator, tokens, parsed))
        return sink

    def _admit_agent(
        self, call: GrpcCall, agent_id: str, identifiers: AgentIdentifiers
    ) -> AgentStream | None:
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
        return AgentStream(self, backend, reverse)

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
            if isinstance(stream, FrontendStream):  # flow.v1: its window, not a budget
                connect_id, size = data_size(message)
                self.flow.received(stream.flow_tunnel(agent, connect_id), size)
            return
        if agent is None or call.outbound_pending() < TUNNEL_WRITE_HIGH_WATER:
            return
        sink = call.sink
        if not isinstance(sink, FrontendStream):
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
