"""Packet sequences through the router: every rule of upstream's pkg/server/server.go
serveRecvFrontend, serveRecvBackend and Proxy, and of pkg/server/tunnel.go Tunnel.ServeHTTP
(gRPC and HTTP-CONNECT frontends, agents), the error paths with upstream's exact strings and
metric labels, and where we deliberately differ (docs/differences.md: lost agents fail their
pending dials at once; dial IDs and responses are checked against their owner)."""

from __future__ import annotations

import pytest

from konnectivity_fast.tunnel import (
    ERR_BACKEND_GONE,
    ERR_DUPLICATE_DIAL,
    ERR_TOO_MANY_DIALS,
    MAX_CLOSING_PER_BACKEND,
    MAX_CONNECTIONS_PER_FRONTEND,
    AgentIdentifiers,
    Backend,
    CloseFrontend,
    CloseReason,
    ConnectionDuration,
    DialDuration,
    DialFailure,
    DialFailureReason,
    Frontend,
    FrontendMode,
    RetireBackend,
    Router,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
)
from konnectivity_fast.wire.codec import encode_packet
from konnectivity_fast.wire.packets import (
    CloseRequest,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

from . import (
    close_req,
    close_rsp,
    data,
    dial_cls,
    dial_req,
    dial_rsp,
    drain,
    make_router,
    only,
)

GRPC, HTTP = FrontendMode.GRPC, FrontendMode.HTTP_CONNECT
R = DialFailureReason


def fail(reason: DialFailureReason) -> DialFailure:
    return DialFailure(reason)


def reply(frontend: Frontend, packet: Packet) -> SendToFrontend:
    """The server's own answer (not a write through a connection record)."""
    return SendToFrontend(frontend, packet, via_connection=False)


def established(
    router: Router,
    frontend: Frontend,
    backend: Backend,
    *,
    random: int = 7,
    connect_id: int = 1,
    now: float = 0.0,
) -> None:
    """DIAL_REQ from ``frontend`` answered by ``backend`` with ``connect_id``."""
    assert router.receive_from_frontend(frontend, dial_req(random), now) == [
        SendToAgent(backend, dial_req(random))
    ]
    router.receive_from_agent(backend, dial_rsp(random, connect_id), now)


def assert_empty(router: Router) -> None:
    assert router.pending_dials == 0
    assert router.established_connections == 0
    for frontend in router.frontends.values():
        assert not frontend.dials and not frontend.connections
    for backend in router.backends.values():
        assert not backend.dials and not backend.connections


# --- gRPC frontends: the happy path (serveRecvFrontend, serveRecvBackend) -------------------------


def test_grpc_happy_path() -> None:
    router = make_router()
    agent = router.add_backend("agent1", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    request = dial_req(42, "10.0.0.1:10250")
    assert router.receive_from_frontend(f, request, 1.0) == [SendToAgent(agent, request)]
    assert router.pending_dials == 1
    response = dial_rsp(42, connect_id=5)
    assert router.receive_from_agent(agent, response, 1.25) == [
        DialDuration(0.25),
        SendToFrontend(f, response),
    ]
    assert (router.pending_dials, router.established_connections) == (0, 1)
    # The first DATA takes the general path and fixes the stream's connectID.
    assert router.route_frontend_data(f, 5) is None
    assert router.receive_from_frontend(f, data(5), 2.0) == [SendToAgent(agent, data(5))]
    assert router.route_frontend_data(f, 5) is agent
    assert router.route_agent_data(agent, 5) is f
    assert router.receive_from_agent(agent, data(5, b"y"), 2.0) == [
        SendToFrontend(f, data(5, b"y"))
    ]
    assert router.receive_from_frontend(f, close_req(5), 3.0) == [SendToAgent(agent, close_req(5))]
    assert f.stopped
    assert router.route_frontend_data(f, 5) is None
    assert router.receive_from_agent(agent, close_rsp(5), 4.0) == [
        ConnectionDuration(3.0),
        SendToFrontend(f, close_rsp(5)),
    ]
    assert_empty(router)
    assert router.remove_frontend(f) == []
    assert not router.frontends


def test_raw_messages_are_forwarded_unchanged() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    request = dial_req(9)
    raw = encode_packet(request)
    [send] = router.receive_from_frontend(f, request, 0.0, raw)
    assert isinstance(send, SendToAgent) and send.message is raw
    response_raw = memoryview(encode_packet(dial_rsp(9, 3)))
    effects = router.receive_from_agent(agent, dial_rsp(9, 3), 0.0, response_raw)
    assert only(effects, SendToFrontend)[0].message is response_raw  # type: ignore[union-attr]


def test_mismatched_payload_reads_as_zero_and_is_normalised() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    # An empty Packet reads as a DIAL_REQ with a zero DialRequest (upstream would crash).
    effects = router.receive_from_frontend(f, Packet(), 0.0, b"")
    assert effects == [SendToAgent(agent, Packet(PacketType.DIAL_REQ, DialRequest()))]
    # DATA carrying the wrong payload reads as connectID 0: ignored.
    wrong = Packet(PacketType.DATA, CloseRequest(connect_id=3))
    assert router.receive_from_frontend(f, wrong, 0.0, b"raw") == []
    # An agent DIAL_RSP with no payload: random 0 is the pending dial above, error "".
    effects = router.receive_from_agent(agent, Packet(PacketType.DIAL_RSP), 0.0, b"raw")
    assert effects[-1] == SendToFrontend(f, Packet(PacketType.DIAL_RSP, DialResponse()))


# --- gRPC frontends: error paths --------------------------------------------------------------


def test_no_agent_available() -> None:
    router = make_router()
    f = router.add_frontend(GRPC)
    assert router.receive_from_frontend(f, dial_req(11), 0.0) == [
        fail(R.NO_AGENT),
        reply(f, dial_rsp(11, error="No agent available")),
    ]
    assert f.stopped
    router.add_backend("late", AgentIdentifiers())
    assert router.receive_from_frontend(f, dial_req(12), 0.0) == []  # processing stopped
    assert router.receive_from_frontend(f, data(1), 0.0) == []


def test_data_before_dial() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    assert router.receive_from_frontend(f, data(3), 0.0) == [
        reply(f, close_rsp(3, "backend not initialized"))
    ]
    assert router.receive_from_frontend(f, dial_req(1), 0.0) == []  # stopped


def test_close_req_before_dial_keeps_processing() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    assert router.receive_from_frontend(f, close_req(3), 0.0) == [
        reply(f, close_rsp(3, "backend uninitialized"))
    ]
    assert router.receive_from_frontend(f, dial_req(1), 0.0) == [SendToAgent(agent, dial_req(1))]


def test_close_req_to_a_lost_backend() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    established(router, f, agent)
    router.remove_backend(agent, 1.0)
    assert router.receive_from_frontend(f, close_req(1), 2.0) == [
        reply(f, close_rsp(1, "CLOSE_REQ to backend failed"))
    ]
    assert f.stopped


def test_data_to_a_lost_backend_is_dropped() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    established(router, f, agent)
    assert router.receive_from_frontend(f, data(1), 0.0) == [SendToAgent(agent, data(1))]
    router.remove_backend(agent, 1.0)
    assert router.route_frontend_data(f, 1) is None
    assert router.receive_from_frontend(f, data(1), 2.0) == []
    assert not f.stopped  # the stream carries on


def test_data_with_connect_id_zero_is_ignored() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    established(router, f, agent)
    assert router.route_frontend_data(f, 0) is None
    assert router.receive_from_frontend(f, data(0), 0.0) == []
    assert router.route_agent_data(agent, 0) is None
    assert router.receive_from_agent(agent, data(0), 0.0) == []
    assert f.connect_id == 0


def test_mismatched_connection_ids() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    established(router, f, agent, connect_id=1)
    router.receive_from_frontend(f, data(1), 0.0)
    assert router.receive_from_frontend(f, data(2), 0.0) == [
        SendToAgent(agent, close_req(2)),
        SendToAgent(agent, close_req(1)),
        reply(f, close_rsp(2, "mismatched connection IDs")),
        reply(f, close_rsp(1, "mismatched connection IDs")),
    ]
    assert f.stopped
    assert router.route_frontend_data(f, 1) is None


def test_data_for_a_connection_of_another_stream_is_refused() -> None:
    # Upstream forwards a stream's DATA to its backend whatever the connectID
    # (serveRecvFrontend), so a stream could write into another stream's tunnel; we answer
    # CLOSE_RSP instead.
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    victim = router.add_frontend(GRPC)
    established(router, victim, agent)
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(2), 0.0)
    router.receive_from_agent(agent, dial_rsp(2, 2), 0.0)
    assert router.receive_from_frontend(f, data(1), 0.0) == [
        reply(f, close_rsp(1, "unrecognized connectID"))
    ]
    assert f.stopped
    assert router.receive_from_frontend(victim, data(1), 0.0) == [SendToAgent(agent, data(1))]


def test_close_req_for_a_connection_of_another_stream_is_refused() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    victim = router.add_frontend(GRPC)
    established(router, victim, agent)
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(2), 0.0)
    assert router.receive_from_frontend(f, close_req(1), 0.0) == [
        reply(f, close_rsp(1, "unrecognized connectID"))
    ]
    assert router.established_connections == 1


