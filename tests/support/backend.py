"""A backend HTTP/1.1 server, standard library only: it runs in a worker's network
namespace (tests/remote_control_plane) or on loopback beside a container image (tests/deploy):

* ``GET /whoami``: ``<name> <peer address>``: which worker answered, and from where the
  connection came (the agent dials from the worker itself).
* ``POST /echo``: the request body back, byte for byte, streamed as it arrives.
* ``GET /hold``: the response headers, then nothing: a long-lived connection whose end the
  client observes.

With ``--echo-port`` and ``--ident-port``, two raw TCP ports for clients that speak no HTTP
(goclient): the echo port sends back every byte it receives, and nothing else; the identity
port sends ``<name> <peer address>`` and closes.

Prints ``listening`` on stdout once bound. Exits by itself after ``--ttl`` seconds, so a
test that dies never leaves it behind. One connection per request (``Connection: close``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

# Bound on a request's headers.
MAX_HEADERS = 64 * 1024
# Unit of body reads: echoed as it arrives.
CHUNK = 64 * 1024
# A client that sends nothing for this long is dropped.
IDLE_SECONDS = 60.0
# How long the identity port waits before it answers (see ident()).
IDENT_DELAY_SECONDS = 0.2


async def handle(name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_SECONDS)
        if len(head) > MAX_HEADERS:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        length = 0
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-length":
                length = int(value.strip())
        if method == "GET" and path == "/whoami":
            body = f"{name} {peer[0]}".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        elif method == "POST" and path == "/echo":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length)
            left = length
            while left:
                chunk = await asyncio.wait_for(reader.read(min(CHUNK, left)), IDLE_SECONDS)
                if not chunk:
                    return
                left -= len(chunk)
                writer.write(chunk)
                await writer.drain()
        elif method == "GET" and path == "/hold":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            await writer.drain()
            await reader.read()  # until the client (or the tunnel) goes away
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
    except (
        OSError,
        ValueError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
    ):
        pass
    finally:
        writer.transport.abort()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(CHUNK):
            writer.write(chunk)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def ident(name: str, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    try:
        # Answer a little after the connection, not at once: upstream's konnectivity-client
        # (v0.36.0) registers a connection only after its DIAL_RSP was handed over, and drops
        # DATA that arrives before that (with upstream's server and agent as with ours).
        await asyncio.sleep(IDENT_DELAY_SECONDS)
        writer.write(f"{name} {peer[0]}".encode())
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def serve(args: argparse.Namespace) -> None:
    name = args.name
    servers = [
        await asyncio.start_server(
            lambda r, w: handle(name, r, w), args.host, args.port, limit=MAX_HEADERS
        )
    ]
    if args.echo_port:
        servers.append(await asyncio.start_server(echo, args.host, args.echo_port))
    if args.ident_port:
        servers.append(
            await asyncio.start_server(lambda _, w: ident(name, w), args.host, args.ident_port)
        )
    print("listening", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(server.serve_forever() for server in servers)), args.ttl
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--echo-port", type=int, default=0, help="raw echo port (0: none)")
    parser.add_argument("--ident-port", type=int, default=0, help="raw identity port (0: none)")
    parser.add_argument("--ttl", type=float, default=600.0, help="exit after this many seconds")
    asyncio.run(serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
