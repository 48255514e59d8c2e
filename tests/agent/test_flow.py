"""Volume and flow control through the agent: 64 MiB each way byte-exact, 1000 concurrent
tunnels, a server that stops reading (the agent pauses its backends' reads and its memory
stays bounded), and the agent's metrics along the way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from konnectivity_fast.agent.endpoint import READ_SIZE
from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.server import PROXY_PATH
from konnectivity_fast.server.buffering import BufferBudget
from konnectivity_fast.server.http_connect import RESPONSE_200, start_http_connect_uds
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport.call import CALL_SEND_HIGH_WATER, GrpcCall
from konnectivity_fast.wire.packets import DialRequest, Packet, PacketType

from .conftest import Certs, RunFn
from .fake_server import fake_server, recv, send
from .support import (
    LOOPBACK,
    EchoServer,
    Server,
    Tunnel,
    agent,
    proxy_server,
    server_has_agent,
    until,
)

MIB = 1 << 20


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_64_mib_each_way(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """The frontend streams 64 MiB up while the backend streams 64 MiB down (a sink that
    counts, and a source), concurrently on one tunnel."""

    async def main() -> None:
        size = 64 * MIB
        down = os.urandom(MIB)
        got_up = hashlib.sha256()
        up_done = asyncio.get_running_loop().create_future()

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def sink() -> None:
                n = 0
                while n < size:
                    chunk = await reader.read(1 << 18)
                    assert chunk
                    got_up.update(chunk)
                    n += len(chunk)
                up_done.set_result(n)

            task = asyncio.ensure_future(sink())
            for _ in range(size // MIB):
                writer.write(down)
                await writer.drain()
            await task
            writer.close()

        server_b = await asyncio.start_server(backend, LOOPBACK, 0)
        port = server_b.sockets[0].getsockname()[1]
        up = os.urandom(MIB)
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            tunnel = await Tunnel.open(server.uds)
            await tunnel.dial(f"{LOOPBACK}:{port}")

            async def upload() -> None:
                for _ in range(size // MIB):
                    for off in range(0, MIB, 256 << 10):
                        tunnel.write(up[off : off + (256 << 10)])
                    await tunnel.call.drain()

            uploader = asyncio.ensure_future(upload())
            want_down = hashlib.sha256(down * (size // MIB)).digest()
            got_down = hashlib.sha256()
            n = 0
            while n < size:
                chunk = await tunnel.read_exactly(min(MIB, size - n), timeout=60)
                got_down.update(chunk)
                n += len(chunk)
            await uploader
            assert await asyncio.wait_for(up_done, 60) == size
            assert got_down.digest() == want_down
            assert got_up.digest() == hashlib.sha256(up * (size // MIB)).digest()
            await tunnel.wait_close_rsp()  # the backend closed
            await tunnel.aclose()
        server_b.close()
        await server_b.wait_closed()

    run(main())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_1000_concurrent_tunnels(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        echo = EchoServer()
        port = await echo.start()
        count = 1000
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port) as cs:
            await until(lambda: server_has_agent(server))
            protos = [await kgrpc.connect(path=server.uds) for _ in range(4)]
            tunnels = [
                Tunnel(protos[i % 4], protos[i % 4].start_call(PROXY_PATH)) for i in range(count)
            ]
            rsps = await asyncio.gather(
                *(t.dial(f"{LOOPBACK}:{port}", rnd=i + 1) for i, t in enumerate(tunnels))
            )
            assert all(r.error == "" for r in rsps)
            assert sorted(r.connect_id for r in rsps) == list(range(1, count + 1))
            await until(lambda: echo.open == count, what="all backends")
            assert agent_metrics.OPEN_ENDPOINT_CONNECTIONS.labels().value == count
            for i, t in enumerate(tunnels):
                t.write(f"tunnel {i}".encode())
            for i, t in enumerate(tunnels):
                want = f"tunnel {i}".encode()
                assert await t.read_exactly(len(want)) == want
            closes = await asyncio.gather(*(t.close_and_wait() for t in tunnels))
            assert all(c.error == "" for c in closes)
            await until(lambda: echo.open == 0, what="all backends closed")
            (client,) = cs.clients.values()
            assert client.endpoints == {}
            assert agent_metrics.OPEN_ENDPOINT_CONNECTIONS.labels().value == 0
            for proto in protos:
                await proto.aclose()
        await echo.close()

    run(main())


@pytest.mark.timeout(60)
def test_server_not_reading_pauses_backend_reads(run: RunFn, certs: Certs) -> None:
    """The server stops reading the agent's stream: the agent stops reading its backends
    and holds at most the stream's high water plus one read per backend."""

    async def main() -> None:
        blocked = asyncio.Event()
        written = 0

        async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal written
            chunk = b"x" * (256 << 10)
            try:
                while True:
                    writer.write(chunk)
                    try:
                        await asyncio.wait_for(writer.drain(), 1.0)
                    except TimeoutError:
                        blocked.set()  # the agent stopped reading us
                        await writer.drain()
                    written += len(chunk)
            except (ConnectionError, OSError):
                pass

        backend = await asyncio.start_server(flood, LOOPBACK, 0)
        port = backend.sockets[0].getsockname()[1]
        async with fake_server(certs) as fake, agent(certs, fake.port) as cs:
            call = await fake.next_stream()  # the fake server never reads DATA from here on
            for i in (1, 2):
                send(call, Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{port}", i)))
            # Read until both DIAL_RSPs are in (DATA of the first may come between); nothing
            # is read after that.
            dial_rsps = 0
            while dial_rsps < 2:
                dial_rsps += (await recv(call)).type == PacketType.DIAL_RSP
            await asyncio.wait_for(blocked.wait(), 30)
            (client,) = cs.clients.values()
            assert client.call is not None
            pending = client.call.outbound_pending()
            assert pending <= CALL_SEND_HIGH_WATER + 2 * READ_SIZE, pending
            assert all(ep._read_paused for ep in client.endpoints.values())
        backend.close()
        await backend.wait_closed()

    run(main())


@pytest.mark.timeout(60)
def test_metrics_follow_the_traffic(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        agent_metrics.reset()
        echo = EchoServer()
        port = await echo.start()
        async with proxy_server(sock_dir, certs) as server, agent(certs, server.agent_port):
            await until(lambda: server_has_agent(server))
            assert agent_metrics.OPEN_SERVER_CONNECTIONS.labels().value == 1
            assert agent_metrics.KNOWN_SERVER_COUNT.value == 1
            tunnel = await Tunnel.open(server.uds)
            await tunnel.dial(f"{LOOPBACK}:{port}")
            tunnel.write(b"abc")
            await tunnel.read_exactly(3)
            assert agent_metrics.OPEN_ENDPOINT_CONNECTIONS.labels().value == 1
            await tunnel.close_and_wait()
            await tunnel.aclose()
            text = agent_metrics.expose().decode()
            prefix = "konnectivity_network_proxy_agent_"
            for line in (
                f'{prefix}stream_packets_total{{packet_type="DIAL_REQ",segment="to_agent"}} 1',
                f'{prefix}stream_packets_total{{packet_type="DIAL_RSP",segment="from_agent"}} 1',
                f'{prefix}stream_packets_total{{packet_type="CLOSE_REQ",segment="to_agent"}} 1',
                f'{prefix}stream_packets_total{{packet_type="CLOSE_RSP",segment="from_agent"}} 1',
                f"{prefix}dial_duration_seconds_count 1",
                f"{prefix}open_endpoint_connections 0",
                f"{prefix}open_server_connections 1",
            ):
                assert line in text, line
        assert agent_metrics.OPEN_SERVER_CONNECTIONS.labels().value == 0
        await echo.close()

    run(main())


# Our agent's tunnels take turns on its server stream (agent.sender). Both tests below open
# an HTTP-CONNECT tunnel to a backend that sends without end, from a client with a small
# read buffer (little sits unread on its side) that reads nothing until its tunnel holds
# the agent's stream on the server (server.buffering); then a 1 KiB echo runs on another
# tunnel.
SLOW_BUDGET = 8 << 20
SLOW_STEP = 16 << 10
# The rationed window on the server, the agent's small queue (UNSENT_LIMIT), a few 16 KiB
# turns and the Unix socket's buffers. A first-come agent queue (1 MiB before) adds its
# whole depth.
ECHO_BEHIND_SLOW_READER_MAX = 1 << 20


@dataclasses.dataclass
class HeldStream:
    server: Server
    budget: BufferBudget
    agent_call: GrpcCall
    echo_port: int
    reader: asyncio.StreamReader

    @property
    def held(self) -> bool:
        return self.budget.paused(self.agent_call)

    async def echo(self, rnd: int, rounds: int = 1) -> None:
        """A new tunnel to the echo backend, ``rounds`` 1 KiB round trips, closed."""
        fast = await Tunnel.open(self.server.uds)
        await fast.dial(f"{LOOPBACK}:{self.echo_port}", rnd=rnd)
        for _ in range(rounds):
            fast.write(b"e" * 1024)
            assert await fast.read_exactly(1024) == b"e" * 1024
        await fast.aclose()


@contextlib.asynccontextmanager
async def stream_held_by_a_flood(
    sock_dir: str, certs: Certs, budget: BufferBudget
) -> AsyncIterator[HeldStream]:
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"f" * (256 << 10)
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                writer.write(chunk)
                await writer.drain()

    flood_server = await asyncio.start_server(flood, LOOPBACK, 0)
    flood_port = flood_server.sockets[0].getsockname()[1]
    echo = EchoServer()
    echo_port = await echo.start()
    http_uds = os.path.join(sock_dir, "connect.sock")
    async with (
        proxy_server(sock_dir, certs, budget=budget) as server,
        agent(certs, server.agent_port),
    ):
        http = await start_http_connect_uds(server.proxy, http_uds)
        await until(lambda: server_has_agent(server))
        (backend,) = server.proxy.router.backends.values()
        # Unread, the stream reader stops its socket at 2 x limit.
        reader, writer = await asyncio.open_unix_connection(http_uds, limit=SLOW_STEP)
        target = f"{LOOPBACK}:{flood_port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert await reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
        held = HeldStream(server, budget, backend.conn, echo_port, reader)
        await until(lambda: held.held, what="the flooded tunnel holds its agent's stream")
        yield held
        writer.close()
        http.close()
    await echo.close()
    flood_server.close()


# A frontend that stopped reading altogether, without flow.v1: nothing it is owed will
# ever be taken, and it is never closed here (the stall timeout is out of reach). A 1 KiB
# echo on another tunnel and a new tunnel's DIAL_RSP still pass, in the end of the window
# the agent's bulk reads leave free (agent.sender.RESERVED_WINDOW), twice (the reserve
# comes back); the hold is still on afterwards. An agent that lets the bulk tunnel spend
# the whole window (or queue ahead of the reply) never answers.
@pytest.mark.timeout(60)
def test_reply_passes_a_stopped_frontend_holding_the_stream(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        budget = BufferBudget(tunnel_budget=SLOW_BUDGET, stall_timeout=3600.0)
        async with stream_held_by_a_flood(sock_dir, certs, budget) as stream:
            for rnd in (2, 3):
                await stream.echo(rnd, rounds=4)
            assert stream.held

    run(main())


# A slow frontend: the echo waits for the slow reader to take only what is in flight to
# it, not a queue of the fast backend's bytes. Counted in bytes the slow reader takes, not
# in seconds.
@pytest.mark.timeout(60)
def test_slow_frontend_does_not_queue_its_agents_other_tunnels(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        budget = BufferBudget(tunnel_budget=SLOW_BUDGET)
        async with stream_held_by_a_flood(sock_dir, certs, budget) as stream:
            taken = 0

            async def read_steadily() -> None:
                nonlocal taken
                while True:
                    taken += len(await stream.reader.read(SLOW_STEP))
                    await asyncio.sleep(0.001)

            reader = asyncio.get_running_loop().create_task(read_steadily())
            await stream.echo(rnd=2)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            assert taken < ECHO_BEHIND_SLOW_READER_MAX, taken

    run(main())
