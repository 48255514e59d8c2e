"""``PeeringRouter`` (server peering, sans-IO): a dial no agent takes becomes pending on an
unattached ``PeerBackend`` (``ForwardDial``); the adapter's reports establish it or fail it
with upstream's error; the peer stream is ended (``EndPeer``) as soon as it carries nothing;
a forwarded frontend is never forwarded again; and with an agent, nothing changes."""

from __future__ import annotations

from random import Random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from konnectivity_fast.tunnel import (
    ERR_NO_AGENT,
    AgentIdentifiers,
    CloseFrontend,
    CloseReason,
    DialFailure,
    DialFailureReason,
    Effect,
    EndPeer,
    ForwardDial,
    Frontend,
    FrontendMode,
    PeerBackend,
    PeeringRouter,
    PendingDial,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
)
from konnectivity_fast.tunnel.peering import PEER_AGENT_PREFIX, is_no_agent
from konnectivity_fast.wire.packets import DialResponse

from . import close_req, close_rsp, data, dial_cls, dial_req, dial_rsp, only
from .test_router_properties import RouterMachine

GRPC, HTTP = FrontendMode.GRPC, FrontendMode.HTTP_CONNECT
CONN = object()  # the adapter's stream to the peer, as the router stores it


def router(dial_timeout: float = 0.0) -> PeeringRouter:
    return PeeringRouter(("default",), Random(3), dial_timeout=dial_timeout)


def forwarded_dial(r: PeeringRouter, frontend: Frontend, random: int = 7) -> PendingDial:
    """A gRPC DIAL_REQ no agent takes: one ForwardDial, nothing sent yet."""
    effects = r.receive_from_frontend(frontend, dial_req(random), 0.0)
    (effect,) = effects
    assert isinstance(effect, ForwardDial)
    assert effect.protocol == "tcp"
    dial = effect.dial
    assert isinstance(dial.backend, PeerBackend)
    assert dial.backend.conn is None
    assert r.pending_dial(random) is dial
    return dial


def answer(
    r: PeeringRouter, dial: PendingDial, connect_id: int = 5, error: str = "", now: float = 1.0
) -> list[object]:
    effects = r.peer_answered(
        dial, "s2", CONN, DialResponse(error=error, connect_id=connect_id, random=1), now
    )
    assert effects is not None
    return list(effects)


def test_no_agent_text_is_recognised() -> None:
    assert is_no_agent(ERR_NO_AGENT)
    assert is_no_agent(ERR_NO_AGENT + ": something more")
    assert not is_no_agent("dial tcp 10.0.0.1:443: connect: connection refused")


def test_grpc_dial_is_forwarded_and_established_with_the_frontends_random() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend, random=7)
    peer = dial.backend
    effects = answer(r, dial, connect_id=5)
    sends = only(effects, SendToFrontend)  # type: ignore[arg-type]
    assert sends == [SendToFrontend(frontend, dial_rsp(7, connect_id=5))]
    assert peer.conn is CONN
    assert peer.agent_id == PEER_AGENT_PREFIX + "s2"
    assert r.established_connections == 1 and r.pending_dials == 0
    # DATA both ways, connectIDs unchanged: the stream's first DATA learns its connection,
    # the rest takes the fast path.
    assert r.receive_from_frontend(frontend, data(5), 1.5) == [SendToAgent(peer, data(5))]
    assert r.route_frontend_data(frontend, 5) is peer
    assert r.route_agent_data(peer, 5) is frontend
    # The client closes: CLOSE_REQ to the peer, its CLOSE_RSP back, then the stream ends.
    assert r.receive_from_frontend(frontend, close_req(5), 2.0) == [SendToAgent(peer, close_req(5))]
    effects = r.receive_from_agent(peer, close_rsp(5), 3.0)
    assert SendToFrontend(frontend, close_rsp(5)) in effects
    assert effects[-1] == EndPeer(peer)
    assert peer.closed and peer.id not in r.backends


def test_peer_closing_first_reaches_the_client_and_ends_the_stream() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend)
    peer = dial.backend
    answer(r, dial, connect_id=9)
    effects = r.receive_from_agent(peer, close_rsp(9), 2.0)
    assert SendToFrontend(frontend, close_rsp(9)) in effects
    assert only(effects, EndPeer) == [EndPeer(peer)]  # type: ignore[arg-type]


