"""Dial balancing (``tunnel.balance``, ``DialBalance``): with ``least-tunnels`` a dial goes
to a least loaded candidate of the chosen strategy, ties at random; with ``random``
(the default) the choice is upstream's, draw for draw.

The state machine at the end drives a router through random dials, answers, closes, drains
and agent losses, keeps its own account of which tunnels each agent stream carries (from
what it sent and what the router answered, never from the router's maps), and checks after
every step that the router's count per stream is exactly that account, and at every dial
that the stream chosen was a least loaded candidate.
"""

from __future__ import annotations

from collections import Counter
from random import Random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from konnectivity_fast.tunnel import (
    AgentIdentifiers,
    Backend,
    BackendManagers,
    DialBalance,
    Frontend,
    FrontendMode,
    Router,
    SendToAgent,
    least_loaded,
    open_tunnels,
)
from konnectivity_fast.tunnel.records import PendingDial, ProxyClientConnection
from konnectivity_fast.wire.packets import DialRequest, PacketType

from . import close_req, close_rsp, dial_cls, dial_req, dial_rsp, drain, only

LEAST = DialBalance.LEAST_TUNNELS
NO_IDS = AgentIdentifiers()


def loaded(backend_id: int, agent_id: str, tunnels: int, *, draining: bool = False) -> Backend:
    """A stream carrying ``tunnels`` established connections."""
    backend = Backend(backend_id, agent_id, NO_IDS)
    backend.draining = draining
    frontend = Frontend(1000 + backend_id, FrontendMode.GRPC)
    for connect_id in range(1, tunnels + 1):
        dial = PendingDial(connect_id, frontend, backend, "h:1", 0.0)
        backend.connections[connect_id] = ProxyClientConnection(dial, connect_id)
    return backend


# --- the choice itself --------------------------------------------------------------------


def test_least_loaded_takes_the_fewest_tunnels() -> None:
    a, b, c = loaded(1, "a", 3), loaded(2, "b", 1), loaded(3, "c", 2)
    assert least_loaded([a, b, c], Random(0)) is b


def test_pending_dials_count_as_load() -> None:
    a, b = loaded(1, "a", 1), loaded(2, "b", 0)
    frontend = Frontend(9, FrontendMode.GRPC)
    for random in (1, 2):
        b.dials[random] = PendingDial(random, frontend, b, "h:1", 0.0)
    assert open_tunnels(b) == 2
    assert least_loaded([a, b], Random(0)) is a


def test_draining_only_when_every_candidate_drains() -> None:
    busy, idle_draining = loaded(1, "a", 50), loaded(2, "b", 0, draining=True)
    assert least_loaded([idle_draining, busy], Random(0)) is busy
    other_draining = loaded(3, "c", 4, draining=True)
    assert least_loaded([other_draining, idle_draining], Random(0)) is idle_draining
    assert least_loaded([], Random(0)) is None


def test_ties_are_broken_at_random_among_the_least_loaded_only() -> None:
    a, b, c, d = loaded(1, "a", 2), loaded(2, "b", 2), loaded(3, "c", 2), loaded(4, "d", 3)
    rng = Random(5)
    picks = Counter(least_loaded([a, b, c, d], rng) for _ in range(300))
    assert set(picks) == {a, b, c}  # every tied stream is chosen, never the busier one
    assert min(picks.values()) > 60  # roughly a third each (seeded: not a flaky bound)


def test_a_single_least_loaded_candidate_draws_nothing() -> None:
    rng = Random(3)
    state = rng.getstate()
    least_loaded([loaded(1, "a", 1), loaded(2, "b", 0)], rng)
    assert rng.getstate() == state


# --- per strategy -------------------------------------------------------------------------


def test_default_balances_across_agents_and_random_stays_upstreams() -> None:
    backends = [loaded(1, "a", 3), loaded(2, "b", 0), loaded(3, "c", 1)]
    least = BackendManagers(["default"], Random(1), LEAST)
    upstream = BackendManagers(["default"], Random(1))
    for managers in (least, upstream):
        for backend in backends:
            managers.add_backend(backend)
    assert {least.backend("x:1") for _ in range(20)} == {backends[1]}
    # Upstream's scan: a random start among the keys in arrival order, first stream each.
    rng = Random(1)
    expected = [backends[rng.randrange(3)] for _ in range(20)]
    assert [upstream.backend("x:1") for _ in range(20)] == expected


