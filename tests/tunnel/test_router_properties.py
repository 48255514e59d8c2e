"""Random sequences of frontend and agent events against the router (a Hypothesis
``RuleBasedStateMachine``).

Whatever peers send and in whatever order streams come and go, the router:
- never raises;
- keeps every pending dial and established connection linked from the global map, its
  frontend and its backend, with both of those open; a closed frontend or lost agent owns
  nothing, and no effect is addressed to it;
- keeps its maps bounded (per-frontend and per-backend caps; HTTP-CONNECT tunnels hold at
  most one dial or connection) and its counters equal to what the maps hold;
- answers DATA on the fast path exactly as the general path would;
- is empty once every frontend and backend is gone.
"""

from __future__ import annotations

from random import Random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from konnectivity_fast.tunnel import (
    MAX_CLOSING_PER_BACKEND,
    MAX_CONNECTIONS_PER_FRONTEND,
    AgentIdentifiers,
    Backend,
    CloseFrontend,
    Effect,
    Frontend,
    FrontendMode,
    ProxyClientConnection,
    RetireBackend,
    Router,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
)
from konnectivity_fast.wire.packets import (
    CloseRequest,
    Data,
    Drain,
    Packet,
    PacketType,
)

from . import close_req, close_rsp, data, dial_cls, dial_req, dial_rsp, drain

GRPC, HTTP = FrontendMode.GRPC, FrontendMode.HTTP_CONNECT
ADDRESSES = ("n1:1", "10.0.0.1:443", "[fe80::1]:22", "elsewhere:80", "")
IDENTIFIERS = (
    AgentIdentifiers(),
    AgentIdentifiers(host=("n1",)),
    AgentIdentifiers(ipv4=("10.0.0.1",), default_route=True),
    AgentIdentifiers(ipv6=("fe80::1",), host=("n1",)),
    AgentIdentifiers(default_route=True),
)
STRATEGIES = st.lists(
    st.sampled_from(["default", "destHost", "defaultRoute"]), min_size=1, max_size=3
)
SMALL = st.integers(min_value=0, max_value=4)
INDEX = st.integers(min_value=0, max_value=1_000)


def frontend_packet(draw: st.DataObject, known: list[int]) -> Packet:
    """Any packet a gRPC client might send, aimed at known dial IDs or connectIDs."""
    number = draw.draw(st.sampled_from(known) | SMALL if known else SMALL)
    kind = draw.draw(st.sampled_from(["dial", "data", "close", "dial_cls", "odd"]))
    if kind == "dial":
        return dial_req(draw.draw(SMALL), draw.draw(st.sampled_from(ADDRESSES)))
    if kind == "data":
        return data(number)
    if kind == "close":
        return close_req(number)
    if kind == "dial_cls":
        return dial_cls(number)
    return draw.draw(
        st.sampled_from(
            [
                Packet(),
                Packet(PacketType.DATA),
                Packet(PacketType.DATA, CloseRequest(1)),
                dial_rsp(1, 1),
                close_rsp(1),
                drain(),
                Packet(99),
            ]
        )
    )


def agent_packet(draw: st.DataObject, backend: Backend) -> Packet:
    """Any packet an agent might send: answers to real dials, made-up ones, and noise."""
    randoms = sorted(backend.dials) or [draw.draw(SMALL)]
    random = draw.draw(st.sampled_from(randoms) | SMALL)
    connect_ids = sorted(backend.connections) + sorted(backend.closing)
    connect_id = draw.draw(st.sampled_from(connect_ids) | SMALL if connect_ids else SMALL)
    kind = draw.draw(st.sampled_from(["ok", "error", "data", "close_rsp", "dial_cls", "odd"]))
    if kind == "ok":
        return dial_rsp(random, draw.draw(SMALL))
    if kind == "error":
        return dial_rsp(random, draw.draw(SMALL), "dial tcp: connection refused")
    if kind == "data":
        return data(connect_id)
    if kind == "close_rsp":
        return close_rsp(connect_id, draw.draw(st.sampled_from(["", "Unknown connectID"])))
    if kind == "dial_cls":
        return dial_cls(random)
    return draw.draw(
        st.sampled_from(
            [
                drain(),
                Packet(),
                dial_req(1),
                close_req(1),
                Packet(PacketType.DRAIN, Drain()),
                Packet(PacketType.DATA, Data(0)),
                Packet(77),
            ]
        )
    )


class RouterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router(["default"], Random(0))
        self.now = 0.0
        self.frontends: list[Frontend] = []  # every one ever made, closed ones included
        self.backends: list[Backend] = []
        self.http_closed: set[Frontend] = set()
        self.http_established: set[Frontend] = set()
        self.next_id: dict[Backend, int] = {}  # agents count connectIDs per stream from 1

    @initialize(
        strategies=STRATEGIES,
        seed=st.integers(0, 2**32),
        timeout=st.sampled_from([0.0, 3.0]),
        agents=st.lists(
            st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(IDENTIFIERS)), max_size=3
        ),
    )
    def configure(
        self,
        strategies: list[str],
        seed: int,
        timeout: float,
        agents: list[tuple[str, AgentIdentifiers]],
    ) -> None:
        self.router = Router(strategies, Random(seed), dial_timeout=timeout)
        for agent_id, identifiers in agents:
            self.add_backend(agent_id, identifiers)

    # --- streams come and go --------------------------------------------------------------

    @rule(agent_id=st.sampled_from(["a", "b", "c"]), identifiers=st.sampled_from(IDENTIFIERS))
    def add_backend(self, agent_id: str, identifiers: AgentIdentifiers) -> None:
        self.backends.append(self.router.add_backend(agent_id, identifiers))

    @precondition(lambda self: self.backends)
    @rule(index=INDEX, retire=st.booleans())
    def remove_backend(self, index: int, retire: bool) -> None:
        backend = self.backends[index % len(self.backends)]
        if retire:  # told to go; the stream ends in a later step
            effects = self.router.retire_backend(backend)
            assert effects == [] or effects[0] == RetireBackend(backend)
        else:
            effects = self.router.remove_backend(backend, self.now)
        self.apply(effects)

    @rule(mode=st.sampled_from([GRPC, HTTP]))
    def add_frontend(self, mode: FrontendMode) -> None:
        self.frontends.append(self.router.add_frontend(mode))

    @precondition(lambda self: self.frontends)
    @rule(index=INDEX)
    def remove_frontend(self, index: int) -> None:
        frontend = self.frontends[index % len(self.frontends)]
        self.apply(self.router.remove_frontend(frontend))

    @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 4.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds
        timer = self.router.get_timer()
        effects = self.router.handle_timer(self.now)
        if timer is None or timer > self.now:
            assert effects == []
        self.apply(effects)

    # --- packets ----------------------------------------------------------------------------

    def grpc_frontends(self) -> list[Frontend]:
        return [f for f in self.frontends if f.mode is GRPC]

    @precondition(lambda self: self.grpc_frontends())
    @rule(draw=st.data())
    def from_frontend(self, draw: st.DataObject) -> None:
        frontend = draw.draw(st.sampled_from(self.grpc_frontends()))
        known = sorted(frontend.dials) + [c.connect_id for c in frontend.connections]
        packet = frontend_packet(draw, known)
        self.apply(self.router.receive_from_frontend(frontend, packet, self.now))

    @precondition(lambda self: self.backends)
    @rule(draw=st.data())
    def from_agent(self, draw: st.DataObject) -> None:
        backend = draw.draw(st.sampled_from(self.backends))
        packet = agent_packet(draw, backend)
        self.apply(self.router.receive_from_agent(backend, packet, self.now))

    @rule(random=st.integers(0, 10**6) | SMALL, address=st.sampled_from(ADDRESSES))
    def grpc_dial(self, random: int, address: str) -> None:
        frontend = self.router.add_frontend(GRPC)
        self.frontends.append(frontend)
        self.apply(self.router.receive_from_frontend(frontend, dial_req(random, address), self.now))

    @precondition(lambda self: self.router.pending_dials)
    @rule(
        draw=st.data(),
        kind=st.sampled_from(["ok", "ok", "ok", "error", "dial_cls"]),
        reuse=st.booleans(),
    )
    def agent_answers_a_dial(self, draw: st.DataObject, kind: str, reuse: bool) -> None:
        dials = [d for f in self.router.frontends.values() for d in f.dials.values()]
        dial = draw.draw(st.sampled_from(dials))
        if kind == "dial_cls":
            packet = dial_cls(dial.random)
        else:
            self.next_id[dial.backend] = connect_id = self.next_id.get(dial.backend, 0) + 1
            if reuse and dial.backend.connections:  # an agent bug: a live connectID again
                connect_id = draw.draw(st.sampled_from(sorted(dial.backend.connections)))
            packet = dial_rsp(dial.random, connect_id, "refused" if kind == "error" else "")
        self.apply(self.router.receive_from_agent(dial.backend, packet, self.now))

    def connections(self) -> list[ProxyClientConnection]:
        return [c for b in self.router.backends.values() for c in b.connections.values()]

    @precondition(lambda self: self.router.established_connections)
    @rule(
        draw=st.data(),
        kind=st.sampled_from(["agent_data", "close_rsp", "client_data", "client_close"]),
    )
    def traffic_on_a_connection(self, draw: st.DataObject, kind: str) -> None:
        conn = draw.draw(st.sampled_from(self.connections()))
        frontend, backend, connect_id = conn.frontend, conn.backend, conn.connect_id
        if kind == "agent_data":
            assert self.router.route_agent_data(backend, connect_id) is (
                frontend if connect_id else None
            )
            effects = self.router.receive_from_agent(backend, data(connect_id), self.now)
        elif kind == "close_rsp":
            effects = self.router.receive_from_agent(backend, close_rsp(connect_id), self.now)
            assert conn not in frontend.connections
        elif frontend.mode is HTTP:
            effects = []
            assert self.router.route_frontend_data(frontend, frontend.connect_id) is (
                backend if connect_id and frontend.backend is backend else None
            )
        else:
            packet = data(connect_id) if kind == "client_data" else close_req(connect_id)
            effects = self.router.receive_from_frontend(frontend, packet, self.now)
        self.apply(effects)

    @rule(address=st.sampled_from(ADDRESSES))
    def http_connect(self, address: str) -> None:
        frontend = self.router.add_frontend(HTTP)
        self.frontends.append(frontend)
        self.apply(self.router.dial_http_connect(frontend, address, self.now))

    @precondition(lambda self: self.grpc_frontends())
    @rule(draw=st.data())
    def frontend_fast_path(self, draw: st.DataObject) -> None:
        frontend = draw.draw(st.sampled_from(self.grpc_frontends()))
        connect_id = draw.draw(st.sampled_from([frontend.connect_id]) | SMALL)
        target = self.router.route_frontend_data(frontend, connect_id)
        packet = data(connect_id)
        effects = self.router.receive_from_frontend(frontend, packet, self.now)
        if target is not None:
            assert effects == [SendToAgent(target, packet)]
        self.apply(effects)

    @precondition(lambda self: self.backends)
    @rule(draw=st.data())
    def agent_fast_path(self, draw: st.DataObject) -> None:
        backend = draw.draw(st.sampled_from(self.backends))
        ids = sorted(backend.connections)
        connect_id = draw.draw(st.sampled_from(ids) | SMALL if ids else SMALL)
        target = self.router.route_agent_data(backend, connect_id)
        packet = data(connect_id)
        effects = self.router.receive_from_agent(backend, packet, self.now)
        if target is not None:
            assert effects == [SendToFrontend(target, packet)]
        self.apply(effects)

    # --- effects ----------------------------------------------------------------------------

    def apply(self, effects: list[Effect]) -> None:
        """Check each effect is addressed to an open stream, as an adapter would need."""
        for effect in effects:
            if isinstance(effect, SendToAgent | RetireBackend):
                assert not effect.backend.closed, effect
            if isinstance(effect, SendToFrontend):
                assert not effect.frontend.closed, effect
                if effect.frontend.mode is HTTP:
                    assert effect.frontend in self.http_established, effect
                    assert isinstance(effect.message, Packet)
                    assert effect.message.type == PacketType.DATA
            if isinstance(effect, TunnelEstablished):
                assert effect.frontend.mode is HTTP
                assert effect.frontend not in self.http_established
                self.http_established.add(effect.frontend)
            if isinstance(effect, CloseFrontend):
                assert effect.frontend.mode is HTTP and effect.frontend.closed
                assert effect.frontend not in self.http_closed
                self.http_closed.add(effect.frontend)

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def pending_dials_are_linked_and_live(self) -> None:
        router = self.router
        pending = {r: router.pending_dial(r) for f in router.frontends.values() for r in f.dials}
        assert router.pending_dials == len(pending)
        for random, dial in pending.items():
            assert dial is not None and dial.random == random
            assert not dial.frontend.closed and not dial.backend.closed
            assert dial.frontend.dials[random] is dial
            assert dial.backend.dials[random] is dial
        for backend in router.backends.values():
            for random, dial in backend.dials.items():
                assert router.pending_dial(random) is dial

    @invariant()
    def connections_are_linked_and_live(self) -> None:
        router = self.router
        total = 0
        for backend in router.backends.values():
            assert not backend.closed
            assert len(backend.closing) <= MAX_CLOSING_PER_BACKEND
            for connect_id, conn in backend.connections.items():
                total += 1
                assert conn.connect_id == connect_id and conn.backend is backend
                assert not conn.frontend.closed
                assert conn in conn.frontend.connections
        assert router.established_connections == total
        for frontend in router.frontends.values():
            assert not frontend.closed
            for conn in frontend.connections:
                assert conn.backend.connections[conn.connect_id] is conn

    @invariant()
    def closed_streams_own_nothing(self) -> None:
        for frontend in self.frontends:
            if frontend.closed:
                assert not frontend.dials and not frontend.connections
                assert frontend.id not in self.router.frontends
            else:
                assert self.router.frontends[frontend.id] is frontend
        for backend in self.backends:
            if backend.closed:
                assert not backend.dials and not backend.connections and not backend.closing
                assert backend.id not in self.router.backends

    @invariant()
    def maps_are_bounded(self) -> None:
        for frontend in self.router.frontends.values():
            held = len(frontend.dials) + len(frontend.connections)
            assert held <= (1 if frontend.mode is HTTP else MAX_CONNECTIONS_PER_FRONTEND)

    @invariant()
    def managers_hold_exactly_the_open_unretired_backends(self) -> None:
        chosen = {b for b in self.router.backends.values() if not b.retired}
        for manager in self.router.backend_managers.managers:
            storage = manager._storage
            assert sorted(storage._keys) == sorted(storage._backends)
            assert all(storage._backends.values())
            stored = {b for streams in storage._backends.values() for b in streams}
            assert stored <= chosen
            assert stored == {b for b in chosen if list(manager.keys_of(b))}
        first = self.router.backend_managers.managers[0]
        assert self.router.ready == any(list(first.keys_of(b)) for b in chosen)

    def teardown(self) -> None:
        for frontend in list(self.router.frontends.values()):
            self.apply(self.router.remove_frontend(frontend))
        for backend in list(self.router.backends.values()):
            self.apply(self.router.remove_backend(backend, self.now))
        assert self.router.pending_dials == 0
        assert self.router.established_connections == 0
        assert not self.router.frontends and not self.router.backends
        assert self.router.get_timer() is None


RouterMachine.TestCase.settings = settings(settings(), stateful_step_count=40)
TestRouterMachine = RouterMachine.TestCase
