"""Two bare relay processes: the floor of the latency benchmark (bench/latency_floor.py).

The same socket chain as a tunnel through our proxy, with nothing of ours in it: the
client dials a Unix socket and sends an HTTP ``CONNECT host:port`` request (as
kube-apiserver does in HTTP-CONNECT mode); the **front** relay opens a TCP connection to
the **back** relay (optionally TLS with client certificates, as the agent link) and sends
it the target in one line; the back relay dials the target over TCP and answers ``OK``;
the front relay then answers ``200`` and both relays copy bytes as they come (asyncio
``Protocol``s on uvloop that write what they read; ``TCP_NODELAY`` on every TCP socket).
No framing, no multiplexing, no flow control: one relay connection per tunnel.

    python -m bench._floor_relay back --port P [--cert C --key K --ca CA]
    python -m bench._floor_relay front --uds PATH --back-port P [--cert C --key K --ca CA]

Each prints ``READY`` once listening and runs until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
from collections.abc import Callable
from typing import cast

import uvloop

# A CONNECT request is one line and a Host header; anything longer is not our client.
MAX_REQUEST = 4096
LOOPBACK = "127.0.0.1"


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Relay(asyncio.Protocol):
    """One side of a relayed connection. Until ``join``, it collects what it reads and
    hands it to ``on_head`` (which decides when the head is complete); after, it writes
    everything it reads to its peer."""

    def __init__(self, on_head: Callable[[Relay], None] | None = None) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.peer: Relay | None = None
        self.head = bytearray()
        self.on_head = on_head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not register with asyncio's ABCs: no isinstance check.
        self.transport = cast(asyncio.WriteTransport, transport)
        _nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
            return
        self.head += data
        if len(self.head) > MAX_REQUEST:
            self.close()
        elif self.on_head is not None:
            self.on_head(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def join(self, peer: Relay, rest: bytes) -> None:
        """From now on, copy to ``peer``; ``rest``: bytes read past the head."""
        self.peer, peer.peer = peer, self
        self.on_head = None
        if rest and peer.transport is not None:
            peer.transport.write(rest)


def _split(head: bytearray, end: bytes) -> tuple[bytes, bytes] | None:
    at = head.find(end)
    if at < 0:
        return None
    return bytes(head[:at]), bytes(head[at + len(end) :])


def front_head(back_port: int, ssl_ctx: ssl.SSLContext | None) -> Callable[[Relay], None]:
    def on_head(inbound: Relay) -> None:
        parts = _split(inbound.head, b"\r\n\r\n")
        if parts is None:
            return
        inbound.on_head = None  # the client waits for our answer before sending more
        target = parts[0].split(b" ", 2)[1]
        asyncio.get_running_loop().create_task(_front_dial(inbound, target, back_port, ssl_ctx))

    return on_head


async def _front_dial(
    inbound: Relay, target: bytes, back_port: int, ssl_ctx: ssl.SSLContext | None
) -> None:
    loop = asyncio.get_running_loop()
    answered = loop.create_future()

    def on_ok(outbound: Relay) -> None:
        parts = _split(outbound.head, b"\n")
        if parts is not None and not answered.done():
            answered.set_result(parts[1])

    try:
        transport, outbound = await loop.create_connection(
            lambda: Relay(on_ok),
            LOOPBACK,
            back_port,
            ssl=ssl_ctx,
            server_hostname="localhost" if ssl_ctx else None,
        )
        transport.write(target + b"\n")
        rest = await answered
    except OSError:
        inbound.close()
        return
    assert inbound.transport is not None
    inbound.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
    outbound.join(inbound, rest)


def back_head(inbound: Relay) -> None:
    parts = _split(inbound.head, b"\n")
    if parts is None:
        return
    inbound.on_head = None
    host, _, port = parts[0].decode().rpartition(":")
    asyncio.get_running_loop().create_task(_back_dial(inbound, host, int(port), parts[1]))


async def _back_dial(inbound: Relay, host: str, port: int, rest: bytes) -> None:
    try:
        _, outbound = await asyncio.get_running_loop().create_connection(Relay, host, port)
    except OSError:
        inbound.close()
        return
    assert inbound.transport is not None
    inbound.transport.write(b"OK\n")
    inbound.join(outbound, rest)


def _context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.cert:
        return None
    server = args.side == "back"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    ctx = _context(args)
    if args.side == "front":
        on_head = front_head(args.back_port, ctx)
        server = await loop.create_unix_server(lambda: Relay(on_head), args.uds)
    else:
        server = await loop.create_server(lambda: Relay(back_head), LOOPBACK, args.port, ssl=ctx)
    print("READY", flush=True)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("side", choices=("front", "back"))
    p.add_argument("--uds", help="front: the Unix socket clients dial")
    p.add_argument("--back-port", type=int, help="front: the back relay's port")
    p.add_argument("--port", type=int, help="back: the port to listen on")
    p.add_argument("--cert", help="TLS between the relays: this side's certificate")
    p.add_argument("--key")
    p.add_argument("--ca")
    uvloop.run(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