def test_frontend_dial_cls_cancels_its_dial_without_telling_the_agent() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(5), 0.0)
    assert router.receive_from_frontend(f, dial_cls(5), 0.0) == [fail(R.FRONTEND_CLOSE)]
    assert router.receive_from_frontend(f, dial_cls(5), 0.0) == []  # already gone
    assert not f.stopped
    # The late DIAL_RSP is unrecognised and its connection closed at the agent (upstream's
    # serveRecvBackend, DIAL_RSP case).
    assert router.receive_from_agent(agent, dial_rsp(5, 8), 1.0) == [
        fail(R.UNRECOGNIZED_RESPONSE),
        SendToAgent(agent, close_req(8)),
    ]
    assert router.receive_from_agent(agent, dial_rsp(5, 0, "refused"), 1.0) == [
        fail(R.UNRECOGNIZED_RESPONSE)
    ]
    assert_empty(router)


def test_frontend_dial_cls_cannot_cancel_another_frontends_dial() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    owner, other = router.add_frontend(GRPC), router.add_frontend(GRPC)
    router.receive_from_frontend(owner, dial_req(5), 0.0)
    assert router.receive_from_frontend(other, dial_cls(5), 0.0) == []
    assert router.pending_dials == 1


def test_agent_dial_error_is_forwarded_and_not_established() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(5), 0.0)
    error = "dial tcp 10.0.0.1:443: connect: connection refused"
    assert router.receive_from_agent(agent, dial_rsp(5, 3, error), 0.0) == [
        fail(R.ERROR_RESPONSE),
        SendToFrontend(f, dial_rsp(5, 3, error)),
    ]
    assert_empty(router)
    assert router.route_agent_data(agent, 3) is None


