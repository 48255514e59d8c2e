"""No head-of-line blocking (server.buffering): one frontend that stops reading must not
hold up the other tunnels of its agent, nor new dials, until its budget is spent; past the
budget its agent's stream waits, memory stays bounded, and nothing is lost.

The agent here streams: a DIAL_REQ for ``stream:<n>`` is answered with a fresh connectID
and then ``n`` bytes of a per-tunnel pattern, sent as fast as the server's flow control
lets it (the agent awaits ``drain()``, as a real agent's sender does); ``echo`` dials echo.
Frontends are HTTP-CONNECT clients (asyncio streams) or gRPC ``Proxy`` streams (our client
role), on the Unix sockets of an in-process server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from random import Random

import pytest

from konnectivity_fast.server import CONNECT_PATH, PROXY_PATH, ProxyServer, ServerHandle
from konnectivity_fast.server.buffering import TUNNEL_WRITE_HIGH_WATER, BufferBudget
from konnectivity_fast.server.http_connect import RESPONSE_200, start_http_connect_uds
from konnectivity_fast.server.listeners import start_agent_listener, start_frontend_uds
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.packets import (
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

from .conftest import Certs, RunFn

CHUNK = 64 << 10  # the agent's DATA size
BUSY_TUNNELS = 8
BUSY_BYTES = 4 << 20  # each busy tunnel's transfer
STALLED_BYTES = 6 << 20  # the stalled tunnel's transfer: within its (default) budget


def pattern(tag: int, size: int) -> bytes:
    """``size`` bytes that differ per tunnel, so a misrouted byte is caught."""
    block = bytes((tag * 31 + i) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


@dataclass
class StreamingAgent:
    """One ``Connect`` stream on our client role; see the module docstring."""

    next_id: int = 1
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    proto: kgrpc.GrpcProtocol | None = None
    call: kgrpc.GrpcCall | None = None
    reader: asyncio.Task[None] | None = None

    async def start(self, port: int, certs: Certs) -> None:
        ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
        self.proto = await kgrpc.connect(
            host="127.0.0.1", port=port, ssl=ctx, server_hostname="localhost"
        )
        self.call = self.proto.start_call(
            CONNECT_PATH, metadata=[("agentid", "a1"), ("agentidentifiers", "")]
        )
        await self.call.headers_received
        self.reader = asyncio.get_running_loop().create_task(self._serve(self.call))

    async def _serve(self, call: kgrpc.GrpcCall) -> None:
        while (message := await call.recv()) is not None:
            packet = decode_packet(message)
            if isinstance(packet.payload, DialRequest):
                self._dial(call, packet.payload)
            elif isinstance(packet.payload, Data):  # echo
                call.send(encode_packet(Packet(PacketType.DATA, packet.payload)))
            elif isinstance(packet.payload, CloseRequest):
                rsp = CloseResponse(connect_id=packet.payload.connect_id)
                call.send(encode_packet(Packet(PacketType.CLOSE_RSP, rsp)))

    def _dial(self, call: kgrpc.GrpcCall, dial: DialRequest) -> None:
        connect_id, self.next_id = self.next_id, self.next_id + 1
        rsp = DialResponse(connect_id=connect_id, random=dial.random)
        call.send(encode_packet(Packet(PacketType.DIAL_RSP, rsp)))
        host = dial.address.rpartition(":")[0]
        if host.startswith("stream-"):
            tag, size = (int(x) for x in host.removeprefix("stream-").split("-"))
            task = asyncio.get_running_loop().create_task(
                self._stream(call, connect_id, pattern(tag, size))
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _stream(self, call: kgrpc.GrpcCall, connect_id: int, payload: bytes) -> None:
        view = memoryview(payload)
        for offset in range(0, len(payload), CHUNK):
            call.send_data_packet(connect_id, view[offset : offset + CHUNK])
            await call.drain()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.proto is not None:
            await self.proto.aclose()
        if self.reader is not None:
            with contextlib.suppress(Exception):
                await self.reader


@dataclass
class Env:
    proxy: ProxyServer
    agent: StreamingAgent
    http_uds: str
    grpc_uds: str

    def agent_call_on_server(self) -> kgrpc.GrpcCall:
        (backend,) = self.proxy.router.backends.values()
        call: kgrpc.GrpcCall = backend.conn
        return call


@contextlib.asynccontextmanager
async def running(
    sock_dir: str, certs: Certs, budget: BufferBudget | None = None
) -> AsyncIterator[Env]:
    proxy = ProxyServer(server_id="s1", rng=Random(3), budget=budget)
    handle = ServerHandle(proxy)
    http_uds = os.path.join(sock_dir, "http.sock")
    grpc_uds = os.path.join(sock_dir, "grpc.sock")
    agent = StreamingAgent()
    http = await start_http_connect_uds(proxy, http_uds)
    try:
        handle.servers.append(await start_frontend_uds(proxy, grpc_uds))
        handle.servers.append(
            await start_agent_listener(
                proxy,
                host="127.0.0.1",
                port=0,
                cert_file=certs.server_cert,
                key_file=certs.server_key,
                client_ca_file=certs.ca,
            )
        )
        assert handle.agent_port is not None
        await agent.start(handle.agent_port, certs)
        yield Env(proxy, agent, http_uds, grpc_uds)
    finally:
        await agent.close()
        http.close()
        await handle.close()
        await http.wait_closed()


async def http_tunnel(env: Env, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # A small read limit: the client's own buffer must not hide a stalled reader.
    reader, writer = await asyncio.open_unix_connection(env.http_uds, limit=CHUNK)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert await reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
    return reader, writer


async def http_receive(env: Env, tag: int, size: int) -> bytes:
    reader, writer = await http_tunnel(env, f"stream-{tag}-{size}:80")
    data = await reader.readexactly(size)
    writer.close()
    await writer.wait_closed()
    return data


async def http_echo(env: Env) -> bytes:
    reader, writer = await http_tunnel(env, "echo:80")
    writer.write(b"still dialling")
    data = await reader.readexactly(14)
    writer.close()
    await writer.wait_closed()
    return data


async def wait_until(predicate: object, what: str) -> None:
    """Poll ``predicate()`` (the run fixture bounds the whole test)."""
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)


def test_http_stalled_client_does_not_block_neighbours(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            stalled_reader, stalled_writer = await http_tunnel(env, f"stream-99-{STALLED_BYTES}:80")
            # The stalled client reads nothing; the server buffers for it.
            await wait_until(lambda: env.proxy.budget.total > 0, "the stalled tunnel blocks")
            busy = await asyncio.gather(
                *(http_receive(env, tag, BUSY_BYTES) for tag in range(BUSY_TUNNELS))
            )
            for tag, data in enumerate(busy):
                assert data == pattern(tag, BUSY_BYTES)
            # New dials still work, and the agent's stream was never paused.
            assert await http_echo(env) == b"still dialling"
            assert not env.proxy.budget.paused(env.agent_call_on_server())
            # Nothing was lost for the stalled client.
            assert await stalled_reader.readexactly(STALLED_BYTES) == pattern(99, STALLED_BYTES)
            await wait_until(lambda: env.proxy.budget.total == 0, "the charge is released")
            stalled_writer.close()
            await stalled_writer.wait_closed()

    run(main())


def test_http_spent_budget_holds_the_agent_stream_boundedly(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    tunnel_budget = 1 << 20
    size = 8 << 20

    async def main() -> None:
        budget = BufferBudget(tunnel_budget=tunnel_budget)
        async with running(sock_dir, certs, budget) as env:
            reader, writer = await http_tunnel(env, f"stream-7-{size}:80")
            agent_call = env.agent_call_on_server()
            await wait_until(lambda: budget.paused(agent_call), "the agent stream pauses")
            # Bounded: what the server holds for this client is its budget plus at most
            # one high-water mark and what the agent had in flight (one stream window).
            protocol = next(iter(env.proxy.router.frontends.values())).conn
            assert protocol.transport.get_write_buffer_size() <= (
                tunnel_budget + TUNNEL_WRITE_HIGH_WATER + (2 << 20)
            )
            assert await reader.readexactly(size) == pattern(7, size)
            await wait_until(lambda: not budget.paused(agent_call), "the agent stream resumes")
            assert budget.total == 0
            assert await http_echo(env) == b"still dialling"
            writer.close()
            await writer.wait_closed()

    run(main())


async def grpc_tunnel(
    env: Env, target: str, random: int
) -> tuple[kgrpc.GrpcProtocol, kgrpc.GrpcCall, int]:
    proto = await kgrpc.connect(path=env.grpc_uds)
    call = proto.start_call(PROXY_PATH)
    call.send(encode_packet(Packet(PacketType.DIAL_REQ, DialRequest("tcp", target, random))))
    message = await call.recv()
    assert message is not None
    rsp = decode_packet(message).payload
    assert isinstance(rsp, DialResponse) and not rsp.error
    return proto, call, rsp.connect_id


async def grpc_receive(env: Env, tag: int, size: int) -> bytes:
    proto, call, _ = await grpc_tunnel(env, f"stream-{tag}-{size}:80", 1000 + tag)
    received = bytearray()
    while len(received) < size:
        message = await call.recv()
        assert message is not None
        payload = decode_packet(message).payload
        assert isinstance(payload, Data)
        received += payload.data
    await proto.aclose()
    return bytes(received)


@pytest.mark.timeout(120)
def test_grpc_stalled_stream_does_not_block_neighbours(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            # This frontend's stream is not read: our client role pauses it once its
            # inbox is full, so the server's queue for it grows.
            proto, call, connect_id = await grpc_tunnel(env, f"stream-98-{STALLED_BYTES}:80", 1)
            await wait_until(lambda: env.proxy.budget.total > 0, "the stalled stream blocks")
            busy = await asyncio.gather(
                *(grpc_receive(env, tag, BUSY_BYTES) for tag in range(BUSY_TUNNELS))
            )
            for tag, data in enumerate(busy):
                assert data == pattern(tag, BUSY_BYTES)
            assert await http_echo(env) == b"still dialling"
            assert not env.proxy.budget.paused(env.agent_call_on_server())
            received = bytearray()
            while len(received) < STALLED_BYTES:
                message = await call.recv()
                assert message is not None
                payload = decode_packet(message).payload
                assert isinstance(payload, Data) and payload.connect_id == connect_id
                received += payload.data
            assert bytes(received) == pattern(98, STALLED_BYTES)
            await wait_until(lambda: env.proxy.budget.total == 0, "the charge is released")
            await proto.aclose()

    run(main())


ENDLESS = 256 << 20  # more than any budget: a producer that never stops in this test


def test_http_client_stalled_past_its_budget_is_closed(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A client that takes nothing while its agent keeps sending spends its budget; the
    agent's stream is paused, and after the stall timeout the tunnel is closed so that the
    agent's other tunnels and new dials flow again."""

    async def main() -> None:
        budget = BufferBudget(tunnel_budget=1 << 20, stall_timeout=0.5)
        async with running(sock_dir, certs, budget) as env:
            reader, writer = await http_tunnel(env, f"stream-5-{ENDLESS}:80")
            agent_call = env.agent_call_on_server()
            await wait_until(lambda: budget.paused(agent_call), "the agent stream pauses")
            await wait_until(lambda: not budget.paused(agent_call), "the stalled tunnel goes")
            assert budget.total == 0
            busy = await asyncio.gather(*(http_receive(env, tag, 1 << 20) for tag in range(4)))
            assert busy == [pattern(tag, 1 << 20) for tag in range(4)]
            assert await http_echo(env) == b"still dialling"
            # The stalled client finds its connection gone once it reads again.
            with contextlib.suppress(ConnectionError):
                while await reader.read(1 << 20):
                    pass
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    run(main())


