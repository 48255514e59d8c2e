"""The demo's frontend clients, standing in for kube-apiserver: a tunnel through a
proxy-server's frontend, in either mode, and HTTP/1.1 spoken through it.

- gRPC (``--mode=grpc``): what konnectivity-client's single-use tunnel does. A new HTTP/2
  connection to the frontend's Unix socket, one ``/ProxyService/Proxy`` stream, DIAL_REQ
  then DIAL_RSP, DATA both ways, CLOSE_REQ and CLOSE_RSP, with our own client role
  (``transport.grpc``). No extension is offered: this is upstream's protocol.
- HTTP-CONNECT (``--mode=http-connect``): ``CONNECT host:port HTTP/1.1`` on the Unix
  socket, ``200 Connection Established``, then the raw bytes.

Both give a ``Tunnel``: ``send``, ``recv`` (b"" at the end), ``close``. ``HttpClient``
speaks HTTP/1.1 keep-alive over one, reading bodies by ``Content-Length``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from typing import Protocol

from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.wire import (
    CloseRequest,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)
from konnectivity_fast.wire.codec import decode_packet, encode_packet, peek_data
from konnectivity_fast.wire.contract import PROXY_PATH

__all__ = ["ConnectTunnel", "GrpcTunnel", "HttpClient", "Tunnel", "TunnelError"]

# Bound on every step the demo waits for (a dial, a reply, a close): far above what a
# healthy local proxy needs, low enough that a broken one fails the demo quickly.
# (asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a Ctrl-C's
# cancellation when the awaited read completes at the same moment.)
STEP_TIMEOUT = 15.0
# Bytes read from a CONNECT socket at a time.
READ_SIZE = 256 << 10
# The largest response head the demo's backend writes, with room to spare.
MAX_HEAD = 64 << 10


class TunnelError(Exception):
    """A tunnel could not be opened or broke; the text says where."""


class Tunnel(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes: ...
    async def close(self) -> None: ...


class GrpcTunnel:
    """One dial over its own HTTP/2 connection (konnectivity-client's single-use tunnel)."""

    def __init__(self, proto: kgrpc.GrpcProtocol, call: kgrpc.GrpcCall, connect_id: int) -> None:
        self.proto = proto
        self.call = call
        self.connect_id = connect_id
        self._closed = False

    @classmethod
    async def open(cls, uds: str, address: str) -> GrpcTunnel:
        async with asyncio.timeout(STEP_TIMEOUT):
            proto = await kgrpc.connect(path=uds)
        try:
            call = proto.start_call(PROXY_PATH, [])
            random = secrets.randbits(62) + 1  # konnectivity-client: a positive int63
            call.send(
                encode_packet(Packet(PacketType.DIAL_REQ, DialRequest("tcp", address, random)))
            )
            async with asyncio.timeout(STEP_TIMEOUT):
                message = await call.recv()
            if message is None:
                raise TunnelError(f"the stream ended before DIAL_RSP ({call.message})")
            packet = decode_packet(message)
            reply = packet.payload
            if packet.type != PacketType.DIAL_RSP or not isinstance(reply, DialResponse):
                raise TunnelError(f"expected DIAL_RSP, got packet type {packet.type}")
            if reply.error:
                raise TunnelError(f"dial {address} failed: {reply.error}")
            return cls(proto, call, reply.connect_id)
        except BaseException:
            if proto.transport is not None:
                proto.transport.abort()
            raise

    async def send(self, data: bytes) -> None:
        self.call.send_data_packet(self.connect_id, data)
        await self.call.drain()

    async def recv(self) -> bytes:
        while True:
            message = await self.call.recv()
            if message is None:
                return b""
            view = peek_data(message)
            if view is not None:
                return bytes(view[1])
            if decode_packet(message).type == PacketType.CLOSE_RSP:
                self._closed = True
                return b""

    async def close(self) -> None:
        """CLOSE_REQ, wait for CLOSE_RSP, half-close; then the connection goes."""
        with contextlib.suppress(TimeoutError, kgrpc.GrpcError):
            if not self._closed:
                self.call.send(
                    encode_packet(Packet(PacketType.CLOSE_REQ, CloseRequest(self.connect_id)))
                )
                async with asyncio.timeout(STEP_TIMEOUT):
                    while await self.recv():
                        pass
            self.call.done_writing()
            async with asyncio.timeout(STEP_TIMEOUT):
                await self.call.wait_status()
        await self.proto.aclose()


class ConnectTunnel:
    """One ``CONNECT`` on the HTTP-CONNECT frontend's Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, uds: str, address: str) -> ConnectTunnel:
        async with asyncio.timeout(STEP_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(uds, limit=MAX_HEAD)
        try:
            writer.write(f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            async with asyncio.timeout(STEP_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            rest = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
            raise TunnelError(f"CONNECT {address}: no answer {rest[:200]!r}") from None
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if not status.startswith("HTTP/1.1 200"):
            body = await reader.read(1000)
            writer.close()
            raise TunnelError(f"CONNECT {address}: {status} {body.decode(errors='replace')}")
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        return await self.reader.read(READ_SIZE)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class HttpClient:
    """HTTP/1.1 keep-alive over a tunnel; response bodies by ``Content-Length``."""

    def __init__(self, tunnel: Tunnel, host: str) -> None:
        self.tunnel = tunnel
        self.host = host
        self._buf = bytearray()

    async def _fill(self) -> None:
        async with asyncio.timeout(STEP_TIMEOUT):
            data = await self.tunnel.recv()
        if not data:
            raise TunnelError("the tunnel closed in the middle of a response")
        self._buf += data

    async def request(
        self, path: str, body: bytes = b"", sink: Callable[[bytes], None] | None = None
    ) -> tuple[int, bytes]:
        """GET (POST with a body) ``path``: the status and the body. With ``sink``, the
        body is handed to it piece by piece instead, and b"" returned."""
        method = "POST" if body else "GET"
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body:
            head += f"Content-Length: {len(body)}\r\n"
        await self.tunnel.send(head.encode() + b"\r\n" + body)
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_HEAD:
                raise TunnelError("response head too large")
            await self._fill()
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        status = int(lines[0].split(" ")[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await self._body(length, sink)

    async def _body(self, length: int, sink: Callable[[bytes], None] | None) -> bytes:
        if sink is None:
            while len(self._buf) < length:
                await self._fill()
            body = bytes(self._buf[:length])
            del self._buf[:length]
            return body
        left = length
        while left:
            if not self._buf:
                await self._fill()
            piece = bytes(self._buf[:left])
            del self._buf[: len(piece)]
            left -= len(piece)
            sink(piece)
        return b""