def test_agent_dial_cls_is_forwarded() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(5), 0.0)
    assert router.receive_from_agent(agent, dial_cls(6), 0.0) == []  # unknown: ignored
    assert router.receive_from_agent(agent, dial_cls(5), 0.0) == [
        fail(R.BACKEND_CLOSE),
        SendToFrontend(f, dial_cls(5)),
    ]
    assert_empty(router)


def test_agent_data_for_an_unknown_connection_gets_close_req() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    other = router.add_backend("b", AgentIdentifiers())
    assert router.route_agent_data(agent, 9) is None
    assert router.receive_from_agent(agent, data(9), 0.0) == [SendToAgent(agent, close_req(9))]
    assert router.receive_from_agent(other, close_rsp(9, "Unknown connectID"), 0.0) == []


def test_ignored_packet_types() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    for packet in (dial_rsp(1, 1), close_rsp(1), drain(), Packet(99)):
        assert router.receive_from_frontend(f, packet, 0.0) == []
    for packet in (dial_req(1), close_req(1), Packet(42)):
        assert router.receive_from_agent(agent, packet, 0.0) == []
    assert not f.stopped and router.pending_dials == 0


def test_duplicate_dial_id_is_refused() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    first, second = router.add_frontend(GRPC), router.add_frontend(GRPC)
    router.receive_from_frontend(first, dial_req(5), 0.0)
    assert router.receive_from_frontend(second, dial_req(5), 0.0) == [
        reply(second, dial_rsp(5, error=ERR_DUPLICATE_DIAL))
    ]
    router.receive_from_agent(agent, dial_rsp(5, 1), 0.0)
    assert router.route_agent_data(agent, 1) is first