def test_frontend_gone_closes_the_connection_then_ends_the_stream() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend)
    peer = dial.backend
    answer(r, dial, connect_id=4)
    effects = r.remove_frontend(frontend)
    assert effects == [EndPeer(peer, (close_req(4),))]
    # The peer's late answers are dropped.
    assert r.receive_from_agent(peer, data(4), 3.0) == []
    assert r.receive_from_agent(peer, close_rsp(4), 3.0) == []


def test_every_peer_without_agent_gives_upstreams_error() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend, random=11)
    peer = dial.backend
    effects = r.peer_unavailable(dial)
    assert effects == [
        DialFailure(DialFailureReason.NO_AGENT),
        SendToFrontend(frontend, dial_rsp(11, error=ERR_NO_AGENT), via_connection=False),
        EndPeer(peer),
    ]
    assert frontend.stopped and r.pending_dials == 0 and peer.id not in r.backends
    assert r.peer_unavailable(dial) == []  # reported twice: nothing more


def test_peer_dial_error_goes_back_as_the_agents_would() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend, random=3)
    peer = dial.backend
    effects = answer(r, dial, connect_id=0, error="connection refused")
    assert effects == [
        DialFailure(DialFailureReason.ERROR_RESPONSE),
        SendToFrontend(frontend, dial_rsp(3, error="connection refused"), via_connection=False),
        EndPeer(peer),
    ]


def test_cancelled_while_forwarding_ends_the_attempt_and_ignores_the_answer() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend, random=8)
    peer = dial.backend
    effects = r.receive_from_frontend(frontend, dial_cls(8), 1.0)
    assert effects == [DialFailure(DialFailureReason.FRONTEND_CLOSE), EndPeer(peer)]
    none = r.peer_answered(dial, "s2", CONN, DialResponse(connect_id=5, random=1), 2.0)
    assert none is None  # the adapter closes what the peer opened
    assert r.established_connections == 0


def test_frontend_gone_while_forwarding() -> None:
    r = router()
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend, random=8)
    effects = r.remove_frontend(frontend)
    # Nothing goes to a stream not opened yet: the adapter withdraws the dial itself.
    assert effects == [EndPeer(dial.backend)]


def test_dial_timeout_covers_forwarded_dials() -> None:
    r = router(dial_timeout=5.0)
    frontend = r.add_frontend(GRPC)
    dial = forwarded_dial(r, frontend, random=2)
    assert r.get_timer() == 5.0
    effects = r.handle_timer(5.0)
    assert DialFailure(DialFailureReason.BACKEND_DIAL_TIMEOUT) in effects
    assert effects[-1] == EndPeer(dial.backend)


def test_forwarded_frontend_is_never_forwarded_again() -> None:
    r = router()
    frontend = r.add_frontend(GRPC, forwarded=True)
    effects = r.receive_from_frontend(frontend, dial_req(7), 0.0)
    assert effects == [
        DialFailure(DialFailureReason.NO_AGENT),
        SendToFrontend(frontend, dial_rsp(7, error=ERR_NO_AGENT), via_connection=False),
    ]
    http = r.add_frontend(HTTP, forwarded=True)
    assert r.dial_http_connect(http, "10.0.0.1:443", 0.0) == [
        CloseFrontend(http, CloseReason.NO_AGENT, ERR_NO_AGENT)
    ]


def test_a_local_agent_is_always_preferred() -> None:
    r = router()
    agent = r.add_backend("agent", AgentIdentifiers())
    frontend = r.add_frontend(GRPC)
    assert r.receive_from_frontend(frontend, dial_req(7), 0.0) == [SendToAgent(agent, dial_req(7))]


def test_http_connect_is_forwarded_and_established() -> None:
    r = router()
    frontend = r.add_frontend(HTTP)
    (effect,) = r.dial_http_connect(frontend, "10.0.0.1:443", 0.0)
    assert isinstance(effect, ForwardDial)
    dial = effect.dial
    assert dial.address == "10.0.0.1:443"
    effects = answer(r, dial, connect_id=6)
    assert effects[-1] == TunnelEstablished(frontend, 6)
    assert frontend.connect_id == 6
    peer = dial.backend
    assert r.route_frontend_data(frontend, 6) is peer


