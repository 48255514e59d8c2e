"""HTTP-CONNECT scenarios (upstream's pkg/server/tunnel.go Tunnel.ServeHTTP and the
HTTP-CONNECT branch of ProxyClientConnection.send in pkg/server/server.go), end to end: clients
on asyncio streams (Unix socket, and TCP with mTLS, HTTP/1.1 by ALPN), grpcio agents
(tests/support/agent_peer.py) around an in-process proxy-server. Every scenario ends with the
registry's metric values and, in teardown, a check that no fd or task was left.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.agent_peer import (
    DialPolicy,
    HttpTunnel,
    backend,
    close_rsp,
    echo,
    hello,
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
)
from .test_scenarios_grpc import UNREACHABLE, closed_port

RESPONSE_200 = b"HTTP/1.1 200 Connection Established\r\n\r\n"
TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"


@pytest.fixture(params=["uds", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def http_idle(connected: bool = True, dialled: bool = True) -> dict[str, float | None]:
    """The gauges once every tunnel is gone; HTTP-CONNECT has no gRPC frontend streams."""
    return {
        "http_connections": 0,
        "pending_backend_dials": 0 if dialled else ZERO_OR_ABSENT,
        "established_connections": 0 if connected else ZERO_OR_ABSENT,
        'grpc_connections{service_method="Proxy"}': None,
    }


async def read_all(tunnel: HttpTunnel) -> bytes:
    """Everything until the server closes."""
    return await asyncio.wait_for(tunnel.reader.read(), 20)


async def http_gone(env: ProxyEnv) -> None:
    await wait_until(lambda: not env.proxy.router.frontends, "every tunnel removed")


@pytest.mark.parametrize("loop_kind", ["uvloop", "asyncio"])
def test_connect_relay_close(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """200 only after the DIAL_RSP, bytes pipelined after the headers relayed first, data both
    ways through a real echo backend; client EOF sends CLOSE_REQ to the agent."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent()
            tunnel = await env.http_connect(echo_backend.address, pipelined=b"early|")
            head = await tunnel.reader.readexactly(len(RESPONSE_200))
            assert head == RESPONSE_200
            assert await tunnel.reader.readexactly(6) == b"early|"
            request = agent.packets("DIAL_REQ")[0].dialRequest
            assert (request.protocol, request.address) == ("tcp", echo_backend.address)
            assert 0 <= request.random < 1 << 63
            payload = bytes(range(256)) * 512
            tunnel.writer.write(payload)
            assert await tunnel.reader.readexactly(len(payload)) == payload
            assert env.proxy.router.established_connections == 1
            check_metrics({"http_connections": 1, "established_connections": 1})
            await tunnel.close()
            close = await agent.wait_packet("CLOSE_REQ")
            assert close.closeRequest.connectID == 1
            await http_gone(env)
            await wait_until(lambda: not agent.conns, "agent closed its endpoint")
            await wait_until(
                lambda: not any(b.closing for b in env.proxy.router.backends.values()),
                "the agent's CLOSE_RSP processed",
            )
            check_metrics(
                {
                    **http_idle(),
                    "dial_duration_seconds_count": 1,
                    "connection_duration_seconds_count": None,  # not in v0.36.0
                    'ready_backends{proxy_strategy="default"}': 1,
                    # HTTP-CONNECT traffic is counted on the agent side only (upstream's
                    # Tunnel.ServeHTTP counts no packet; the agent stream's Send/Recv do).
                    packets("to_agent", "DIAL_REQ"): 1,
                    packets("from_agent", "DIAL_RSP"): 1,
                    packets("to_agent", "CLOSE_REQ"): 1,
                    packets("from_agent", "CLOSE_RSP"): 1,
                    packets("from_client", "DATA"): None,
                    packets("to_client", "DATA"): None,
                    packets("to_client", "DIAL_RSP"): None,
                }
            )

    arun(main())