def test_default_candidates_are_each_agents_first_stream() -> None:
    old, new = loaded(1, "a", 5), loaded(2, "a", 0)  # a reconnect: two streams of "a"
    other = loaded(3, "b", 3)
    managers = BackendManagers(["default"], Random(0), LEAST)
    for backend in (old, new, other):
        managers.add_backend(backend)
    assert managers.backend("x:1") is other  # "a" is represented by its first stream, as upstream


def test_dest_host_picks_the_least_loaded_stream_of_the_host() -> None:
    host = AgentIdentifiers(host=("node1",))
    a, b = Backend(1, "a", host), Backend(2, "b", host)
    elsewhere = Backend(3, "c", AgentIdentifiers(host=("node2",)))
    a.connections.update(loaded(9, "x", 2).connections)
    managers = BackendManagers(["destHost"], Random(0), LEAST)
    for backend in (a, b, elsewhere):
        managers.add_backend(backend)
    assert managers.backend("node1:10250") is b
    assert managers.backend("node3:10250") is None
    upstream = BackendManagers(["destHost"], Random(0))
    for backend in (a, b, elsewhere):
        upstream.add_backend(backend)
    assert upstream.backend("node1:10250") is a  # upstream: the first match


def test_default_route_balances_among_default_route_agents() -> None:
    route = AgentIdentifiers(default_route=True)
    busy, idle, plain = Backend(1, "a", route), Backend(2, "b", route), Backend(3, "c", NO_IDS)
    busy.connections.update(loaded(9, "x", 1).connections)
    managers = BackendManagers(["defaultRoute"], Random(0), LEAST)
    for backend in (busy, idle, plain):
        managers.add_backend(backend)
    assert managers.backend("x:1") is idle


def test_router_spreads_thirty_dials_ten_each() -> None:
    router = Router(["default"], Random(11), balance=LEAST)
    agents = [router.add_backend(agent, NO_IDS) for agent in ("a", "b", "c")]
    for random in range(1, 31):
        frontend = router.add_frontend(FrontendMode.GRPC)
        (send,) = only(router.receive_from_frontend(frontend, dial_req(random), 0.0), SendToAgent)
        assert isinstance(send, SendToAgent)
        router.receive_from_agent(
            send.backend, dial_rsp(random, len(send.backend.connections) + 1), 0.0
        )
    assert [open_tunnels(agent) for agent in agents] == [10, 10, 10]


# --- exact counts and least-loaded choices under random sequences -------------------------

AGENT_IDS = ("a", "b", "c")
INDEX = st.integers(min_value=0, max_value=1_000)
DIAL_TIMEOUT = 3.0