def test_http_connect_without_any_peer_agent() -> None:
    r = router()
    frontend = r.add_frontend(HTTP)
    (effect,) = r.dial_http_connect(frontend, "10.0.0.1:443", 0.0)
    assert isinstance(effect, ForwardDial)
    effects = r.peer_unavailable(effect.dial)
    assert effects == [
        CloseFrontend(frontend, CloseReason.NO_AGENT, ERR_NO_AGENT),
        EndPeer(effect.dial.backend),
    ]


class PeeringMachine(RouterMachine):
    """The router's random sequences (test_router_properties) on a ``PeeringRouter``, plus
    the adapter's reports on forwarded dials and forwarded frontends: every invariant of
    the router holds, and a peer backend carries exactly one dial or connection while the
    router knows it, is ended once when it forgets it, and no forwarded frontend's dial is
    ever forwarded."""

    def __init__(self) -> None:
        super().__init__()
        self.router = PeeringRouter(["default"], Random(0))
        self.ended: set[PeerBackend] = set()

    @initialize(seed=st.integers(0, 2**32), timeout=st.sampled_from([0.0, 3.0]))
    def configure(  # type: ignore[override]
        self, seed: int, timeout: float
    ) -> None:
        self.router = PeeringRouter(["default"], Random(seed), dial_timeout=timeout)

    @rule(random=st.integers(0, 10**6), address=st.sampled_from(["10.0.0.1:443", "x:1"]))
    def forwarded_frontend_dials(self, random: int, address: str) -> None:
        frontend = self.router.add_frontend(GRPC, forwarded=True)
        self.frontends.append(frontend)
        effects = self.router.receive_from_frontend(frontend, dial_req(random, address), self.now)
        assert not [e for e in effects if isinstance(e, ForwardDial)]
        self.apply(effects)

    def forwarding(self) -> list[PendingDial]:
        return [
            d
            for f in self.router.frontends.values()
            for d in f.dials.values()
            if isinstance(d.backend, PeerBackend) and d.backend.conn is None
        ]

    @precondition(lambda self: self.forwarding())
    @rule(draw=st.data(), kind=st.sampled_from(["ok", "ok", "error", "unavailable"]))
    def peer_reports(self, draw: st.DataObject, kind: str) -> None:
        dial = draw.draw(st.sampled_from(self.forwarding()))
        if kind == "unavailable":
            effects = self.router.peer_unavailable(dial)
        else:
            error = "refused" if kind == "error" else ""
            response = DialResponse(error=error, connect_id=1, random=1)
            answered = self.router.peer_answered(dial, "s2", CONN, response, self.now)
            assert answered is not None
            effects = answered
        self.apply(effects)

    def apply(self, effects: list[Effect]) -> None:  # type: ignore[override]
        for effect in effects:
            if isinstance(effect, ForwardDial):
                assert not effect.dial.frontend.forwarded
                self.backends.append(effect.dial.backend)
            if isinstance(effect, EndPeer):
                backend = effect.backend
                assert isinstance(backend, PeerBackend) and backend.closed
                assert backend not in self.ended
                self.ended.add(backend)
        super().apply(effects)

    @invariant()
    def peer_backends_carry_one_tunnel(self) -> None:
        for backend in self.router.backends.values():
            if isinstance(backend, PeerBackend):
                assert len(backend.dials) + len(backend.connections) == 1

    @invariant()
    def managers_hold_exactly_the_open_unretired_backends(self) -> None:
        """The router's own check, peer backends aside: no manager ever holds one."""
        chosen = {
            b
            for b in self.router.backends.values()
            if not b.retired and not isinstance(b, PeerBackend)
        }
        for manager in self.router.backend_managers.managers:
            stored = {b for streams in manager._storage._backends.values() for b in streams}
            assert stored == {b for b in chosen if list(manager.keys_of(b))}


PeeringMachine.TestCase.settings = settings(settings(), stateful_step_count=40)
TestPeeringMachine = PeeringMachine.TestCase