def test_no_agent(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """No agent: upstream's exact 500 (no Content-Length, no newline), then close; no dial
    failure is counted in this mode."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env:
            tunnel = await env.http_connect(UNREACHABLE)
            assert await read_all(tunnel) == (
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n"
                b"currently no tunnels available: No agent available"
            )
            await http_gone(env)
            check_metrics({**http_idle(connected=False, dialled=False), failures("no_agent"): None})

    arun(main())


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("dial tcp 10.0.0.1:443: i/o timeout", b"504 Gateway Timeout"),
        ("context deadline exceeded", b"504 Gateway Timeout"),
        ("dial tcp 10.0.0.1:443: socket: too many open files", b"503 Service Unavailable"),
        ("dial tcp: lookup nope on 10.96.0.10:53: no such host", b"502 Bad Gateway"),
        ("tls: handshake failure", b"502 Bad Gateway"),
    ],
)
def test_agent_dial_error_status(
    arun: RunFn, certs: Certs, sock_dir: str, error: str, status: bytes
) -> None:
    """The agent's dial error becomes upstream's status by substring, close-delimited."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode="http-connect") as env:
            await env.agent(policy=DialPolicy.ERROR, dial_error=error)
            tunnel = await env.http_connect(UNREACHABLE)
            assert await read_all(tunnel) == (
                b"HTTP/1.1 "
                + status
                + b"\r\nConnection: close\r\n"
                + TEXT
                + b"\r\n"
                + error.encode()
            )
            await http_gone(env)
            check_metrics({**http_idle(connected=False), failures("error_response"): 1})

    arun(main())


def test_real_dial_refused(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """A real dial to a closed port: 502 with the agent's Go-shaped text."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env:
            await env.agent()
            address = closed_port()
            tunnel = await env.http_connect(address)
            body = f"dial tcp {address}: connect: connection refused".encode()
            assert await read_all(tunnel) == (
                b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n" + TEXT + b"\r\n" + body
            )
            await http_gone(env)
            check_metrics({**http_idle(connected=False), failures("error_response"): 1})

    arun(main())


def test_agent_dial_cls(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """The agent answers DIAL_CLS: the connection is closed with no response at all."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode="http-connect") as env:
            await env.agent(policy=DialPolicy.DIAL_CLS)
            tunnel = await env.http_connect(UNREACHABLE)
            assert await read_all(tunnel) == b""
            await http_gone(env)
            check_metrics({**http_idle(connected=False), failures("backend_close"): 1})

    arun(main())


def test_dial_timeout_then_late_dial_rsp(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """--backend-dial-timeout: 504 "Backend dial timeout: ..."; the agent's late success is
    answered with CLOSE_REQ."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode="http-connect", dial_timeout=0.2) as env:
            agent = await env.agent(policy=DialPolicy.HOLD)
            tunnel = await env.http_connect(UNREACHABLE)
            assert await read_all(tunnel) == (
                b"HTTP/1.1 504 Gateway Timeout\r\n" + TEXT + b"\r\n"
                b"Backend dial timeout: timed out waiting for backend dial\r\n"
            )
            (random,) = await agent.wait_held()
            assert agent.packets("DIAL_CLS") == []
            await agent.answer(random, connect_id=8)
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 8)
            await http_gone(env)
            check_metrics(
                {
                    **http_idle(connected=False),
                    failures("backend_dial_timeout"): 1,
                    failures("unrecognized_response"): 1,
                    failures("frontend_close"): None,
                }
            )

    arun(main())


def test_client_leaves_during_dial(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str
) -> None:
    """A client that disconnects while its dial is pending is noticed at once: DIAL_CLS to
    the agent, frontend_close; the late success is answered with CLOSE_REQ."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env:
            agent = await env.agent(policy=DialPolicy.HOLD)
            tunnel = await env.http_connect(UNREACHABLE)
            (random,) = await agent.wait_held()
            await tunnel.close()
            cls = await agent.wait_packet("DIAL_CLS")
            assert cls.closeDial.random == random
            await agent.answer(random, connect_id=4)
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 4)
            await http_gone(env)
            check_metrics(
                {
                    **http_idle(connected=False),
                    failures("frontend_close"): 1,
                    failures("unrecognized_response"): 1,
                }
            )

    arun(main())


@pytest.mark.parametrize("how", ["disconnect", "close"])
def test_agent_loss(arun: RunFn, certs: Certs, sock_dir: str, transport: str, how: str) -> None:
    """The agent goes with one established and one pending tunnel: the established socket is
    closed, the pending one gets 502 "Backend context error: context canceled"."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent(policies={UNREACHABLE: DialPolicy.HOLD})
            established = await env.http_connect(echo_backend.address)
            assert await established.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            pending = await env.http_connect(UNREACHABLE)
            await agent.wait_held()
            await (agent.disconnect() if how == "disconnect" else agent.close())
            assert await read_all(established) == b""
            assert await read_all(pending) == (
                b"HTTP/1.1 502 Bad Gateway\r\n" + TEXT + b"\r\n"
                b"Backend context error: context canceled\r\n"
            )
            await http_gone(env)
            again = await env.http_connect(UNREACHABLE)
            assert (await read_all(again)).startswith(b"HTTP/1.1 500 ")
            check_metrics(
                {
                    **http_idle(),
                    failures("backend_close"): 1,
                    "connection_duration_seconds_count": None,  # not in v0.36.0
                    'grpc_connections{service_method="Connect"}': 0,
                    'ready_backends{proxy_strategy="default"}': 0,
                }
            )

    arun(main())


def test_backend_closes_first(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """The backend writes and closes: the bytes, then the agent's CLOSE_RSP closes the
    client's socket."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env,
            backend(hello(b"bye now")) as hello_backend,
        ):
            await env.agent()
            tunnel = await env.http_connect(hello_backend.address)
            assert await read_all(tunnel) == RESPONSE_200 + b"bye now"
            await http_gone(env)
            check_metrics({**http_idle(), "dial_duration_seconds_count": 1})

    arun(main())


def test_agent_close_rsp_for_live_tunnel(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """An agent CLOSE_RSP for an established tunnel closes it; the client's later EOF does
    not reach the agent as another dial or close."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect") as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent()
            tunnel = await env.http_connect(echo_backend.address)
            assert await tunnel.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            await agent.send(close_rsp(1))
            assert await read_all(tunnel) == b""
            await http_gone(env)
            check_metrics({**http_idle(), "dial_duration_seconds_count": 1})

    arun(main())


def test_get_is_405(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """Anything but CONNECT: 405 with upstream's body; the connection stays usable and a
    CONNECT on it then works."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            await env.agent()
            tunnel = await env.http_open()
            tunnel.writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await tunnel.reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
            body = b"this proxy only supports CONNECT passthrough\n"
            assert b"Content-Length: %d\r\n" % len(body) in head
            assert await tunnel.reader.readexactly(len(body)) == body
            address = echo_backend.address
            tunnel.writer.write(f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            assert await tunnel.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            tunnel.writer.write(b"after 405")
            assert await tunnel.reader.readexactly(9) == b"after 405"
            await tunnel.close()
            await http_gone(env)
            check_metrics({**http_idle(), "dial_duration_seconds_count": 1})

    arun(main())


def test_many_tunnels_one_agent(arun: RunFn, certs: Certs, sock_dir: str, transport: str) -> None:
    """32 concurrent tunnels through one agent stream, each its own bytes back."""
    count = 32

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env,
            backend(echo) as echo_backend,
        ):
            await env.agent()

            async def one(i: int) -> None:
                tunnel = await env.http_connect(echo_backend.address)
                assert await tunnel.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
                payload = i.to_bytes(4, "big") * 2048
                tunnel.writer.write(payload)
                assert await tunnel.reader.readexactly(len(payload)) == payload
                await tunnel.close()

            await asyncio.gather(*(one(i) for i in range(count)))
            await http_gone(env)
            check_metrics(
                {
                    **http_idle(),
                    "dial_duration_seconds_count": count,
                    'ready_backends{proxy_strategy="default"}': 1,
                }
            )

    arun(main())