class BalanceMachine(RuleBasedStateMachine):
    """See the module docstring. Only the ``default`` strategy, so the candidates are
    simple to state: each agent's first open stream."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router(["default"], Random(0), balance=LEAST)
        self.now = 0.0
        self.streams: list[Backend] = []  # open, not retired, in arrival order
        self.draining: set[Backend] = set()
        self.frontends: list[Frontend] = []
        # The account: per stream, its open tunnels, each ("dial", random) or ("conn", id),
        # with the frontend it serves and, for dials, when they were sent.
        self.account: dict[Backend, dict[tuple[str, int], tuple[Frontend, float]]] = {}
        self.next_random = 1
        self.next_connect_id: dict[Backend, int] = {}

    @initialize(seed=st.integers(0, 2**32), timeout=st.sampled_from([0.0, DIAL_TIMEOUT]))
    def configure(self, seed: int, timeout: float) -> None:
        self.router = Router(["default"], Random(seed), dial_timeout=timeout, balance=LEAST)
        self.timeout = timeout

    # --- streams --------------------------------------------------------------------------

    @rule(agent_id=st.sampled_from(AGENT_IDS))
    def agent_joins(self, agent_id: str) -> None:
        backend = self.router.add_backend(agent_id, NO_IDS)
        self.streams.append(backend)
        self.account[backend] = {}
        self.next_connect_id[backend] = 1

    @precondition(lambda self: self.streams)
    @rule(index=INDEX)
    def agent_lost(self, index: int) -> None:
        backend = self.streams.pop(index % len(self.streams))
        self.router.remove_backend(backend, self.now)
        del self.account[backend]  # every tunnel of a lost stream is gone

    @precondition(lambda self: self.streams)
    @rule(index=INDEX)
    def agent_drains(self, index: int) -> None:
        backend = self.streams[index % len(self.streams)]
        self.router.receive_from_agent(backend, drain(), self.now)
        self.draining.add(backend)

    # --- dials ----------------------------------------------------------------------------

    def candidates(self) -> list[Backend]:
        first: dict[str, Backend] = {}
        for backend in self.streams:
            first.setdefault(backend.agent_id, backend)
        return list(first.values())

    @rule(http=st.booleans())
    def dial(self, http: bool) -> None:
        candidates = self.candidates()
        loads = {b: len(self.account[b]) + (1 << 40) * (b in self.draining) for b in candidates}
        if http:
            frontend = self.router.add_frontend(FrontendMode.HTTP_CONNECT)
            effects = self.router.dial_http_connect(frontend, "10.0.0.1:443", self.now)
        else:
            frontend = self.router.add_frontend(FrontendMode.GRPC)
            random, self.next_random = self.next_random, self.next_random + 1
            effects = self.router.receive_from_frontend(frontend, dial_req(random), self.now)
        self.frontends.append(frontend)
        sends = only(effects, SendToAgent)
        if not candidates:
            assert sends == []
            return
        (send,) = sends
        assert isinstance(send, SendToAgent)
        assert loads[send.backend] == min(loads.values()), "not a least loaded candidate"
        packet = send.message
        assert not isinstance(packet, bytes | bytearray | memoryview)
        assert packet.type == PacketType.DIAL_REQ and isinstance(packet.payload, DialRequest)
        self.account[send.backend][("dial", packet.payload.random)] = (frontend, self.now)

    def pending(self) -> list[tuple[Backend, int]]:
        return sorted(
            (
                (b, key[1])
                for b, tunnels in self.account.items()
                for key in tunnels
                if key[0] == "dial"
            ),
            key=lambda item: (item[0].id, item[1]),
        )

    def established(self) -> list[tuple[Backend, int]]:
        return sorted(
            (
                (b, key[1])
                for b, tunnels in self.account.items()
                for key in tunnels
                if key[0] == "conn"
            ),
            key=lambda item: (item[0].id, item[1]),
        )

    @precondition(lambda self: self.pending())
    @rule(index=INDEX, outcome=st.sampled_from(["ok", "error", "dial_cls"]))
    def agent_answers(self, index: int, outcome: str) -> None:
        pending = self.pending()
        backend, random = pending[index % len(pending)]
        frontend, _ = self.account[backend].pop(("dial", random))
        if outcome == "ok":
            connect_id = self.next_connect_id[backend]
            self.next_connect_id[backend] += 1
            packet = dial_rsp(random, connect_id)
            self.account[backend][("conn", connect_id)] = (frontend, self.now)
        elif outcome == "error":
            packet = dial_rsp(random, 0, "dial tcp: connection refused")
        else:
            packet = dial_cls(random)
        self.router.receive_from_agent(backend, packet, self.now)

    @precondition(lambda self: self.established())
    @rule(index=INDEX, asked=st.booleans())
    def tunnel_closes(self, index: int, asked: bool) -> None:
        """The agent's CLOSE_RSP, after the frontend's CLOSE_REQ or on its own (the backend
        closed): either way the tunnel is gone."""
        established = self.established()
        backend, connect_id = established[index % len(established)]
        frontend, _ = self.account[backend].pop(("conn", connect_id))
        if asked and frontend.mode is FrontendMode.GRPC and not frontend.closed:
            self.router.receive_from_frontend(frontend, close_req(connect_id), self.now)
        self.router.receive_from_agent(backend, close_rsp(connect_id), self.now)

    @precondition(lambda self: self.frontends)
    @rule(index=INDEX)
    def frontend_leaves(self, index: int) -> None:
        frontend = self.frontends.pop(index % len(self.frontends))
        self.router.remove_frontend(frontend)
        for tunnels in self.account.values():
            for key in [k for k, (owner, _) in tunnels.items() if owner is frontend]:
                del tunnels[key]

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.router.handle_timer(self.now)
        if self.timeout:
            for tunnels in self.account.values():
                expired = [
                    key
                    for key, (_, sent) in tunnels.items()
                    if key[0] == "dial" and sent + self.timeout <= self.now
                ]
                for key in expired:
                    del tunnels[key]

    # --- invariants -------------------------------------------------------------------------

    @invariant()
    def counts_are_exact(self) -> None:
        for backend, tunnels in self.account.items():
            assert open_tunnels(backend) == len(tunnels), backend
        conns = sum(1 for tunnels in self.account.values() for k in tunnels if k[0] == "conn")
        assert self.router.established_connections == conns
        assert self.router.pending_dials == sum(
            1 for tunnels in self.account.values() for k in tunnels if k[0] == "dial"
        )


BalanceMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
TestBalanceMachine = BalanceMachine.TestCase
