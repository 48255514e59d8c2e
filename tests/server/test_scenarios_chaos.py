"""Mixed traffic with failures, seeded: 160 tunnels at once through two agents, each doing one
of a normal echo exchange, a cancel or disconnect mid-transfer, a half-close, a backend that
closes first, a refused dial; half-way one agent drops. Whatever the interleaving, every
tunnel must end (no hang), the tunnels of the surviving agent must deliver their bytes
exactly, and afterwards the router is empty, the gauges are back at 0, the surviving
agent's endpoints are closed, and (teardown) no fd or task is left.
"""

from __future__ import annotations

import asyncio
import random
import socket

import grpc
import pytest

from tests.support.agent_peer import (
    HttpTunnel,
    ProxyStream,
    backend,
    close_req,
    data,
    echo,
    hello,
    ptype,
    wait_until,
)

from .conftest import Certs, ProxyEnv, RunFn, check_metrics, proxy_env, scrape

TUNNELS = 160
KINDS = ("echo", "echo", "echo", "cancel", "half-close", "hello", "refused")
MAX_CHUNK = 128 << 10
# The doomed agent drops once it holds this many live connections.
DROP_AFTER = 8
RESPONSE_200 = b"HTTP/1.1 200 Connection Established\r\n\r\n"
GREETING = b"hello and goodbye"


class Lost(Exception):
    """The tunnel's agent went away (allowed only for tunnels through the dropped agent)."""


def closed_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


async def grpc_tunnel(
    stream: ProxyStream,
    kind: str,
    rng: random.Random,
    *,
    echo_at: str,
    hello_at: str,
    refused_at: str,
    random_id: int,
) -> None:
    address = {"hello": hello_at, "refused": refused_at}.get(kind, echo_at)
    rsp = await stream.dial(address, random_id)
    error = rsp.dialResponse.error
    if error in {"context canceled", "No agent available"}:
        raise Lost
    if kind == "refused":
        assert error.endswith("connect: connection refused"), rsp
        assert await stream.end() == grpc.StatusCode.OK
        return
    assert ptype(rsp) == "DIAL_RSP" and not error, rsp
    connect_id = rsp.dialResponse.connectID
    if kind == "hello":
        got = bytearray()
        while (packet := await stream.recv()) is not None and ptype(packet) == "DATA":
            got += packet.data.data
        assert bytes(got) == GREETING or (packet is not None and not got), (got, packet)
        assert await stream.end() == grpc.StatusCode.OK
        return
    payload = rng.randbytes(rng.randrange(1, MAX_CHUNK))
    await stream.send(data(connect_id, payload))
    if kind == "cancel":
        stream.cancel()
        return
    if kind == "half-close":
        assert await stream.end() == grpc.StatusCode.OK
        return
    got = bytearray()
    while len(got) < len(payload):
        packet = await stream.recv()
        assert packet is not None
        if ptype(packet) == "CLOSE_RSP":
            raise Lost
        got += packet.data.data
    assert bytes(got) == payload
    await stream.send(close_req(connect_id))
    packet = await stream.recv()
    assert packet is not None and ptype(packet) == "CLOSE_RSP", packet
    assert await stream.end() == grpc.StatusCode.OK


async def http_tunnel(tunnel: HttpTunnel, kind: str, rng: random.Random) -> None:
    head = await tunnel.reader.readuntil(b"\r\n\r\n")
    if kind == "refused":
        assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), head
        return
    if head.startswith(b"HTTP/1.1 502 ") or head.startswith(b"HTTP/1.1 500 "):
        raise Lost
    assert head == RESPONSE_200, head
    if kind == "hello":
        got = await tunnel.reader.read()
        assert got in (GREETING, b""), got
        return
    payload = rng.randbytes(rng.randrange(1, MAX_CHUNK))
    tunnel.writer.write(payload)
    if kind == "cancel":
        tunnel.writer.transport.abort()
        return
    try:
        if kind == "half-close":
            tunnel.writer.write_eof()
            await tunnel.reader.read()
            return
        got = await tunnel.reader.readexactly(len(payload))
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        # The server closed the tunnel (its agent left) while bytes were still moving: EOF,
        # or a reset / broken pipe.
        raise Lost from exc
    assert got == payload


async def chaos(env: ProxyEnv, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    outcome = {"done": 0, "lost": 0}
    async with backend(echo) as echo_b, backend(hello(GREETING)) as hello_b:
        refused_at = closed_address()
        doomed = await env.agent(agent_id="doomed")
        await env.agent(agent_id="survivor")
        shared = env.dialer() if env.mode == "grpc" else None
        started = 0
        halfway = asyncio.Event()

        async def one(i: int) -> None:
            nonlocal started
            kind = rng.choice(KINDS)
            own = random.Random(seed * 1000 + i)
            started += 1
            if started == TUNNELS // 2:
                halfway.set()
            try:
                if env.mode == "grpc":
                    dialer = shared if i % 4 else env.dialer()
                    assert dialer is not None
                    await grpc_tunnel(
                        dialer.stream(),
                        kind,
                        own,
                        echo_at=echo_b.address,
                        hello_at=hello_b.address,
                        refused_at=refused_at,
                        random_id=1 + i,
                    )
                else:
                    address = {"hello": hello_b.address, "refused": refused_at}.get(
                        kind, echo_b.address
                    )
                    await http_tunnel(await env.http_connect(address), kind, own)
                outcome["done"] += 1
            except Lost:
                outcome["lost"] += 1

        async def drop_one_agent() -> None:
            # Mid-traffic: the doomed agent holds live endpoint connections.
            await halfway.wait()
            await wait_until(lambda: len(doomed.conns) >= DROP_AFTER, "doomed agent busy")
            await doomed.disconnect()

        await asyncio.gather(drop_one_agent(), *(one(i) for i in range(TUNNELS)))
        # A tunnel may be lost only through the doomed agent: a dial it received, or one
        # still pending at the server when it left (backend_close).
        outcome["doomed"] = len(doomed.packets("DIAL_REQ"))
        await env.close_peers()
        await wait_until(lambda: not env.proxy.router.frontends, "every frontend removed")
    return outcome


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
@pytest.mark.parametrize("seed", [1, 2])
def test_chaos(arun: RunFn, certs: Certs, sock_dir: str, mode: str, seed: int) -> None:
    async def main() -> None:
        async with proxy_env(certs, sock_dir, mode=mode) as env:
            outcome = await chaos(env, seed)
            assert outcome["done"] + outcome["lost"] == TUNNELS
            failed_dials = scrape().get('dial_failure_count{reason="backend_close"}', 0)
            assert 0 < outcome["lost"] <= outcome["doomed"] + failed_dials, outcome
            await wait_until(lambda: not env.proxy.router.backends, "agents removed")
            assert env.proxy.router.pending_dials == 0
            assert env.proxy.router.established_connections == 0
            check_metrics(
                {
                    "pending_backend_dials": 0,
                    "established_connections": 0,
                    "http_connections": 0,
                    'grpc_connections{service_method="Connect"}': 0,
                }
            )

    arun(main())