def test_dial_response_from_another_stream_is_unrecognised() -> None:
    router = make_router(["destHost"])
    chosen = router.add_backend("a", AgentIdentifiers(host=("n1",)))
    rogue = router.add_backend("b", AgentIdentifiers(host=("n2",)))
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(5, "n1:1"), 0.0)
    assert router.receive_from_agent(rogue, dial_rsp(5, 4), 0.0) == [
        fail(R.UNRECOGNIZED_RESPONSE),
        SendToAgent(rogue, close_req(4)),
    ]
    assert router.receive_from_agent(rogue, dial_cls(5), 0.0) == []
    assert router.pending_dials == 1
    assert router.receive_from_agent(chosen, dial_rsp(5, 4), 0.0)[-1] == SendToFrontend(
        f, dial_rsp(5, 4)
    )


def test_too_many_dials_on_one_stream() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    for random in range(MAX_CONNECTIONS_PER_FRONTEND):
        assert only(router.receive_from_frontend(f, dial_req(random), 0.0), SendToAgent)
    over = MAX_CONNECTIONS_PER_FRONTEND
    assert router.receive_from_frontend(f, dial_req(over), 0.0) == [
        reply(f, dial_rsp(over, error=ERR_TOO_MANY_DIALS))
    ]
    assert router.pending_dials == MAX_CONNECTIONS_PER_FRONTEND


def test_several_dials_on_one_stream_follow_the_latest_backend() -> None:
    router = make_router(["destHost"])
    a = router.add_backend("a", AgentIdentifiers(host=("ha",)))
    b = router.add_backend("b", AgentIdentifiers(host=("hb",)))
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(1, "ha:1"), 0.0)
    router.receive_from_agent(a, dial_rsp(1, 1), 0.0)
    router.receive_from_frontend(f, dial_req(2, "hb:1"), 0.0)
    router.receive_from_agent(b, dial_rsp(2, 1), 0.0)
    assert router.established_connections == 2
    # connectID 1 exists on both agents: the latest DIAL_REQ's backend wins, as upstream.
    assert router.receive_from_frontend(f, data(1), 0.0) == [SendToAgent(b, data(1))]
    assert router.route_agent_data(a, 1) is f and router.route_agent_data(b, 1) is f


# --- DRAIN ------------------------------------------------------------------------------------


def test_drain_prefers_other_agents_and_falls_back() -> None:
    router = make_router()
    old = router.add_backend("old", AgentIdentifiers())
    assert router.receive_from_agent(old, drain(), 0.0) == []
    assert old.draining
    f = router.add_frontend(GRPC)
    assert router.receive_from_frontend(f, dial_req(1), 0.0) == [SendToAgent(old, dial_req(1))]
    new = router.add_backend("new", AgentIdentifiers())
    for random in range(2, 30):
        frontend = router.add_frontend(GRPC)
        assert router.receive_from_frontend(frontend, dial_req(random), 0.0) == [
            SendToAgent(new, dial_req(random))
        ]
    assert router.ready  # draining agents still count


def test_drain_keeps_existing_connections() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    established(router, f, agent)
    router.receive_from_agent(agent, drain(), 0.0)
    assert router.route_agent_data(agent, 1) is f
    assert router.receive_from_frontend(f, data(1), 0.0) == [SendToAgent(agent, data(1))]


# --- frontend loss (ProxyServer.Proxy, its deferred cleanup) --------------------------------------


