"""gRPC-mode scenarios (upstream's pkg/server/server.go Proxy, Connect and their receive
loops serveRecvFrontend, serveRecvBackend), end to end: grpcio
frontend dialers and grpcio agents (tests/support/agent_peer.py) around an in-process
proxy-server, its frontend on a Unix socket (h2c) and on TCP+mTLS. Every scenario ends with
the registry's metric values and, in teardown, a check that no fd or task was left.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import pytest

from tests.support.agent_peer import (
    DialPolicy,
    backend,
    close_req,
    close_rsp,
    data,
    dial_cls,
    dial_req,
    echo,
    hello,
    ptype,
    wait_until,
)

from .conftest import (
    ZERO_OR_ABSENT,
    Certs,
    ProxyEnv,
    RunFn,
    check_metrics,
    failures,
    packets,
    proxy_env,
    scrape,
)

TRANSPORTS = ["uds", "tcp"]
UNREACHABLE = "10.255.255.1:443"  # never dialled for real: the agent's policy answers


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def idle_gauges(
    connects: int = 0, dialled: bool = True, connected: bool = False
) -> dict[str, float | None]:
    """The gauges once every tunnel is gone (``connects`` agents still connected). Upstream
    shows the dial gauges from their first update: pending once a dial reached an agent
    (``dialled``), established once a dial succeeded (``connected``)."""
    return {
        "pending_backend_dials": 0 if dialled else ZERO_OR_ABSENT,
        "established_connections": 0 if connected else ZERO_OR_ABSENT,
        'grpc_connections{service_method="Proxy"}': 0,
        'grpc_connections{service_method="Connect"}': connects,
    }


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_dial_data_close(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """The happy path: DIAL_REQ forwarded unchanged, DATA both ways through a real echo
    backend, CLOSE_REQ -> CLOSE_RSP, the stream then ends OK."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent(agent_id="a1")
            assert agent.headers["serverid"] == "scenario-server"
            assert agent.headers["servercount"] == "2"
            stream = env.dialer().stream()
            request = dial_req(echo_backend.address, 1234)
            connect_id = await stream.connect(echo_backend.address, 1234)
            assert connect_id == 1
            # The DIAL_REQ reached the agent byte for byte.
            assert agent.raw_received[0] == request.SerializeToString()
            for size in (1, 4096, 100_000):
                payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
                await stream.send(data(connect_id, payload))
                assert await stream.read_data(connect_id, size) == payload
            await stream.send(close_req(connect_id))
            rsp = await stream.expect("CLOSE_RSP")
            assert (rsp.closeResponse.connectID, rsp.closeResponse.error) == (connect_id, "")
            assert await stream.end() == grpc.StatusCode.OK
            await wait_until(lambda: not env.proxy.router.frontends, "frontend removed")
            check_metrics(
                {
                    **idle_gauges(connects=1, connected=True),
                    "dial_duration_seconds_count": 1,
                    'ready_backends{proxy_strategy="default"}': 1,
                    packets("from_client", "DIAL_REQ"): 1,
                    packets("to_agent", "DIAL_REQ"): 1,
                    packets("from_agent", "DIAL_RSP"): 1,
                    packets("to_client", "DIAL_RSP"): 1,
                    packets("from_client", "DATA"): 3,
                    packets("to_agent", "CLOSE_REQ"): 1,
                    packets("to_client", "CLOSE_RSP"): 1,
                    failures("no_agent"): None,
                }
            )
            await agent.close()
            await wait_until(lambda: not env.proxy.router.backends, "backend removed")
            check_metrics(
                {
                    **idle_gauges(connects=0, connected=True),
                    'ready_backends{proxy_strategy="default"}': 0,
                }
            )

    arun(main())


