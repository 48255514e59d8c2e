"""Helpers for the agent's tests: our proxy-server in process, a gRPC frontend speaking
``/ProxyService/Proxy`` on its Unix socket (one stream per tunnel, as konnectivity-client
does), TCP backends on 127.0.0.1, and an agent ``ClientSet`` wired to them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from konnectivity_fast.agent.clientset import ClientSet
from konnectivity_fast.agent.connect import ClientConfig
from konnectivity_fast.server import PROXY_PATH, ProxyServer, ServerHandle
from konnectivity_fast.server.buffering import BufferBudget
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.contract import NO_EXTENSIONS, ExtensionSet
from konnectivity_fast.wire.packets import (
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)
from tests.support.inproc import serving, uds_path
from tests.support.net import Certs

LOOPBACK = "127.0.0.1"
WAIT = 20.0


@dataclass
class Server:
    proxy: ProxyServer
    handle: ServerHandle
    uds: str

    @property
    def agent_port(self) -> int:
        port = self.handle.agent_port
        assert port is not None
        return port


@contextlib.asynccontextmanager
async def proxy_server(
    sock_dir: str,
    certs: Certs,
    *,
    server_id: str = "s1",
    server_count: int = 1,
    agent_port: int = 0,
    budget: BufferBudget | None = None,
    extensions: ExtensionSet = NO_EXTENSIONS,
) -> AsyncIterator[Server]:
    proxy = ProxyServer(
        server_id=server_id,
        server_count=server_count,
        rng=random.Random(1),
        budget=budget,
        extensions=extensions,
    )
    async with serving(proxy, sock_dir, certs, agent_port) as handle:
        yield Server(proxy, handle, uds_path(sock_dir, proxy))


def agent_config(
    certs: Certs, port: int, *, host: str = LOOPBACK, agent_id: str = "agent-1", **kw: Any
) -> ClientConfig:
    ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
    return ClientConfig(
        host=host, port=port, ssl_context=ctx, agent_id=agent_id, server_name="localhost", **kw
    )


@contextlib.asynccontextmanager
async def agent(certs: Certs, port: int, **kw: Any) -> AsyncIterator[ClientSet]:
    sync = {
        k: kw.pop(k)
        for k in ("sync_interval", "sync_interval_cap", "sync_forever", "pool")
        if k in kw
    }
    cs = ClientSet(agent_config(certs, port, **kw), rng=random.Random(7), **sync)
    cs.start()
    try:
        yield cs
    finally:
        await cs.stop()


async def until(predicate: object, timeout: float = WAIT, what: str = "condition") -> None:
    """Poll ``predicate()`` until true, bounded."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def server_has_agent(server: Server) -> bool:
    return server.proxy.router.ready


@dataclass
class Tunnel:
    """One ``Proxy`` stream of a frontend, carrying one connection."""

    proto: kgrpc.GrpcProtocol
    call: kgrpc.GrpcCall
    connect_id: int = 0
    received: bytearray = field(default_factory=bytearray)
    packets: list[Packet] = field(default_factory=list)

    @classmethod
    async def open(cls, uds: str) -> Tunnel:
        proto = await kgrpc.connect(path=uds)
        call = proto.start_call(PROXY_PATH)
        return cls(proto, call)

    def send(self, packet: Packet) -> None:
        self.call.send(encode_packet(packet))

    async def recv(self, timeout: float = WAIT) -> Packet | None:
        message = await asyncio.wait_for(self.call.recv(), timeout)
        if message is None:
            return None
        packet = decode_packet(message)
        self.packets.append(packet)
        return packet

    async def dial(self, address: str, rnd: int = 42, protocol: str = "tcp") -> DialResponse:
        self.send(Packet(PacketType.DIAL_REQ, DialRequest(protocol, address, rnd)))
        packet = await self.recv(timeout=WAIT)
        assert packet is not None and packet.type == PacketType.DIAL_RSP, packet
        assert isinstance(packet.payload, DialResponse)
        self.connect_id = packet.payload.connect_id
        return packet.payload

    def write(self, data: bytes) -> None:
        self.send(Packet(PacketType.DATA, Data(connect_id=self.connect_id, data=data)))

    async def read_exactly(self, n: int, timeout: float = WAIT) -> bytes:
        while len(self.received) < n:
            packet = await self.recv(timeout)
            assert packet is not None, "stream ended"
            if packet.type == PacketType.CLOSE_RSP:
                raise AssertionError(f"closed after {len(self.received)} of {n} bytes")
            assert packet.type == PacketType.DATA, packet
            assert isinstance(packet.payload, Data)
            self.received += packet.payload.data
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    async def close_and_wait(self) -> CloseResponse:
        self.send(Packet(PacketType.CLOSE_REQ, CloseRequest(self.connect_id)))
        return await self.wait_close_rsp()

    async def wait_close_rsp(self) -> CloseResponse:
        while True:
            packet = await self.recv()
            assert packet is not None, "stream ended before CLOSE_RSP"
            if packet.type == PacketType.DATA:
                assert isinstance(packet.payload, Data)
                self.received += packet.payload.data
                continue
            assert packet.type == PacketType.CLOSE_RSP, packet
            assert isinstance(packet.payload, CloseResponse)
            return packet.payload

    async def aclose(self) -> None:
        await self.proto.aclose()


class EchoServer:
    """A TCP echo backend on 127.0.0.1; counts its connections."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.accepted = 0
        self.open = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        # A deep accept queue: with a full one Linux completes the handshake on the
        # client side only, and the late accept takes seconds of SYN-ACK retries.
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0, backlog=4096)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open += 1
        self.writers.append(writer)
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.close()
            await self.server.wait_closed()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])