def test_frontend_loss_closes_its_dials_and_connections_at_their_agents() -> None:
    router = make_router(["destHost"])
    a = router.add_backend("a", AgentIdentifiers(host=("ha",)))
    b = router.add_backend("b", AgentIdentifiers(host=("hb",)))
    f = router.add_frontend(GRPC)
    bystander = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(1, "ha:1"), 0.0)
    router.receive_from_agent(a, dial_rsp(1, 10), 0.0)
    router.receive_from_frontend(f, dial_req(2, "hb:1"), 0.0)
    router.receive_from_frontend(bystander, dial_req(3, "hb:1"), 0.0)
    assert router.remove_frontend(f) == [
        SendToAgent(b, dial_cls(2)),
        SendToAgent(a, close_req(10)),
    ]  # no metric for gRPC
    assert router.remove_frontend(f) == []
    assert router.pending_dials == 1 and router.established_connections == 0
    # In-flight DATA for the closed connection is dropped; its CLOSE_RSP is not observed.
    assert router.receive_from_agent(a, data(10), 1.0) == []
    assert router.receive_from_agent(a, close_rsp(10), 1.0) == []
    assert router.receive_from_agent(a, data(10), 1.0) == [SendToAgent(a, close_req(10))]
    # The late DIAL_RSP of the cancelled dial closes its connection at the agent.
    assert router.receive_from_agent(b, dial_rsp(2, 20), 1.0) == [
        fail(R.UNRECOGNIZED_RESPONSE),
        SendToAgent(b, close_req(20)),
    ]
    assert router.receive_from_frontend(f, data(10), 2.0) == []  # closed: ignored


def test_closing_connections_are_bounded() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    for connect_id in range(1, MAX_CLOSING_PER_BACKEND + 2):
        f = router.add_frontend(GRPC)
        established(router, f, agent, random=connect_id, connect_id=connect_id)
        router.remove_frontend(f)
    assert len(agent.closing) == MAX_CLOSING_PER_BACKEND
    assert 1 not in agent.closing  # the oldest went first


# --- agent loss (serveRecvBackend's cleanup, and our improvement) ---------------------------------


def test_agent_loss_closes_exactly_its_connections_and_fails_its_dials_now() -> None:
    router = make_router(["destHost"])
    lost = router.add_backend("a", AgentIdentifiers(host=("ha",)))
    twin = router.add_backend("a", AgentIdentifiers(host=("ha2",)))  # same agentID
    other = router.add_backend("b", AgentIdentifiers(host=("hb",)))
    f1, f2, f3, f4 = (router.add_frontend(GRPC) for _ in range(4))
    router.receive_from_frontend(f1, dial_req(1, "ha:1"), 0.0)
    router.receive_from_agent(lost, dial_rsp(1, 1), 0.0)
    router.receive_from_frontend(f2, dial_req(2, "ha2:1"), 0.0)
    router.receive_from_agent(twin, dial_rsp(2, 1), 0.0)  # same agentID, same connectID
    router.receive_from_frontend(f3, dial_req(3, "hb:1"), 0.0)
    router.receive_from_agent(other, dial_rsp(3, 1), 0.0)
    router.receive_from_frontend(f4, dial_req(4, "ha:1"), 1.0)
    assert router.remove_backend(lost, 3.0) == [
        ConnectionDuration(3.0),
        SendToFrontend(f1, close_rsp(1, "")),
        fail(R.BACKEND_CLOSE),
        reply(f4, dial_rsp(4, error=ERR_BACKEND_GONE)),
    ]
    assert ERR_BACKEND_GONE == "context canceled"
    assert router.remove_backend(lost, 3.0) == []
    assert router.established_connections == 2 and router.pending_dials == 0
    assert router.route_agent_data(twin, 1) is f2
    assert router.route_agent_data(other, 1) is f3
    assert router.receive_from_agent(lost, data(1), 3.0) == []  # late packets: ignored
    assert router.remove_frontend(f1) == [] and router.remove_frontend(f4) == []
    assert lost not in router.backends.values()


def test_agent_loss_leaves_readiness_and_selection() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    assert router.ready
    router.remove_backend(agent, 0.0)
    assert not router.ready
    f = router.add_frontend(GRPC)
    assert router.receive_from_frontend(f, dial_req(1), 0.0)[0] == fail(R.NO_AGENT)