def closed_port() -> str:
    """An address nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def frontend_gone(env: ProxyEnv) -> None:
    await wait_until(lambda: not env.proxy.router.frontends, "every frontend removed")


def test_no_agent_available(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """No agent: DIAL_RSP "No agent available"; the stream stays open and later packets,
    even a DIAL_REQ once an agent is there, are dropped until the client closes."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport) as env:
            stream = env.dialer().stream()
            rsp = await stream.dial(UNREACHABLE, 7)
            assert ptype(rsp) == "DIAL_RSP"
            assert (
                rsp.dialResponse.random,
                rsp.dialResponse.connectID,
                rsp.dialResponse.error,
            ) == (7, 0, "No agent available")
            agent = await env.agent()
            await stream.send(data(1, b"dropped"))
            await stream.send(dial_req(UNREACHABLE, 8))
            assert await stream.end() == grpc.StatusCode.OK
            assert stream.received == [rsp]
            await frontend_gone(env)
            assert agent.received == []
            check_metrics(
                {
                    **idle_gauges(connects=1, dialled=False),
                    failures("no_agent"): 1,
                    # Server-made answers are not frontend writes of a connection
                    # (upstream times only ProxyClientConnection.send, pkg/server/server.go).
                    "frontend_write_duration_seconds_count": None,
                    packets("from_client", "DIAL_REQ"): 2,
                    packets("from_client", "DATA"): 1,
                    packets("to_client", "DIAL_RSP"): 1,
                    packets("to_agent", "DIAL_REQ"): None,
                }
            )

    arun(main())


def test_dial_timeout_then_late_dial_rsp(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str
) -> None:
    """--backend-dial-timeout: DIAL_RSP "timed out waiting for backend dial", nothing to the
    agent; the agent's late success is unrecognized and answered with CLOSE_REQ."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport, dial_timeout=0.2) as env:
            agent = await env.agent(policy=DialPolicy.HOLD)
            stream = env.dialer().stream()
            rsp = await stream.dial(UNREACHABLE, 11)
            assert (ptype(rsp), rsp.dialResponse.random, rsp.dialResponse.error) == (
                "DIAL_RSP",
                11,
                "timed out waiting for backend dial",
            )
            assert env.proxy.router.pending_dials == 0
            assert list(agent.held) == [11]
            await agent.answer(11, connect_id=5)
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 5)
            assert await stream.end() == grpc.StatusCode.OK
            assert stream.received == [rsp]
            assert agent.packets("DIAL_CLS") == []
            await frontend_gone(env)
            check_metrics(
                {
                    **idle_gauges(connects=1),
                    failures("backend_dial_timeout"): 1,
                    failures("unrecognized_response"): 1,
                    "dial_duration_seconds_count": None,
                    "frontend_write_duration_seconds_count": None,
                }
            )

    arun(main())


def test_data_before_dial(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """DATA before any DIAL_REQ: CLOSE_RSP "backend not initialized", processing stops."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport) as env:
            agent = await env.agent()
            stream = env.dialer().stream()
            await stream.send(data(3, b"early"))
            rsp = await stream.expect("CLOSE_RSP")
            assert (rsp.closeResponse.connectID, rsp.closeResponse.error) == (
                3,
                "backend not initialized",
            )
            await stream.send(dial_req(UNREACHABLE, 9))  # dropped: the processor stopped
            assert await stream.end() == grpc.StatusCode.OK
            assert stream.received == [rsp]
            await frontend_gone(env)
            assert agent.received == []
            check_metrics(
                {
                    **idle_gauges(connects=1, dialled=False),
                    packets("to_agent", "DIAL_REQ"): None,
                    "frontend_write_duration_seconds_count": None,
                }
            )

    arun(main())


def test_close_before_dial_then_dial(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str
) -> None:
    """CLOSE_REQ before any DIAL_REQ: CLOSE_RSP "backend uninitialized", and processing
    carries on: a dial on the same stream then works."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            await env.agent()
            stream = env.dialer().stream()
            await stream.send(close_req(4))
            rsp = await stream.expect("CLOSE_RSP")
            assert (rsp.closeResponse.connectID, rsp.closeResponse.error) == (
                4,
                "backend uninitialized",
            )
            connect_id = await stream.connect(echo_backend.address, 12)
            await stream.send(data(connect_id, b"ping"))
            assert await stream.read_data(connect_id, 4) == b"ping"
            assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics(
                {**idle_gauges(connects=1, connected=True), "dial_duration_seconds_count": 1}
            )

    arun(main())


def test_mismatched_connection_ids(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str
) -> None:
    """A DATA with a second connectID: CLOSE_REQ for both to the agent and CLOSE_RSP
    "mismatched connection IDs" for both to the frontend, the new ID first; the agent's
    CLOSE_RSP for the real connection still reaches the frontend."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent()
            stream = env.dialer().stream()
            connect_id = await stream.connect(echo_backend.address, 21)
            await stream.send(data(connect_id, b"a"))
            assert await stream.read_data(connect_id, 1) == b"a"
            other = connect_id + 1
            await stream.send(data(other, b"b"))
            first = await stream.expect("CLOSE_RSP")
            second = await stream.expect("CLOSE_RSP")
            assert [
                (p.closeResponse.connectID, p.closeResponse.error) for p in (first, second)
            ] == [(other, "mismatched connection IDs"), (connect_id, "mismatched connection IDs")]
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == connect_id)
            assert [p.closeRequest.connectID for p in agent.packets("CLOSE_REQ")] == [
                other,
                connect_id,
            ]
            # The agent closed the real connection: its CLOSE_RSP is forwarded.
            final = await stream.expect("CLOSE_RSP")
            assert (final.closeResponse.connectID, final.closeResponse.error) == (connect_id, "")
            assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics(
                {
                    **idle_gauges(connects=1, connected=True),
                    "dial_duration_seconds_count": 1,
                    # DIAL_RSP, one DATA, the agent's CLOSE_RSP; not the two server-made ones.
                    "frontend_write_duration_seconds_count": 3,
                }
            )

    arun(main())


