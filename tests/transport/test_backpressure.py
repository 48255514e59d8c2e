"""A peer that does not read: ``GrpcProtocol`` stops reading it, or closes it, and never
reads and throws away what it sends (docs/data-path.md, "One write per loop turn").

Each test serves an echo service on a Unix socket (h2c, as the proxy-server's frontend) and
drives it from a raw socket built with ``tests/support/h2frames.py``: frames the server
must answer (SETTINGS, PING), sent in small writes so that each of the server's reads holds
fewer than the engine's MAX_OUTBOUND_ACK, by a peer that never reads the answers. Whether
the server still takes the peer's bytes is seen from the peer: its writes block (the server
stopped reading, grpc-go's throttle) or fail (the server closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from typing import Any

import pytest

from konnectivity_fast.transport.grpc import (
    MAX_QUEUED_RESPONSE_FRAMES,
    GrpcCall,
    GrpcProtocol,
    GrpcServer,
    connect,
    serve,
)
from tests.support.flood import flood_without_reading
from tests.support.h2frames import PREFACE, ping, settings_frame

from .conftest import RunFn

pytestmark = pytest.mark.timeout(60)

#: Frames per write: well under the engine's MAX_OUTBOUND_ACK (1000), so only the
#: adapter's own backpressure can stop the flood.
FRAMES_PER_WRITE = 20
PAUSE_WAIT = 10.0


async def echo(call: GrpcCall) -> None:
    while (message := await call.recv()) is not None:
        call.send(message)
        await call.drain()


@contextlib.asynccontextmanager
async def raw_peer(path: str, small: bool = False) -> Any:
    """A raw client socket after the preface; with ``small`` send buffers, so that what it
    has sent and the server has not read yet stays far below the control-frame budget."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX)
    if small:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, path)
        await loop.sock_sendall(sock, PREFACE + settings_frame())
        yield sock
    finally:
        sock.close()


#: The server's socket buffer toward the peer and its transport's high-water mark, kept
#: small so that the peer's socket is full long before the engine's control-frame budget
#: (CONTROL_FRAME_BURST) would refuse the flood by itself.
SMALL_BUFFER = 4096


async def only_connection(server: GrpcServer, small: bool = True) -> GrpcProtocol:
    """The server's one connection, once accepted; with ``small`` buffers toward its peer."""
    for _ in range(int(PAUSE_WAIT / 0.01)):
        if server.connections:
            break
        await asyncio.sleep(0.01)
    (proto,) = server.connections
    if small:
        assert proto.transport is not None
        sock = proto.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        proto.transport.set_write_buffer_limits(high=SMALL_BUFFER)
    return proto


@pytest.mark.parametrize("unit", [settings_frame(), ping()], ids=["settings", "ping"])
def test_a_peer_flooding_without_reading_is_not_read(
    run: RunFn, sock_dir: str, unit: bytes
) -> None:
    """The peer's writes end up blocked (reading stopped) or failing (closed); either way
    the server took a bounded amount, and a well-behaved client is served meanwhile."""

    async def main() -> None:
        path = os.path.join(sock_dir, "s.sock")
        server = await serve(echo, path=path, min_ping_interval=-1.0)
        try:
            async with raw_peer(path) as sock:
                result = await flood_without_reading(sock, unit * FRAMES_PER_WRITE)
                assert result.outcome in ("stopped reading", "closed"), result
            client = await connect(path=path)
            call = client.start_call("/echo")
            call.send(b"still served")
            assert await asyncio.wait_for(call.recv(), PAUSE_WAIT) == b"still served"
            await client.aclose()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_reading_stops_only_while_the_peer_owes_us_reading(run: RunFn, sock_dir: str) -> None:
    """The throttle (MAX_QUEUED_RESPONSE_FRAMES owed while the socket is full) lifts once
    the peer reads: the connection then works as before, nothing was lost or closed."""

    async def main() -> None:
        path = os.path.join(sock_dir, "s.sock")
        server = await serve(echo, path=path, min_ping_interval=-1.0)
        loop = asyncio.get_running_loop()
        try:
            async with raw_peer(path, small=True) as sock:
                proto = await only_connection(server)
                result = await flood_without_reading(sock, settings_frame() * FRAMES_PER_WRITE)
                assert result.outcome == "stopped reading", result
                assert proto.error is None
                assert proto.write_paused
                assert proto.conn.queued_frames >= MAX_QUEUED_RESPONSE_FRAMES
                # Now read what the server owes (an ACK per SETTINGS), then ask for more.
                owed = result.sent + len(settings_frame())
                received = bytearray()
                while len(received) < owed:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), PAUSE_WAIT)
                    assert data, "the server closed a peer that caught up"
                    received += data
                await loop.sock_sendall(sock, ping(b"caughtup"))
                while ping(b"caughtup", ack=True) not in received:
                    data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), PAUSE_WAIT)
                    assert data, "the server closed a peer that caught up"
                    received += data
                assert not proto.lost.done()
        finally:
            server.close()
            await server.wait_closed()

    run(main())


def test_a_refused_peer_that_does_not_read_is_closed(run: RunFn, sock_dir: str) -> None:
    """The engine refuses a peer (here: more ACKs owed in one read than MAX_OUTBOUND_ACK)
    while the socket toward it is full: the connection still closes, and the server stops
    taking its bytes at once, instead of reading and throwing them away for ever."""

    async def main() -> None:
        path = os.path.join(sock_dir, "s.sock")
        server = await serve(echo, path=path, min_ping_interval=-1.0)
        try:
            async with raw_peer(path) as sock:
                proto = await only_connection(server)
                while not proto.write_paused:  # fill the socket toward the peer
                    await asyncio.get_running_loop().sock_sendall(sock, settings_frame() * 20)
                    await asyncio.sleep(0)
                # One read the throttle cannot stop: over MAX_OUTBOUND_ACK frames at once.
                blob = settings_frame() * 3000
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.send(blob)
                await asyncio.wait_for(asyncio.shield(proto.lost), PAUSE_WAIT)
                assert proto.error is not None and "does not read" in proto.error
        finally:
            server.close()
            await server.wait_closed()

    run(main())