def test_reused_connect_id_closes_the_old_connection() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    old, new = router.add_frontend(GRPC), router.add_frontend(GRPC)
    established(router, old, agent, random=1, connect_id=1)
    router.receive_from_frontend(new, dial_req(2), 5.0)
    assert router.receive_from_agent(agent, dial_rsp(2, 1), 6.0) == [
        ConnectionDuration(6.0),
        SendToFrontend(old, close_rsp(1, "")),
        DialDuration(1.0),
        SendToFrontend(new, dial_rsp(2, 1)),
    ]
    assert router.route_agent_data(agent, 1) is new
    assert router.established_connections == 1


# --- --backend-dial-timeout (sendDialRequestToBackend, startPendingDialTimeout) -------------------


def test_dial_timeout() -> None:
    router = make_router(dial_timeout=5.0)
    agent = router.add_backend("a", AgentIdentifiers())
    f1, f2 = router.add_frontend(GRPC), router.add_frontend(GRPC)
    assert router.get_timer() is None
    router.receive_from_frontend(f1, dial_req(1), 10.0)
    router.receive_from_frontend(f2, dial_req(2), 12.0)
    assert router.get_timer() == 15.0
    assert router.dials_due(14.9) == []
    assert router.handle_timer(14.9) == []
    assert [dial.random for dial in router.dials_due(17.0)] == [1, 2]
    assert [dial.random for dial in router.dials_due(15.0)] == [1]
    assert router.handle_timer(15.0) == [
        fail(R.BACKEND_DIAL_TIMEOUT),
        reply(f1, dial_rsp(1, error="timed out waiting for backend dial")),
    ]
    assert router.get_timer() == 17.0
    router.receive_from_agent(agent, dial_rsp(2, 1), 16.0)
    assert router.get_timer() is None
    assert router.handle_timer(100.0) == []
    # No DIAL_CLS went to the agent; its late answer is closed there.
    assert router.receive_from_agent(agent, dial_rsp(1, 2), 16.0) == [
        fail(R.UNRECOGNIZED_RESPONSE),
        SendToAgent(agent, close_req(2)),
    ]
    assert not f1.stopped


def test_no_timer_without_a_timeout() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(1), 0.0)
    assert router.get_timer() is None
    assert router.handle_timer(1e9) == []
    with pytest.raises(ValueError):
        make_router(dial_timeout=-1.0)


def test_several_dials_expire_together_in_order() -> None:
    router = make_router(dial_timeout=1.0)
    router.add_backend("a", AgentIdentifiers())
    frontends = [router.add_frontend(GRPC) for _ in range(3)]
    for random, f in enumerate(frontends):
        router.receive_from_frontend(f, dial_req(random), float(random))
    sends = only(router.handle_timer(10.0), SendToFrontend)
    assert [send.frontend for send in sends] == frontends  # type: ignore[union-attr]
    assert router.pending_dials == 0


def test_retire_backend() -> None:
    router = make_router(dial_timeout=5.0)
    stalled = router.add_backend("a", AgentIdentifiers())
    f, g = router.add_frontend(GRPC), router.add_frontend(GRPC)
    established(router, f, stalled, random=1, connect_id=1)
    router.receive_from_frontend(g, dial_req(2), 0.0)
    assert router.retire_backend(stalled) == [
        RetireBackend(stalled),
        fail(R.BACKEND_DIAL_TIMEOUT),
        reply(g, dial_rsp(2, error="timed out waiting for backend dial")),
    ]
    assert router.retire_backend(stalled) == []
    assert stalled.draining and not router.ready
    assert router.route_agent_data(stalled, 1) is f  # still flowing until the stream ends
    assert router.remove_backend(stalled, 2.0) == [
        ConnectionDuration(2.0),
        SendToFrontend(f, close_rsp(1, "")),
    ]


# --- HTTP-CONNECT frontends (Tunnel.ServeHTTP) ----------------------------------------------------