def test_agent_dial_cls(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """The agent answers DIAL_REQ with DIAL_CLS: forwarded to the frontend, backend_close."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport) as env:
            await env.agent(policy=DialPolicy.DIAL_CLS)
            stream = env.dialer().stream()
            rsp = await stream.dial(UNREACHABLE, 31)
            assert (ptype(rsp), rsp.closeDial.random) == ("DIAL_CLS", 31)
            assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics(
                {
                    **idle_gauges(connects=1),
                    failures("backend_close"): 1,
                    packets("to_client", "DIAL_CLS"): 1,
                    "frontend_write_duration_seconds_count": 1,
                }
            )

    arun(main())


def test_frontend_dial_cls_then_late_dial_rsp(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str
) -> None:
    """The frontend gives up with DIAL_CLS: the dial is dropped (frontend_close), nothing
    goes to the agent; its late success is answered with CLOSE_REQ."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport) as env:
            agent = await env.agent(policy=DialPolicy.HOLD)
            stream = env.dialer().stream()
            await stream.send(dial_req(UNREACHABLE, 41))
            await agent.wait_held()
            await stream.send(dial_cls(41))
            await wait_until(lambda: env.proxy.router.pending_dials == 0, "dial dropped")
            await agent.answer(41, connect_id=3)
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 3)
            assert agent.packets("DIAL_CLS") == []
            assert await stream.end() == grpc.StatusCode.OK
            assert stream.received == []
            await frontend_gone(env)
            check_metrics(
                {
                    **idle_gauges(connects=1),
                    failures("frontend_close"): 1,
                    failures("unrecognized_response"): 1,
                }
            )

    arun(main())


