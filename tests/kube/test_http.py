"""The HTTP/1.1 client against peers that misbehave on purpose (a real API server does not):
idle connections closed by the server, malformed and oversized responses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import pytest

from konnectivity_fast.kube.http import MAX_BODY_BYTES, HttpError, HttpPool
from tests.support.net import RunFn

pytestmark = pytest.mark.timeout(60)

Reply = Callable[[int], bytes]  # request number (from 0) -> raw response bytes


@contextlib.asynccontextmanager
async def peer(reply: Reply, close_after: bool) -> AsyncIterator[tuple[int, list[int]]]:
    """A loopback server answering each request with ``reply``; it closes the connection
    after each answer when ``close_after`` (without saying so). Yields its port and the
    number of connections it accepted, in a list."""
    accepted = [0]
    served = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[0] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                writer.write(reply(served[0]))
                served[0] += 1
                await writer.drain()
                if close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        await server.wait_closed()


def ok(body: bytes = b"{}") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def test_stale_keep_alive_connection_is_replaced(run: RunFn) -> None:
    async def body() -> None:
        async with peer(lambda n: ok(b'{"n":%d}' % n), close_after=True) as (port, accepted):
            pool = HttpPool("127.0.0.1", port, None)
            try:
                for n in range(3):
                    await asyncio.sleep(0.05)  # let the server's close arrive
                    response = await pool.request("POST", "/x", {}, b"{}")
                    assert (response.status, response.body) == (200, b'{"n":%d}' % n)
                assert accepted[0] == 3
            finally:
                await pool.close()

    run(body())


def test_keep_alive_reuse(run: RunFn) -> None:
    async def body() -> None:
        chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
        async with peer(lambda n: chunked if n % 2 else ok(), close_after=False) as (
            port,
            accepted,
        ):
            pool = HttpPool("127.0.0.1", port, None)
            try:
                for _ in range(6):
                    assert (await pool.request("GET", "/x", {}, None)).body == b"{}"
                assert accepted[0] == 1
            finally:
                await pool.close()

    run(body())


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"garbage\r\n\r\n", "malformed HTTP status line"),
        (b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n", "malformed HTTP header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", "bad Content-Length"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY_BYTES + 1),
            "response body larger than",
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "closed in the middle"),
        (b"", "closed the connection before responding"),
    ],
)
def test_malformed_responses(run: RunFn, raw: bytes, message: str) -> None:
    async def body() -> None:
        async with peer(lambda n: raw, close_after=True) as (port, _):
            pool = HttpPool("127.0.0.1", port, None)
            try:
                with pytest.raises(HttpError, match=message):
                    await pool.request("GET", "/x", {}, None)
            finally:
                await pool.close()

    run(body())