def http_dial(
    router: Router, address: str = "10.0.0.5:10250", now: float = 0.0
) -> tuple[Frontend, Backend, int]:
    f = router.add_frontend(HTTP)
    [send] = router.dial_http_connect(f, address, now)
    assert isinstance(send, SendToAgent) and isinstance(send.message, Packet)
    request = send.message.payload
    assert isinstance(request, DialRequest)
    assert (request.protocol, request.address) == ("tcp", address)
    assert 0 <= request.random < 2**63
    return f, send.backend, request.random


def test_http_happy_path() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f, chosen, random = http_dial(router, now=1.0)
    assert chosen is agent
    assert router.receive_from_agent(agent, dial_rsp(random, 4), 1.5) == [
        DialDuration(0.5),
        TunnelEstablished(f, 4),
    ]
    assert (f.connect_id, f.backend) == (4, agent)
    assert router.route_frontend_data(f, f.connect_id) is agent
    assert router.route_agent_data(agent, 4) is f
    assert router.receive_from_agent(agent, data(4), 2.0) == [SendToFrontend(f, data(4))]
    assert router.receive_from_agent(agent, close_rsp(4), 3.0) == [
        ConnectionDuration(2.0),
        CloseFrontend(f, CloseReason.CLOSE_RSP),
    ]
    assert f.closed and router.route_frontend_data(f, 4) is None
    assert router.remove_frontend(f) == []  # no redundant CLOSE_REQ
    assert_empty(router)
    assert not router.frontends


def test_http_no_agent_is_not_counted() -> None:
    router = make_router()
    f = router.add_frontend(HTTP)
    assert router.dial_http_connect(f, "x:1", 0.0) == [
        CloseFrontend(f, CloseReason.NO_AGENT, "No agent available")
    ]
    assert f.closed


def test_http_dial_error() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router)
    error = "dial tcp 10.0.0.5:10250: i/o timeout"
    assert router.receive_from_agent(agent, dial_rsp(random, 2, error), 0.0) == [
        fail(R.ERROR_RESPONSE),
        CloseFrontend(f, CloseReason.DIAL_ERROR, error),
    ]
    assert_empty(router)


def test_http_agent_dial_cls() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router)
    assert router.receive_from_agent(agent, dial_cls(random), 0.0) == [
        fail(R.BACKEND_CLOSE),
        CloseFrontend(f, CloseReason.DIAL_CLOSED),
    ]


def test_http_agent_lost_while_dialling() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, _ = http_dial(router)
    assert router.remove_backend(agent, 1.0) == [
        fail(R.BACKEND_CLOSE),
        CloseFrontend(f, CloseReason.DIAL_BACKEND_GONE, "context canceled"),
    ]


def test_http_dial_timeout() -> None:
    router = make_router(dial_timeout=2.0)
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router, now=1.0)
    assert router.handle_timer(3.0) == [
        fail(R.BACKEND_DIAL_TIMEOUT),
        CloseFrontend(f, CloseReason.DIAL_TIMEOUT, "timed out waiting for backend dial"),
    ]
    assert only(router.receive_from_agent(agent, dial_rsp(random, 3), 4.0), SendToAgent) == [
        SendToAgent(agent, close_req(3))
    ]


def test_http_client_leaves_while_dialling() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router)
    assert router.remove_frontend(f) == [
        fail(R.FRONTEND_CLOSE),
        SendToAgent(agent, dial_cls(random)),
    ]
    assert_empty(router)


def test_http_client_leaves_when_established() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router, now=1.0)
    router.receive_from_agent(agent, dial_rsp(random, 6), 1.0)
    assert router.remove_frontend(f) == [SendToAgent(agent, close_req(6))]
    assert router.route_agent_data(agent, 6) is None
    assert router.receive_from_agent(agent, data(6), 5.0) == []
    # Upstream observes the tunnel's duration at the agent's CLOSE_RSP.
    assert router.receive_from_agent(agent, close_rsp(6), 6.0) == [ConnectionDuration(5.0)]
    assert router.receive_from_agent(agent, close_rsp(6, "Unknown connectID"), 6.0) == []


def test_http_agent_lost_when_established() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router)
    router.receive_from_agent(agent, dial_rsp(random, 6), 0.0)
    assert router.remove_backend(agent, 4.0) == [
        ConnectionDuration(4.0),
        CloseFrontend(f, CloseReason.BACKEND_GONE),
    ]