def test_agent_dial_error(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """A real dial to a closed port: the agent's error text reaches the frontend verbatim."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport) as env:
            await env.agent()
            address = closed_port()
            stream = env.dialer().stream()
            rsp = await stream.dial(address, 51)
            assert (ptype(rsp), rsp.dialResponse.random, rsp.dialResponse.connectID) == (
                "DIAL_RSP",
                51,
                0,
            )
            assert rsp.dialResponse.error == f"dial tcp {address}: connect: connection refused"
            assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics(
                {
                    **idle_gauges(connects=1),
                    failures("error_response"): 1,
                    "dial_duration_seconds_count": None,
                    "frontend_write_duration_seconds_count": 1,
                }
            )

    arun(main())


@pytest.mark.parametrize("how", ["disconnect", "close"])
def test_agent_loss(arun: RunFn, certs: Certs, sock_dir: str, transport: str, how: str) -> None:
    """An agent goes with one established and one pending tunnel: the established one gets
    CLOSE_RSP{id, ""}, the pending one DIAL_RSP "context canceled" at once (upstream leaves
    it to the client's timeout); a new dial then finds no agent."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent(policies={UNREACHABLE: DialPolicy.HOLD})
            dialer = env.dialer()
            established, pending = dialer.stream(), dialer.stream()
            connect_id = await established.connect(echo_backend.address, 61)
            await pending.send(dial_req(UNREACHABLE, 62))
            await agent.wait_held()
            await (agent.disconnect() if how == "disconnect" else agent.close())
            rsp = await established.expect("CLOSE_RSP")
            assert (rsp.closeResponse.connectID, rsp.closeResponse.error) == (connect_id, "")
            dial = await pending.expect("DIAL_RSP")
            assert (dial.dialResponse.random, dial.dialResponse.error) == (62, "context canceled")
            again = dialer.stream()
            rsp = await again.dial(UNREACHABLE, 63)
            assert rsp.dialResponse.error == "No agent available"
            for stream in (established, pending, again):
                assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            assert env.proxy.router.backends == {}
            check_metrics(
                {
                    **idle_gauges(connects=0, connected=True),
                    failures("backend_close"): 1,
                    failures("no_agent"): 1,
                    "connection_duration_seconds_count": None,  # not in v0.36.0
                    'ready_backends{proxy_strategy="default"}': 0,
                }
            )

    arun(main())


@pytest.mark.parametrize("how", ["half-close", "cancel"])
@pytest.mark.parametrize("pattern", ["shared", "per-dial"])
def test_stream_end_cleans_up(
    arun: RunFn, certs: Certs, sock_dir: str, *, transport: str, how: str, pattern: str
) -> None:
    """A frontend stream's end sends DIAL_CLS for its pending dial and CLOSE_REQ for its
    connection to the agent (upstream's ProxyServer.Proxy, its deferred cleanup), for both
    client patterns."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent(policies={UNREACHABLE: DialPolicy.HOLD})
            first = env.dialer()
            second = first if pattern == "shared" else env.dialer()
            established, pending = first.stream(), second.stream()
            connect_id = await established.connect(echo_backend.address, 71)
            await pending.send(dial_req(UNREACHABLE, 72))
            await agent.wait_held()
            for stream in (established, pending):
                if how == "cancel":
                    stream.cancel()
                else:
                    assert await stream.end() == grpc.StatusCode.OK
            await agent.wait_packet("DIAL_CLS", lambda p: p.closeDial.random == 72)
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == connect_id)
            await frontend_gone(env)
            # The agent's CLOSE_RSP for the connection finds no frontend: absorbed.
            await wait_until(lambda: not agent.conns, "agent connection closed")
            await agent.answer(72, connect_id=99)  # late: answered with CLOSE_REQ
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 99)
            check_metrics(
                {
                    **idle_gauges(connects=1, connected=True),
                    failures("unrecognized_response"): 1,
                    "connection_duration_seconds_count": None,
                }
            )

    arun(main())


def test_backend_closes_first(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """The backend writes and closes: DATA, then the agent's unsolicited CLOSE_RSP."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(hello(b"hello, then bye")) as hello_backend,
        ):
            await env.agent()
            stream = env.dialer().stream()
            connect_id = await stream.connect(hello_backend.address, 81)
            assert await stream.read_data(connect_id, 15) == b"hello, then bye"
            rsp = await stream.expect("CLOSE_RSP")
            assert (rsp.closeResponse.connectID, rsp.closeResponse.error) == (connect_id, "")
            assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics(
                {
                    **idle_gauges(connects=1, connected=True),
                    "connection_duration_seconds_count": None,  # not in v0.36.0
                    packets("to_client", "DATA"): 1,
                }
            )

    arun(main())


def test_agent_packets_for_unknown_ids(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str
) -> None:
    """From the agent: DATA for an unknown connectID gets CLOSE_REQ back; a CLOSE_RSP, a
    DIAL_RSP or DIAL_CLS for nothing known is ignored; DATA with ID 0 is ignored."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, transport=transport) as env:
            agent = await env.agent()
            await agent.send(close_rsp(55, "whatever"))
            await agent.send(dial_cls(56))
            await agent.send(data(0, b"zero"))
            await agent.send(data(77, b"stray"))
            rsp = await agent.wait_packet("CLOSE_REQ")
            assert rsp.closeRequest.connectID == 77
            assert [ptype(p) for p in agent.received] == ["CLOSE_REQ"]
            check_metrics(
                {
                    **idle_gauges(connects=1, dialled=False),
                    'grpc_connections{service_method="Proxy"}': None,
                    packets("from_agent", "DATA"): 2,
                    packets("to_agent", "CLOSE_REQ"): 1,
                    failures("backend_close"): None,
                }
            )

    arun(main())


@pytest.mark.parametrize("pattern", ["shared", "per-dial"])
def test_client_patterns(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str, pattern: str
) -> None:
    """kube-apiserver's two patterns, 32 tunnels at once: one connection per dial, or many
    concurrent streams on one connection."""
    count = 32

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            await env.agent()
            shared = env.dialer()

            async def one(i: int) -> None:
                dialer = shared if pattern == "shared" else env.dialer()
                stream = dialer.stream()
                connect_id = await stream.connect(echo_backend.address, 1000 + i)
                payload = i.to_bytes(4, "big") * 1024
                await stream.send(data(connect_id, payload))
                assert await stream.read_data(connect_id, len(payload)) == payload
                await stream.send(close_req(connect_id))
                await stream.expect("CLOSE_RSP")
                assert await stream.end() == grpc.StatusCode.OK

            await asyncio.gather(*(one(i) for i in range(count)))
            await frontend_gone(env)
            assert echo_backend.accepted == count
            check_metrics(
                {
                    **idle_gauges(connects=1, connected=True),
                    "dial_duration_seconds_count": count,
                    "connection_duration_seconds_count": None,  # not in v0.36.0
                    packets("to_agent", "DIAL_REQ"): count,
                }
            )

    arun(main())


@pytest.mark.parametrize(
    ("agent_id", "identifiers", "extra", "message"),
    [
        (None, "", (), "expected one agent ID in the context, got []"),
        (
            "a",
            None,
            (("agentidentifiers", "host=x"), ("agentidentifiers", "host=y")),
            "expected at most one set of agent identifiers in the context, got [host=x host=y]",
        ),
        ("a", "host=%zz", (), 'fail to parse url encoded string: invalid URL escape "%zz"'),
    ],
)
def test_agent_metadata_refused(
    arun: RunFn,
    certs: Certs,
    sock_dir: str,
    *,
    agent_id: str | None,
    identifiers: str | None,
    extra: tuple[tuple[str, str], ...],
    message: str,
) -> None:
    """Bad agent metadata: status UNKNOWN with upstream's message, no server headers, and
    the Connect gauge back at 0."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env:
            agent = env.new_agent(agent_id=agent_id, identifiers=identifiers, extra_metadata=extra)
            code, details = await agent.refused()
            assert (code, details) == (grpc.StatusCode.UNKNOWN, message)
            assert "serverid" not in agent.headers
            assert env.proxy.router.backends == {}
            await agent.disconnect()
            await wait_until(lambda: scrape_connects() == 0, "Connect gauge at 0")
            assert not env.proxy.router.ready

    arun(main())


def scrape_connects() -> float | None:
    return scrape().get('grpc_connections{service_method="Connect"}')


def test_stalled_agent_is_retired(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """An agent that stops reading its stream: once its flow-control window is full, a
    DIAL_REQ to it cannot be sent within --backend-dial-timeout. Upstream then retires the
    stream (pkg/server/server.go sendDialRequestToBackend, retireBackend): the dial fails
    with "timed out waiting for backend dial"
    (backend_dial_timeout), the stream is no longer chosen, and its Connect ends with OK.
    Every later dial must go to the healthy agent."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, dial_timeout=0.5) as env,
            backend(echo) as echo_backend,
        ):
            stalled = await env.agent(agent_id="stalled")
            dialer = env.dialer()
            tunnel = dialer.stream()
            connect_id = await tunnel.connect(echo_backend.address, 1)
            (server_side,) = env.proxy.router.backends.values()
            stalled.stall()
            chunk = b"\0" * (256 << 10)

            async def push() -> None:
                while True:
                    await tunnel.send(data(connect_id, chunk))

            pusher = asyncio.get_running_loop().create_task(push())
            try:
                # The agent's window is full: the server holds data it cannot send.
                await wait_until(
                    lambda: server_side.conn.outbound_pending() >= len(chunk), "agent blocked"
                )
                healthy = await env.agent(
                    agent_id="healthy", policy=DialPolicy.ERROR, dial_error="healthy"
                )
                answers = []
                for i in range(8):
                    rsp = await dialer.stream().dial(UNREACHABLE, 100 + i)
                    answers.append(rsp.dialResponse.error)
                # The seeded choice sends the first dial to the stalled agent: it alone
                # times out, every later one goes to the healthy agent.
                assert answers == ["timed out waiting for backend dial"] + ["healthy"] * 7, answers
                await wait_until(
                    lambda: server_side.closed or server_side.retired, "stalled stream retired"
                )
                check_metrics({failures("backend_dial_timeout"): 1})
                assert healthy.status is None
            finally:
                pusher.cancel()
                with contextlib.suppress(BaseException):
                    await pusher

    arun(main())
