"""The agent's data path against our proxy-server, in process, on loopback: dial, byte-exact
echo, dial errors with Go's text, CLOSE paths, stream loss. Each test runs on uvloop and
the stdlib loop."""

from __future__ import annotations

import asyncio
import os

import pytest

from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.wire.packets import Data, PacketType

from .conftest import Certs, RunFn
from .support import (
    LOOPBACK,
    EchoServer,
    Tunnel,
    agent,
    closed_port,
    proxy_server,
    server_has_agent,
    until,
)

pytestmark = pytest.mark.timeout(90)


def test_dial_and_echo_byte_exact(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        echo = EchoServer()
        port = await echo.start()
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server), what="agent registered")
            tunnel = await Tunnel.open(server.uds)
            rsp = await tunnel.dial(f"{LOOPBACK}:{port}", rnd=77)
            assert (rsp.error, rsp.random, rsp.connect_id) == ("", 77, 1)
            payload = os.urandom(4 << 20)
            for off in range(0, len(payload), 256 << 10):
                tunnel.write(payload[off : off + (256 << 10)])
            assert await tunnel.read_exactly(len(payload)) == payload
            # A second tunnel on the same agent stream gets the next connectID.
            second = await Tunnel.open(server.uds)
            assert (await second.dial(f"{LOOPBACK}:{port}", rnd=78)).connect_id == 2
            second.write(b"ping")
            assert await second.read_exactly(4) == b"ping"
            close = await tunnel.close_and_wait()
            assert (close.connect_id, close.error) == (1, "")
            await until(lambda: echo.open == 1, what="backend closed")
            await tunnel.aclose()
            await second.aclose()
        await echo.close()

    run(main())


def test_one_read_is_one_data_packet_larger_than_4k(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        sent = os.urandom(60_000)
        got = asyncio.get_running_loop().create_future()

        async def speak(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(2)
            writer.write(sent)  # one write of 60 kB: one read on the agent, mostly
            await writer.drain()
            await got
            writer.close()

        backend = await asyncio.start_server(speak, LOOPBACK, 0)
        port = backend.sockets[0].getsockname()[1]
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            tunnel = await Tunnel.open(server.uds)
            await tunnel.dial(f"{LOOPBACK}:{port}")
            tunnel.write(b"go")
            assert await tunnel.read_exactly(len(sent)) == sent
            sizes = [
                len(p.payload.data)
                for p in tunnel.packets
                if p.type == PacketType.DATA and isinstance(p.payload, Data)
            ]
            assert max(sizes) > 4096, sizes
            got.set_result(None)
            rsp = await tunnel.wait_close_rsp()  # the backend closed: unsolicited CLOSE_RSP
            assert (rsp.connect_id, rsp.error) == (1, "")
            await tunnel.aclose()
        backend.close()
        await backend.wait_closed()

    run(main())


def test_dial_refused_has_go_text(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        port = closed_port()
        before = agent_metrics.ENDPOINT_DIAL_FAILURES.labels("unknown").value
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            tunnel = await Tunnel.open(server.uds)
            rsp = await tunnel.dial(f"{LOOPBACK}:{port}", rnd=5)
            assert rsp.error == f"dial tcp {LOOPBACK}:{port}: connect: connection refused"
            assert (rsp.connect_id, rsp.random) == (0, 5)
            assert agent_metrics.ENDPOINT_DIAL_FAILURES.labels("unknown").value == before + 1
            await tunnel.aclose()
            # The failed dial used up connectID 1.
            echo = EchoServer()
            eport = await echo.start()
            tunnel = await Tunnel.open(server.uds)
            assert (await tunnel.dial(f"{LOOPBACK}:{eport}")).connect_id == 2
            await tunnel.aclose()
            await echo.close()

    run(main())


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("foo.invalid:80", "dial tcp: lookup foo.invalid: no such host"),
        ("127.0.0.1", "dial tcp: address 127.0.0.1: missing port in address"),
        ("::1:80", "dial tcp: address ::1:80: too many colons in address"),
    ],
)
def test_dial_address_errors(
    run: RunFn, sock_dir: str, certs: Certs, address: str, error: str
) -> None:
    async def main() -> None:
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            tunnel = await Tunnel.open(server.uds)
            rsp = await tunnel.dial(address)
            assert rsp.error == error
            await tunnel.aclose()

    run(main())


def test_backend_close_flushes_data_before_close_rsp(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        blob = os.urandom(3 << 20)

        async def send_and_close(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await reader.readexactly(1)
            writer.write(blob)
            await writer.drain()
            writer.close()

        backend = await asyncio.start_server(send_and_close, LOOPBACK, 0)
        port = backend.sockets[0].getsockname()[1]
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            tunnel = await Tunnel.open(server.uds)
            await tunnel.dial(f"{LOOPBACK}:{port}")
            tunnel.write(b"x")
            rsp = await tunnel.wait_close_rsp()
            assert (rsp.connect_id, rsp.error) == (1, "")
            assert bytes(tunnel.received) == blob
            await tunnel.aclose()
        backend.close()
        await backend.wait_closed()

    run(main())


def test_stream_loss_closes_that_streams_backends(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        echo = EchoServer()
        port = await echo.start()
        async with proxy_server(sock_dir, certs) as server:
            agent_port = server.agent_port
            async with agent(certs, agent_port, sync_interval=0.1, sync_interval_cap=0.2) as cs:
                await until(lambda: server_has_agent(server))
                tunnels = []
                for i in range(3):
                    t = await Tunnel.open(server.uds)
                    await t.dial(f"{LOOPBACK}:{port}", rnd=i + 1)
                    tunnels.append(t)
                await until(lambda: echo.open == 3)
                assert agent_metrics.OPEN_ENDPOINT_CONNECTIONS.labels().value >= 3
                # Drop the agent's connection under it: every backend of it closes.
                (client,) = cs.clients.values()
                assert client.proto is not None and client.proto.transport is not None
                client.proto.transport.abort()
                await until(lambda: echo.open == 0, what="backends closed")
                # The sync loop reconnects, and new tunnels work again.
                await until(lambda: len(cs.clients) == 1 and server_has_agent(server))
                t = await Tunnel.open(server.uds)
                assert (await t.dial(f"{LOOPBACK}:{port}")).connect_id == 1
                t.write(b"again")
                assert await t.read_exactly(5) == b"again"
                for t2 in [*tunnels, t]:
                    await t2.aclose()
        await echo.close()

    run(main())


def test_server_speaks_first_backend_data_follows_dial_rsp(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A backend that writes as soon as it accepts: its bytes reach the frontend after the
    DIAL_RSP, never before (uvloop starts reading even when connection_made paused it)."""

    async def main() -> None:
        async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"220 hello\r\n" * 1000)
            await writer.drain()
            await reader.read(1)
            writer.close()

        backend = await asyncio.start_server(greet, LOOPBACK, 0)
        port = backend.sockets[0].getsockname()[1]
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            for _ in range(5):
                tunnel = await Tunnel.open(server.uds)
                await tunnel.dial(f"{LOOPBACK}:{port}")
                assert await tunnel.read_exactly(11000) == b"220 hello\r\n" * 1000
                await tunnel.close_and_wait()
                await tunnel.aclose()
        backend.close()
        await backend.wait_closed()

    run(main())