def test_http_closing_tunnels_are_observed_on_agent_loss() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    f, agent, random = http_dial(router)
    router.receive_from_agent(agent, dial_rsp(random, 6), 0.0)
    router.remove_frontend(f)
    assert router.remove_backend(agent, 4.0) == [ConnectionDuration(4.0)]


def test_http_dial_ids_avoid_pending_ones() -> None:
    router = make_router(seed=3)
    router.add_backend("a", AgentIdentifiers())
    randoms = {http_dial(router)[2] for _ in range(200)}
    assert len(randoms) == 200


def test_adapter_mistakes_raise() -> None:
    router = make_router()
    router.add_backend("a", AgentIdentifiers())
    grpc_frontend, http_frontend = router.add_frontend(GRPC), router.add_frontend(HTTP)
    with pytest.raises(ValueError, match="not an HTTP-CONNECT"):
        router.dial_http_connect(grpc_frontend, "x:1", 0.0)
    with pytest.raises(ValueError, match="not a gRPC"):
        router.receive_from_frontend(http_frontend, data(1), 0.0)
    router.dial_http_connect(http_frontend, "x:1", 0.0)
    with pytest.raises(ValueError, match="already dialled"):
        router.dial_http_connect(http_frontend, "x:1", 0.0)


# --- strategies through the router --------------------------------------------------------------


def test_dest_host_routing_with_fallthrough() -> None:
    router = make_router(["destHost", "default"])
    node = router.add_backend("n", AgentIdentifiers(ipv4=("10.1.1.1",), host=("node1",)))
    generic = router.add_backend("g", AgentIdentifiers())
    assert router.ready
    for random, (address, target) in enumerate([("10.1.1.1:10250", node), ("node1:22", node)]):
        f = router.add_frontend(GRPC)
        assert router.receive_from_frontend(f, dial_req(random, address), 0.0) == [
            SendToAgent(target, dial_req(random, address))
        ]
    chosen = set()
    for random in range(10, 60):
        f = router.add_frontend(GRPC)
        [send] = router.receive_from_frontend(f, dial_req(random, "10.9.9.9:1"), 0.0)
        chosen.add(send.backend)  # type: ignore[union-attr]
    assert chosen == {node, generic}
    assert router.backend_managers.ready_backends() == {"destHost": 2, "default": 2}


def test_data_of_established_tunnels_ignores_payload_contents() -> None:
    router = make_router()
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    established(router, f, agent)
    empty = Packet(PacketType.DATA, Data(1))
    assert router.receive_from_agent(agent, empty, 0.0) == [SendToFrontend(f, empty)]


# --- which frontend writes are the server's own (frontend_write_duration_seconds) -----------------


def test_server_answers_are_not_connection_writes() -> None:
    """Upstream times the writes it makes through a connection record (what an agent sent,
    and the CLOSE_RSP of an agent's loss: ProxyClientConnection.send), not the server's own
    answers to a DIAL_REQ or DATA (written to the stream directly)."""
    router = make_router()
    lonely = router.add_frontend(GRPC)
    (no_agent,) = only(router.receive_from_frontend(lonely, dial_req(1), 0.0), SendToFrontend)
    assert not no_agent.via_connection
    agent = router.add_backend("a", AgentIdentifiers())
    f = router.add_frontend(GRPC)
    router.receive_from_frontend(f, dial_req(2), 0.0)
    (forwarded,) = only(router.receive_from_agent(agent, dial_rsp(2, 1), 0.0), SendToFrontend)
    (echoed,) = only(router.receive_from_agent(agent, data(1), 0.0), SendToFrontend)
    assert forwarded.via_connection and echoed.via_connection
    (mismatch, _) = only(
        router.receive_from_frontend(f, data(1), 0.0)
        + router.receive_from_frontend(f, data(9), 0.0),
        SendToFrontend,
    )
    assert not mismatch.via_connection
    (lost,) = only(router.remove_backend(agent, 1.0), SendToFrontend)
    assert lost.message == close_rsp(1, "") and lost.via_connection
