"""The demo's backend, standing in for a kubelet: a small HTTP/1.1 server (keep-alive)
run as its own process, ``python -m konnectivity_fast.cli.demo.backend``.

- ``GET /healthz``: ``ok``, as a kubelet answers;
- ``GET /bulk?bytes=N``: N bytes (at most ``MAX_BULK``), as ``kubectl logs`` or ``cp`` pull;
- ``POST /sink``: reads the body and answers how many bytes arrived;
- ``GET /whoami``: its name and the address the connection came from (the agent's).

Standard library only, so it starts fast and runs anywhere the demo does. ``--ttl``
bounds its life, so that a backend left behind by a crash goes away by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

# The largest /bulk answer: a few GiB would only fill the demo's time.
MAX_BULK = 1 << 32
# /bulk is written in chunks of this size, from one buffer (the pattern repeats).
CHUNK = 256 << 10
# Request heads larger than this are refused (nothing the demo sends comes close).
MAX_HEAD = 64 << 10
_PATTERN = bytes(range(256)) * (CHUNK // 256)


def _response(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def _bulk(writer: asyncio.StreamWriter, size: int) -> None:
    writer.write(
        f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {size}\r\n\r\n".encode()
    )
    left = size
    view = memoryview(_PATTERN)
    while left:
        n = min(left, CHUNK)
        writer.write(view[:n])
        left -= n
        await writer.drain()


async def _sink(reader: asyncio.StreamReader, length: int) -> int:
    got = 0
    while got < length:
        chunk = await reader.read(min(CHUNK, length - got))
        if not chunk:
            break
        got += len(chunk)
    return got


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    peer: str  # the address the connection came from


def _request(head: bytes, peer: object) -> Request:
    lines = head.decode("latin-1").split("\r\n")
    method, _, rest = lines[0].partition(" ")
    target = rest.partition(" ")[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Request(method, target, headers, peer[0] if isinstance(peer, tuple) else str(peer))


class Backend:
    def __init__(self, name: str) -> None:
        self.name = name

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                request = _request(head[:-4], peer)
                await self.answer(reader, writer, request)
                if request.headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()

    async def answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: Request
    ) -> None:
        parts = urlsplit(request.target)
        method = request.method
        length = int(request.headers.get("content-length") or 0)
        if parts.path == "/healthz":
            writer.write(_response("200 OK", b"ok"))
        elif parts.path == "/whoami":
            writer.write(_response("200 OK", f"{self.name} {request.peer}".encode()))
        elif parts.path == "/bulk" and method in ("GET", "HEAD"):
            size = int(parse_qs(parts.query).get("bytes", ["0"])[0])
            await _bulk(writer, max(0, min(size, MAX_BULK)))
        elif parts.path == "/sink" and method == "POST":
            got = await _sink(reader, length)
            writer.write(_response("200 OK", str(got).encode()))
            length = 0
        else:
            writer.write(_response("404 Not Found", b"404 page not found\n"))
        if length:  # an unexpected body: skip it to keep the connection usable
            await _sink(reader, length)
        await writer.drain()


async def serve(host: str, port: int, name: str, ttl: float) -> None:
    backend = Backend(name)
    server = await asyncio.start_server(backend.handle, host, port, limit=MAX_HEAD)
    async with server:
        print(f"backend {name} listening on {host}:{port}", flush=True)
        if ttl > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.serve_forever(), ttl)
        else:
            await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="backend")
    parser.add_argument("--ttl", type=float, default=0.0, help="seconds to live (0: forever)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.name, args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