# A steady reader kept read several stall timeouts while its tunnel holds the agent: the
# rationing refills its queue as fast as it reads, so its queue never gets shorter, yet it
# is slow, not stalled (it used to be closed after one timeout: bench/ slow1 read 0.41 MB/s
# of its 1 MB/s).
STEADY_READS = 400
STEADY_READ = 16 << 10


def test_http_steady_reader_over_budget_is_never_closed(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        budget = BufferBudget(tunnel_budget=1 << 20, stall_timeout=0.3)
        async with running(sock_dir, certs, budget) as env:
            reader, writer = await http_tunnel(env, f"stream-7-{ENDLESS}:80")
            agent_call = env.agent_call_on_server()
            await wait_until(lambda: budget.paused(agent_call), "the tunnel holds its agent")
            got = bytearray()
            for _ in range(STEADY_READS):  # over 4 s: a dozen stall timeouts
                chunk = await reader.read(STEADY_READ)
                assert chunk, f"the steady reader was closed after {len(got)} bytes"
                got += chunk
                await asyncio.sleep(0.01)
            assert bytes(got) == pattern(7, len(got))
            assert budget.paused(agent_call), "the tunnel still holds its agent"
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    run(main())


@pytest.mark.timeout(120)
def test_grpc_stream_stalled_past_its_budget_is_reset(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        budget = BufferBudget(tunnel_budget=1 << 20, stall_timeout=0.5)
        async with running(sock_dir, certs, budget) as env:
            proto, call, _ = await grpc_tunnel(env, f"stream-6-{ENDLESS}:80", 7)
            agent_call = env.agent_call_on_server()
            await wait_until(lambda: budget.paused(agent_call), "the agent stream pauses")
            await wait_until(lambda: not budget.paused(agent_call), "the stalled stream goes")
            busy = await asyncio.gather(*(grpc_receive(env, tag, 1 << 20) for tag in range(4)))
            assert busy == [pattern(tag, 1 << 20) for tag in range(4)]
            assert await http_echo(env) == b"still dialling"
            await wait_until(lambda: call.status is not None, "the stalled stream is reset")
            await proto.aclose()

    run(main())


# A reader that is slow but never stops (kubectl cp to a slow link) must not freeze its
# agent's other tunnels for (budget / read rate): the agent's stream is rationed while the
# tunnel is over budget, not stopped until it drained. Measured in bytes, not seconds: how
# much the slow reader had to take before a 1 KiB echo on another tunnel came back.
SLOW_BUDGET = 8 << 20
SLOW_STEP = 16 << 10
# The test agent queues its streaming data ahead of the echo (up to CALL_SEND_HIGH_WATER,
# 1 MiB, as a FIFO sender like upstream's agent does), plus the rationed window in flight:
# the echo needs the slow reader to take about that much, far less than the budget it
# needed before (the whole charge, SLOW_BUDGET).
ECHO_BEHIND_SLOW_READER_MAX = 3 << 20
# A gRPC frontend also holds what is in flight to it and unread: our client role's inbox
# (CALL_RECV_HIGH_WATER) and the stream window (DEFAULT_STREAM_WINDOW), 1 MiB each.
GRPC_CLIENT_HOLDS = 2 << 20


async def _read_steadily(read: object, counter: list[int]) -> None:
    """Take SLOW_STEP bytes at a time, yielding between reads, until cancelled."""
    assert callable(read)
    while True:
        counter[0] += await read()
        await asyncio.sleep(0.001)


async def _echo_behind(env: Env, read: object) -> int:
    budget = env.proxy.budget
    agent_call = env.agent_call_on_server()
    await wait_until(lambda: budget.paused(agent_call), "the slow tunnel holds its agent")
    counter = [0]
    reader = asyncio.get_running_loop().create_task(_read_steadily(read, counter))
    try:
        assert await http_echo(env) == b"still dialling"
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    return counter[0]


def test_http_slow_reader_does_not_freeze_an_echo_on_its_agent(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with running(sock_dir, certs, BufferBudget(tunnel_budget=SLOW_BUDGET)) as env:
            reader, writer = await http_tunnel(env, f"stream-3-{ENDLESS}:80")

            async def read() -> int:
                return len(await reader.read(SLOW_STEP))

            taken = await _echo_behind(env, read)
            assert taken < ECHO_BEHIND_SLOW_READER_MAX, taken
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    run(main())


def test_grpc_slow_reader_does_not_freeze_an_echo_on_its_agent(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with running(sock_dir, certs, BufferBudget(tunnel_budget=SLOW_BUDGET)) as env:
            proto, call, _ = await grpc_tunnel(env, f"stream-4-{ENDLESS}:80", 9)

            async def read() -> int:
                message = await call.recv()
                assert message is not None
                return len(message)

            taken = await _echo_behind(env, read)
            assert taken < ECHO_BEHIND_SLOW_READER_MAX + GRPC_CLIENT_HOLDS, taken
            await proto.aclose()

    run(main())
