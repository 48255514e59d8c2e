"""The proxy-server's routing state, sans-IO: upstream's ``ProxyServer`` bookkeeping.

Theory of operation
-------------------
Frontends are gRPC ``Proxy`` streams or HTTP-CONNECT tunnels; backends are agent
``Connect`` streams. The adapter registers each (``add_frontend``, ``add_backend``), feeds
the router what arrives, reports what ends, and carries out the effects each call returns
(``tunnel.events``), in order. Time is the ``now`` argument (monotonic seconds); randomness
is the ``random.Random`` given at construction.

- A DIAL_REQ picks a backend through the ``--proxy-strategies`` chain and becomes a
  ``PendingDial`` in one global map keyed by its ``random`` (gRPC and HTTP-CONNECT share
  it). The agent's DIAL_RSP takes it out: an error is passed back; a success becomes a
  ``ProxyClientConnection``, established under (agent stream, connectID).
- DATA flows both ways unchanged. ``route_frontend_data``/``route_agent_data`` are the
  fast path: a lookup by connectID, no decoding, no allocation, no state change. ``None``
  means "not the common case": the adapter then decodes the packet and calls
  ``receive_from_frontend``/``receive_from_agent``, which apply every rule.
- CLOSE_REQ goes to the agent; the agent's CLOSE_RSP removes the connection and goes back.
- The rules are upstream's (pkg/server/server.go ``serveRecvFrontend``,
  ``serveRecvBackend``, ``Proxy`` and ``Connect``; pkg/server/tunnel.go
  ``Tunnel.ServeHTTP``), with its error strings and metric labels. Where upstream leaks or
  mis-routes, we differ, and say so where it happens (all listed in docs/differences.md):
  - the pending dials of a lost (or retired) agent stream fail at once; upstream leaves
    them to the client's own timeout;
  - a DIAL_RSP or DIAL_CLS only counts from the stream the dial was sent to, a frontend
    DIAL_CLS only cancels that frontend's own dial, and a DIAL_REQ reusing a pending
    ``random`` is refused rather than overwriting another dial;
  - established connections are keyed by agent *stream* (agents count connectIDs per
    stream, so two streams of one agent may reuse an ID), not by agentID;
  - connections whose frontend left are remembered until the agent's CLOSE_RSP, so the
    agent's in-flight DATA for them is dropped instead of answered with more CLOSE_REQs;
  - one frontend stream holds at most ``MAX_CONNECTIONS_PER_FRONTEND`` dials.

Invariants (checked by tests/tunnel/test_router_properties.py):
- A pending dial or established connection is reachable from the global map, from its
  frontend and from its backend, or from none of them; its frontend and backend are open.
- A closed frontend or backend owns nothing, and nothing is sent to it (the
  ``CloseFrontend`` that ends an HTTP-CONNECT tunnel comes as the router forgets it).
- An HTTP-CONNECT frontend has at most one dial or connection; when it ends the router
  emits ``CloseFrontend`` and forgets it. A gRPC frontend is never closed by the router.
- The router raises only for adapter mistakes (wrong frontend mode, a second HTTP dial),
  never for anything a peer sends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from itertools import count
from random import Random
from typing import Any

from konnectivity_fast.tunnel.backends import BackendManagers
from konnectivity_fast.tunnel.events import (
    CloseFrontend,
    CloseReason,
    ConnectionDuration,
    DialDuration,
    DialFailure,
    DialFailureReason,
    Effect,
    Message,
    RawMessage,
    RetireBackend,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
)
from konnectivity_fast.tunnel.records import (
    Backend,
    Frontend,
    PendingDial,
    ProxyClientConnection,
)
from konnectivity_fast.tunnel.replies import (
    ERR_BACKEND_GONE,
    ERR_BACKEND_NOT_INITIALIZED,
    ERR_BACKEND_UNINITIALIZED,
    ERR_CLOSE_REQ_FAILED,
    ERR_DIAL_TIMEOUT,
    ERR_DUPLICATE_DIAL,
    ERR_FOREIGN_CONNECT_ID,
    ERR_MISMATCHED_IDS,
    ERR_NO_AGENT,
    ERR_TOO_MANY_DIALS,
    close_req,
    close_rsp,
    dial_cls,
    dial_rsp,
    forward,
    payload_of,
    reply,
)
from konnectivity_fast.wire.contract import (
    NO_EXTENSIONS,
    AgentIdentifiers,
    DialBalance,
    ExtensionSet,
    FrontendMode,
)
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

__all__ = [
    "MAX_CLOSING_PER_BACKEND",
    "MAX_CONNECTIONS_PER_FRONTEND",
    "Router",
]

# A conforming client carries one connection per stream (konnectivity-client, both its
# single-use and its reusable tunnel), and upstream forwards DATA of only one connectID per
# stream, so more dials on one stream are useless. The cap bounds the memory a buggy or
# hostile client can pin on one stream (a few hundred bytes per dial) with room to spare.
MAX_CONNECTIONS_PER_FRONTEND = 64
# Connections whose frontend left, awaiting the agent's CLOSE_RSP. Agents answer every
# CLOSE_REQ at once, so this stays tiny; the cap bounds memory if one never does. Evicting
# the oldest only costs a CLOSE_REQ per late DATA, which is what upstream always does.
MAX_CLOSING_PER_BACKEND = 4096
# HTTP-CONNECT dial IDs are non-negative 63-bit integers, like upstream's rand.Int63().
HTTP_RANDOM_BITS = 63


def _owned(frontend: Frontend, connect_id: int) -> ProxyClientConnection | None:
    """``frontend``'s established connection with ``connect_id``, if it has one; on the
    stream's latest backend first (connectIDs are per agent, so two agents' connections
    on one stream may share one, and upstream follows the latest DIAL_REQ)."""
    found = None
    for conn in frontend.connections:
        if conn.connect_id == connect_id:
            if conn.backend is frontend.backend:
                return conn
            found = found or conn
    return found


Handler = Callable[[Any, Packet, float, RawMessage | None], list[Effect]]


class Router:
    """Pending dials, established connections, frontends and backends of one proxy-server.

    ``strategies``: the validated ``--proxy-strategies`` list. ``rng``: every random draw
    (agent choice, HTTP-CONNECT dial IDs). ``dial_timeout``: ``--backend-dial-timeout`` in
    seconds, 0 for none. ``balance``: how a strategy chooses among its candidates
    (``tunnel.balance``; upstream's random choice by default).
    """

    def __init__(
        self,
        strategies: Sequence[str],
        rng: Random,
        *,
        dial_timeout: float = 0.0,
        balance: DialBalance = DialBalance.RANDOM,
    ) -> None:
        if dial_timeout < 0:
            raise ValueError("dial_timeout must be >= 0")
        self.backend_managers = BackendManagers(strategies, rng, balance)
        self._rng = rng
        self._dial_timeout = dial_timeout
        self._ids = count(1)
        self._frontends: dict[int, Frontend] = {}
        self._backends: dict[int, Backend] = {}
        # random -> dial, in creation order, so the first entry expires first.
        self._pending: dict[int, PendingDial] = {}
        self._established = 0
        self._from_frontend: dict[int, Handler] = {
            PacketType.DIAL_REQ: self._on_frontend_dial_req,
            PacketType.DATA: self._on_frontend_data,
            PacketType.CLOSE_REQ: self._on_frontend_close_req,
            PacketType.DIAL_CLS: self._on_frontend_dial_cls,
        }
        self._from_agent: dict[int, Handler] = {
            PacketType.DIAL_RSP: self._on_agent_dial_rsp,
            PacketType.DATA: self._on_agent_data,
            PacketType.CLOSE_RSP: self._on_agent_close_rsp,
            PacketType.DIAL_CLS: self._on_agent_dial_cls,
            PacketType.DRAIN: self._on_agent_drain,
        }

    # --- status -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """``/readyz``: the first strategy's manager holds an agent (upstream's
        pkg/server/server.go NewProxyServer, readiness_manager.go Ready)."""
        return self.backend_managers.ready

    @property
    def pending_dials(self) -> int:
        """The ``pending_backend_dials`` gauge (always current: upstream's goes stale after
        a frontend stream ends)."""
        return len(self._pending)

    @property
    def established_connections(self) -> int:
        """The ``established_connections`` gauge (always current, as above)."""
        return self._established

    @property
    def frontends(self) -> Mapping[int, Frontend]:
        return self._frontends

    @property
    def backends(self) -> Mapping[int, Backend]:
        return self._backends

    def pending_dial(self, random: int) -> PendingDial | None:
        return self._pending.get(random)

    # --- registration -------------------------------------------------------------------

    def add_frontend(
        self,
        mode: FrontendMode,
        conn: Any = None,
        extensions: ExtensionSet = NO_EXTENSIONS,
        *,
        forwarded: bool = False,
    ) -> Frontend:
        """A new ``Proxy`` stream or HTTP-CONNECT request, with the extensions negotiated
        on it; ``forwarded``: a stream a peer server forwarded (never forwarded again)."""
        frontend = Frontend(next(self._ids), mode, conn, extensions, forwarded)
        self._frontends[frontend.id] = frontend
        return frontend

    def add_backend(
        self,
        agent_id: str,
        identifiers: AgentIdentifiers,
        conn: Any = None,
        extensions: ExtensionSet = NO_EXTENSIONS,
    ) -> Backend:
        """A validated, authenticated agent stream whose headers went out, with the
        extensions negotiated on it: it joins every backend manager (pkg/server/server.go
        ``Connect``)."""
        backend = Backend(next(self._ids), agent_id, identifiers, conn, extensions)
        self._backends[backend.id] = backend
        self.backend_managers.add_backend(backend)
        return backend

    def remove_frontend(self, frontend: Frontend) -> list[Effect]:
        """The frontend ended (gRPC EOF, cancel or error; HTTP client gone). Its pending
        dials get DIAL_CLS and its connections CLOSE_REQ, each to its backend (upstream's
        pkg/server/server.go ProxyServer.Proxy, its deferred cleanup)."""
        if frontend.closed:
            return []
        http = frontend.mode is FrontendMode.HTTP_CONNECT
        self._forget_frontend(frontend)
        effects: list[Effect] = []
        for dial in list(frontend.dials.values()):
            self._remove_pending(dial)
            if http:  # as upstream's Tunnel.ServeHTTP; a gRPC stream end is not counted
                effects.append(DialFailure(DialFailureReason.FRONTEND_CLOSE))
            effects.append(SendToAgent(dial.backend, dial_cls(dial.random)))
        for conn in list(frontend.connections):
            self._remove_established(conn)
            # Upstream observes an HTTP tunnel's duration at the agent's CLOSE_RSP that
            # follows; a gRPC stream end is never observed.
            self._remember_closing(conn, conn.start if http else None)
            effects.append(SendToAgent(conn.backend, close_req(conn.connect_id)))
        return effects

    def remove_backend(self, backend: Backend, now: float) -> list[Effect]:
        """The agent stream ended (after its received packets were processed): its
        connections are closed (upstream's serveRecvBackend, its deferred cleanup) and,
        unlike upstream, its pending dials fail now."""
        if backend.closed:
            return []
        backend.closed = True
        del self._backends[backend.id]
        self.backend_managers.remove_backend(backend)
        effects: list[Effect] = []
        for conn in list(backend.connections.values()):
            self._remove_established(conn)
            effects.append(ConnectionDuration(now - conn.start))
            effects.append(self._connection_lost(conn, CloseReason.BACKEND_GONE))
        for start in backend.closing.values():
            if start is not None:
                effects.append(ConnectionDuration(now - start))
        backend.closing.clear()
        effects.extend(self._fail_dials(backend, DialFailureReason.BACKEND_CLOSE))
        return effects

    def retire_backend(self, backend: Backend) -> list[Effect]:
        """Upstream retires an agent stream whose DIAL_REQ send outlasted the dial timeout
        (pkg/server/server.go sendDialRequestToBackend, retireBackend): it stops being
        chosen, is told to go (``RetireBackend``), and its pending dials time out now. Its
        connections close at ``remove_backend``."""
        if backend.closed or backend.retired:
            return []
        backend.retired = backend.draining = True
        self.backend_managers.remove_backend(backend)
        effects: list[Effect] = [RetireBackend(backend)]
        effects.extend(self._fail_dials(backend, DialFailureReason.BACKEND_DIAL_TIMEOUT))
        return effects

    # --- the fast path ------------------------------------------------------------------

    def route_frontend_data(self, frontend: Frontend, connect_id: int) -> Backend | None:
        """The backend to forward a frontend DATA message to, unchanged; None means "take
        the general path" (``receive_from_frontend``). For an HTTP-CONNECT tunnel pass its
        ``connect_id``; None then means drop the bytes (the tunnel is ending)."""
        if connect_id == frontend.connect_id and connect_id and not frontend.stopped:
            backend = frontend.backend
            if backend is not None and not backend.closed:
                return backend
        return None

    def route_agent_data(self, backend: Backend, connect_id: int) -> Frontend | None:
        """The frontend to forward an agent DATA message to (gRPC: the message unchanged;
        HTTP-CONNECT: its payload); None means "take the general path"."""
        if connect_id:
            conn = backend.connections.get(connect_id)
            if conn is not None:
                return conn.frontend
        return None

    # --- packets --------------------------------------------------------------------------

    def receive_from_frontend(
        self, frontend: Frontend, packet: Packet, now: float, raw: RawMessage | None = None
    ) -> list[Effect]:
        """A packet from a gRPC ``Proxy`` stream; ``raw`` is its message bytes, forwarded
        unchanged where upstream forwards the packet."""
        if frontend.mode is not FrontendMode.GRPC:
            raise ValueError(f"{frontend!r} is not a gRPC frontend")
        if frontend.stopped:
            return []
        handler = self._from_frontend.get(packet.type)
        # DIAL_RSP, CLOSE_RSP, DRAIN and unknown types from a frontend: ignored.
        return [] if handler is None else handler(frontend, packet, now, raw)

    def receive_from_agent(
        self, backend: Backend, packet: Packet, now: float, raw: RawMessage | None = None
    ) -> list[Effect]:
        """A packet from an agent ``Connect`` stream."""
        if backend.closed:
            return []
        handler = self._from_agent.get(packet.type)
        # DIAL_REQ, CLOSE_REQ and unknown types from an agent: ignored.
        return [] if handler is None else handler(backend, packet, now, raw)

    def dial_http_connect(self, frontend: Frontend, address: str, now: float) -> list[Effect]:
        """An HTTP CONNECT to ``address`` (the request-target, not validated): choose an
        agent and send it ``DIAL_REQ{tcp, address, random}`` (upstream's pkg/server/
        tunnel.go Tunnel.ServeHTTP)."""
        if frontend.mode is not FrontendMode.HTTP_CONNECT:
            raise ValueError(f"{frontend!r} is not an HTTP-CONNECT frontend")
        if frontend.closed or frontend.backend is not None:
            raise ValueError(f"{frontend!r} has already dialled")
        backend = self.backend_managers.backend(address)
        if backend is None and not self._forwards(frontend):
            # not counted as a dial failure in this mode
            return [self._close_http(frontend, CloseReason.NO_AGENT, ERR_NO_AGENT)]
        random = self._rng.getrandbits(HTTP_RANDOM_BITS)
        while random in self._pending:
            random = self._rng.getrandbits(HTTP_RANDOM_BITS)
        if backend is None:
            return self._forward_dial(frontend, random, "tcp", address, now)
        frontend.backend = backend
        self._add_pending(PendingDial(random, frontend, backend, address, now))
        request = DialRequest(protocol="tcp", address=address, random=random)
        return [SendToAgent(backend, Packet(PacketType.DIAL_REQ, request))]

    # --- timers ---------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must next run, or None."""
        if self._dial_timeout <= 0 or not self._pending:
            return None
        return next(iter(self._pending.values())).start + self._dial_timeout

    def dials_due(self, now: float) -> list[PendingDial]:
        """The pending dials ``handle_timer(now)`` will fail, oldest first."""
        due: list[PendingDial] = []
        if self._dial_timeout > 0:
            for dial in self._pending.values():
                if dial.start + self._dial_timeout > now:
                    break
                due.append(dial)
        return due

    def handle_timer(self, now: float) -> list[Effect]:
        """Fail the dials pending for ``--backend-dial-timeout`` or longer. Nothing goes to
        the agent: its late DIAL_RSP will be answered with CLOSE_REQ (upstream's
        startPendingDialTimeout, then serveRecvBackend)."""
        effects: list[Effect] = []
        if self._dial_timeout <= 0:
            return effects
        while self._pending:
            dial = next(iter(self._pending.values()))
            if dial.start + self._dial_timeout > now:
                break
            self._remove_pending(dial)
            effects.append(DialFailure(DialFailureReason.BACKEND_DIAL_TIMEOUT))
            effects.append(self._dial_failed(dial, CloseReason.DIAL_TIMEOUT, ERR_DIAL_TIMEOUT))
        return effects

    # --- frontend packets -----------------------------------------------------------------

    def _on_frontend_dial_req(
        self, frontend: Frontend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DIAL_REQ
        request = payload_of(packet, DialRequest)
        if request.random in self._pending:  # upstream overwrites another dial
            return [reply(frontend, dial_rsp(request.random, ERR_DUPLICATE_DIAL))]
        if len(frontend.dials) + len(frontend.connections) >= MAX_CONNECTIONS_PER_FRONTEND:
            return [reply(frontend, dial_rsp(request.random, ERR_TOO_MANY_DIALS))]
        backend = self.backend_managers.backend(request.address)
        if backend is None:
            if self._forwards(frontend):
                return self._forward_dial(
                    frontend, request.random, request.protocol, request.address, now
                )
            frontend.stopped = True
            return [
                DialFailure(DialFailureReason.NO_AGENT),
                reply(frontend, dial_rsp(request.random, ERR_NO_AGENT)),
            ]
        frontend.backend = backend
        self._add_pending(PendingDial(request.random, frontend, backend, request.address, now))
        return [SendToAgent(backend, forward(packet, request, raw))]

    def _on_frontend_data(
        self, frontend: Frontend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DATA
        data = payload_of(packet, Data)
        connect_id = data.connect_id
        backend = frontend.backend
        if backend is None:
            frontend.stopped = True
            return [reply(frontend, close_rsp(connect_id, ERR_BACKEND_NOT_INITIALIZED))]
        if connect_id == 0:
            return []
        if frontend.connect_id == 0:
            owned = _owned(frontend, connect_id)
            if owned is None:
                frontend.stopped = True
                return [reply(frontend, close_rsp(connect_id, ERR_FOREIGN_CONNECT_ID))]
            frontend.connect_id = connect_id
            frontend.backend = backend = owned.backend
        elif connect_id != frontend.connect_id:
            frontend.stopped = True
            return self._mismatched_ids(frontend, backend, connect_id, frontend.connect_id)
        if backend.closed:  # upstream's send fails: the packet is dropped
            return []
        return [SendToAgent(backend, forward(packet, data, raw))]

    def _mismatched_ids(
        self, frontend: Frontend, backend: Backend, new: int, old: int
    ) -> list[Effect]:
        effects: list[Effect] = []
        if not backend.closed:
            effects += [SendToAgent(backend, close_req(new)), SendToAgent(backend, close_req(old))]
        effects += [
            reply(frontend, close_rsp(new, ERR_MISMATCHED_IDS)),
            reply(frontend, close_rsp(old, ERR_MISMATCHED_IDS)),
        ]
        return effects

    def _on_frontend_close_req(
        self, frontend: Frontend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # CLOSE_REQ
        request = payload_of(packet, CloseRequest)
        backend = frontend.backend
        if backend is None:  # processing carries on, unlike DATA
            return [reply(frontend, close_rsp(request.connect_id, ERR_BACKEND_UNINITIALIZED))]
        frontend.stopped = True
        if backend.closed:
            return [reply(frontend, close_rsp(request.connect_id, ERR_CLOSE_REQ_FAILED))]
        owned = _owned(frontend, request.connect_id)
        if owned is None:
            return [reply(frontend, close_rsp(request.connect_id, ERR_FOREIGN_CONNECT_ID))]
        return [SendToAgent(owned.backend, forward(packet, request, raw))]

    def _on_frontend_dial_cls(
        self, frontend: Frontend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DIAL_CLS
        dial = frontend.dials.get(payload_of(packet, CloseDial).random)
        if dial is None:
            return []
        # Not forwarded: the agent's late DIAL_RSP will be answered with CLOSE_REQ.
        self._remove_pending(dial)
        return [DialFailure(DialFailureReason.FRONTEND_CLOSE)]

    # --- agent packets --------------------------------------------------------------------

    def _on_agent_dial_rsp(
        self, backend: Backend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DIAL_RSP
        response = payload_of(packet, DialResponse)
        dial = backend.dials.get(response.random)
        if dial is None:
            effects: list[Effect] = [DialFailure(DialFailureReason.UNRECOGNIZED_RESPONSE)]
            if response.connect_id != 0:
                effects.append(SendToAgent(backend, close_req(response.connect_id)))
            return effects
        self._remove_pending(dial)
        frontend = dial.frontend
        if response.error:
            return [
                DialFailure(DialFailureReason.ERROR_RESPONSE),
                self._dial_failed(
                    dial, CloseReason.DIAL_ERROR, response.error, forward(packet, response, raw)
                ),
            ]
        effects = self._add_established(ProxyClientConnection(dial, response.connect_id), now)
        effects.append(DialDuration(now - dial.start))
        if frontend.mode is FrontendMode.GRPC:
            effects.append(SendToFrontend(frontend, forward(packet, response, raw)))
        else:
            frontend.connect_id = response.connect_id
            effects.append(TunnelEstablished(frontend, response.connect_id))
        return effects

    def _on_agent_data(
        self, backend: Backend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DATA
        data = payload_of(packet, Data)
        connect_id = data.connect_id
        if connect_id == 0:
            return []
        conn = backend.connections.get(connect_id)
        if conn is not None:
            return [SendToFrontend(conn.frontend, forward(packet, data, raw))]
        if connect_id in backend.closing:  # in flight before our CLOSE_REQ arrived
            return []
        return [SendToAgent(backend, close_req(connect_id))]

    def _on_agent_close_rsp(
        self, backend: Backend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # CLOSE_RSP
        response = payload_of(packet, CloseResponse)
        conn = backend.connections.get(response.connect_id)
        if conn is None:  # already closed; maybe a frontend that left
            start = backend.closing.pop(response.connect_id, None)
            return [] if start is None else [ConnectionDuration(now - start)]
        self._remove_established(conn)
        effects: list[Effect] = [ConnectionDuration(now - conn.start)]
        if conn.frontend.mode is FrontendMode.GRPC:
            effects.append(SendToFrontend(conn.frontend, forward(packet, response, raw)))
        else:
            effects.append(self._close_http(conn.frontend, CloseReason.CLOSE_RSP))
        return effects

    def _on_agent_dial_cls(
        self, backend: Backend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DIAL_CLS
        close = payload_of(packet, CloseDial)
        dial = backend.dials.get(close.random)
        if dial is None:
            return []
        self._remove_pending(dial)
        return [
            DialFailure(DialFailureReason.BACKEND_CLOSE),
            self._dial_failed(dial, CloseReason.DIAL_CLOSED, "", forward(packet, close, raw)),
        ]

    def _on_agent_drain(
        self, backend: Backend, packet: Packet, now: float, raw: RawMessage | None
    ) -> list[Effect]:  # DRAIN
        backend.draining = True
        return []

    # --- forwarding to a peer server (tunnel.peering) ------------------------------------

    def _forwards(self, frontend: Frontend) -> bool:
        """Whether a dial of ``frontend`` no agent here can take goes to a peer server
        (``tunnel.peering.PeeringRouter``); upstream's router never forwards."""
        return False

    def _forward_dial(
        self, frontend: Frontend, random: int, protocol: str, address: str, now: float
    ) -> list[Effect]:
        """Hand the dial to a peer server (only called when ``_forwards``)."""
        raise NotImplementedError

    # --- bookkeeping ----------------------------------------------------------------------

    def _add_pending(self, dial: PendingDial) -> None:
        self._pending[dial.random] = dial
        dial.frontend.dials[dial.random] = dial
        dial.backend.dials[dial.random] = dial

    def _remove_pending(self, dial: PendingDial) -> None:
        del self._pending[dial.random]
        del dial.frontend.dials[dial.random]
        del dial.backend.dials[dial.random]

    def _add_established(self, conn: ProxyClientConnection, now: float) -> list[Effect]:
        """Record ``conn``. An agent reusing a live connectID on its stream has lost the old
        connection: that one is closed as if by an empty CLOSE_RSP."""
        backend = conn.backend
        effects: list[Effect] = []
        old = backend.connections.get(conn.connect_id)
        if old is not None:
            self._remove_established(old)
            effects.append(ConnectionDuration(now - old.start))
            effects.append(self._connection_lost(old, CloseReason.CLOSE_RSP))
        backend.closing.pop(conn.connect_id, None)
        backend.connections[conn.connect_id] = conn
        conn.frontend.connections[conn] = None
        self._established += 1
        return effects

    def _remove_established(self, conn: ProxyClientConnection) -> None:
        del conn.backend.connections[conn.connect_id]
        del conn.frontend.connections[conn]
        self._established -= 1

    def _remember_closing(self, conn: ProxyClientConnection, start: float | None) -> None:
        closing = conn.backend.closing
        if len(closing) >= MAX_CLOSING_PER_BACKEND:
            del closing[next(iter(closing))]
        closing[conn.connect_id] = start

    def _forget_frontend(self, frontend: Frontend) -> None:
        frontend.closed = frontend.stopped = True
        del self._frontends[frontend.id]

    def _close_http(self, frontend: Frontend, reason: CloseReason, error: str = "") -> Effect:
        """End an HTTP-CONNECT tunnel whose one dial or connection is already gone."""
        self._forget_frontend(frontend)
        return CloseFrontend(frontend, reason, error)

    def _connection_lost(self, conn: ProxyClientConnection, reason: CloseReason) -> Effect:
        """Tell a removed connection's frontend it is over."""
        if conn.frontend.mode is FrontendMode.GRPC:
            return SendToFrontend(conn.frontend, close_rsp(conn.connect_id, ""))
        return self._close_http(conn.frontend, reason)

    def _dial_failed(
        self, dial: PendingDial, reason: CloseReason, error: str, message: Message | None = None
    ) -> Effect:
        """Tell a removed dial's frontend it failed: gRPC gets ``message`` (default: an
        error DIAL_RSP), HTTP-CONNECT is closed for ``reason``."""
        if dial.frontend.mode is FrontendMode.GRPC:
            if message is None:
                return reply(dial.frontend, dial_rsp(dial.random, error))
            return SendToFrontend(dial.frontend, message)
        return self._close_http(dial.frontend, reason, error)

    def _fail_dials(self, backend: Backend, reason: DialFailureReason) -> list[Effect]:
        """Fail every dial pending on a lost or retired agent stream."""
        timeout = reason is DialFailureReason.BACKEND_DIAL_TIMEOUT
        close_reason = CloseReason.DIAL_TIMEOUT if timeout else CloseReason.DIAL_BACKEND_GONE
        error = ERR_DIAL_TIMEOUT if timeout else ERR_BACKEND_GONE
        effects: list[Effect] = []
        for dial in list(backend.dials.values()):
            self._remove_pending(dial)
            effects.append(DialFailure(reason))
            effects.append(self._dial_failed(dial, close_reason, error))
        return effects
