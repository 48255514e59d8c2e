"""A scriptable ``/AgentService/Connect`` server for packet-level agent tests, on our own
transport (server role): each accepted stream is handed to the test, which sends and
receives raw packets on it. TLS with ALPN chosen by the test (``alpn``), so custom ALPN and
no ALPN can be shown."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from konnectivity_fast.transport import tls
from konnectivity_fast.transport.grpc import GrpcCall, GrpcError, GrpcProtocol
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.errors import StatusCode
from konnectivity_fast.wire.packets import Packet
from tests.support.net import Certs

from .support import LOOPBACK, WAIT


@dataclass
class FakeServer:
    headers: list[tuple[str, str]] = field(
        default_factory=lambda: [("serverid", "fake-1"), ("servercount", "1")]
    )
    refuse: str | None = None  # end each stream with this UNKNOWN status, no headers
    streams: asyncio.Queue[GrpcCall] = field(default_factory=asyncio.Queue)
    metadata: list[list[tuple[str, str]]] = field(default_factory=list)
    alpn: list[str] = field(default_factory=list)
    server: asyncio.Server | None = None
    protos: list[GrpcProtocol] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handler(self, call: GrpcCall) -> None:
        self.metadata.append(list(call.metadata))
        if self.refuse is not None:
            raise GrpcError(StatusCode.UNKNOWN, self.refuse)
        call.send_headers(self.headers)
        self.streams.put_nowait(call)
        await call.closed

    async def next_stream(self) -> GrpcCall:
        return await asyncio.wait_for(self.streams.get(), WAIT)

    def drop_connections(self) -> None:
        for proto in self.protos:
            if proto.transport is not None:
                proto.transport.abort()


@contextlib.asynccontextmanager
async def fake_server(
    certs: Certs, *, alpn: Sequence[str] = ("h2",), **kw: object
) -> AsyncIterator[FakeServer]:
    fake = FakeServer(**kw)  # type: ignore[arg-type]
    ctx = tls.server_context(certs.server_cert, certs.server_key, certs.ca, alpn=alpn)
    loop = asyncio.get_running_loop()

    def factory() -> GrpcProtocol:
        proto = GrpcProtocol(True, fake.handler, loop=loop, require_alpn_h2=False)
        fake.protos.append(proto)
        return proto

    fake.server = await loop.create_server(factory, LOOPBACK, 0, ssl=ctx)
    try:
        yield fake
    finally:
        fake.server.close()
        fake.drop_connections()
        await fake.server.wait_closed()


def send(call: GrpcCall, packet: Packet) -> None:
    call.send(encode_packet(packet))


async def recv(call: GrpcCall, timeout: float = WAIT) -> Packet:
    message = await asyncio.wait_for(call.recv(), timeout)
    assert message is not None, "the agent ended its stream"
    return decode_packet(message)
