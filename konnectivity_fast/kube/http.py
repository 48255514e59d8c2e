"""A minimal HTTP/1.1 client for one API server: keep-alive connections over asyncio
streams, TLS through ``ssl.SSLContext``.

Invariants:
- a connection carries one request at a time; idle ones are kept (at most
  ``MAX_IDLE_CONNECTIONS``) and reused, so steady lease renewals and token reviews do
  not pay a TLS handshake each;
- a request that fails on a *reused* connection before any response byte arrived is sent
  once more on a fresh connection (the server may close an idle connection at any time;
  Go's transport does the same);
- responses are bounded: headers by the stream reader's limit, bodies by
  ``MAX_BODY_BYTES``; Content-Length, chunked and read-to-close bodies are understood;
- a connection is reused only after its whole response body was read;
- a streamed answer (a watch) gets a connection of its own, never pooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncGenerator
from dataclasses import dataclass

__all__ = ["MAX_BODY_BYTES", "MAX_IDLE_CONNECTIONS", "HttpError", "HttpPool", "HttpResponse"]

# Lease and TokenReview bodies are a few KiB; a list of every lease of a big cluster stays
# far below this. A larger body means a broken or hostile peer: refuse, not buffer.
MAX_BODY_BYTES = 64 << 20
# Requests are sequential per caller; a handful of concurrent callers (auth per agent
# connect, lease renew and GC) share these.
MAX_IDLE_CONNECTIONS = 4
# Longest status or header line accepted (the stream reader's limit).
MAX_LINE_BYTES = 64 << 10
MAX_HEADER_COUNT = 256


class HttpError(Exception):
    """The connection failed or the response was not valid HTTP/1.1."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Drop a connection abandoned mid-exchange (cancelled, failed): no TLS close
        handshake that could outlive the event loop and leave the socket open."""
        self.writer.transport.abort()


class _EarlyClose(Exception):
    """The peer closed before sending any response byte."""


class HttpPool:
    """Connections to one ``host:port``; ``request`` may be called concurrently."""

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        server_hostname: str | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._ssl = ssl_context
        self._server_hostname = (server_hostname or host) if ssl_context else None
        self._idle: list[_Conn] = []
        self._closed = False

    async def request(
        self, method: str, target: str, headers: dict[str, str], body: bytes | None
    ) -> HttpResponse:
        head = self._head(method, target, headers, body)
        while self._idle:
            conn = self._idle.pop()
            try:
                return await self._exchange(conn, head, body, method)
            except (_EarlyClose, ConnectionError):
                conn.close()  # a stale keep-alive connection: try the next one
        conn = await self._connect()
        try:
            return await self._exchange(conn, head, body, method)
        except _EarlyClose:
            conn.close()
            raise HttpError("server closed the connection before responding") from None
        except ConnectionError as exc:
            conn.close()
            raise HttpError(str(exc) or type(exc).__name__) from None

    async def stream_lines(
        self, target: str, headers: dict[str, str]
    ) -> tuple[HttpResponse, AsyncGenerator[bytes, None] | None]:
        """GET on a connection of its own whose answer is a stream of lines (a watch).
        A non-200 answer comes back whole with no iterator; otherwise the iterator yields
        each line (without its newline) until the server ends the stream, and closing it
        closes the connection."""
        conn = await self._connect()
        try:
            conn.writer.write(self._head("GET", target, headers, None))
            await conn.writer.drain()
            status_line = await conn.reader.readline()
            if not status_line:
                raise HttpError("server closed the connection before responding")
            status = _parse_status(status_line)
            head = await _read_headers(conn.reader)
            if status != 200:
                response, _ = await self._read_body(conn.reader, "GET", status, head)
                conn.close()
                return response, None
        except BaseException:
            conn.abort()
            raise
        return HttpResponse(status, head, b""), _lines(conn, head)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()

    def _head(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
        host = self._host if ":" not in self._host else f"[{self._host}]"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{self._port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _connect(self) -> _Conn:
        try:
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._server_hostname,
                limit=MAX_LINE_BYTES,
            )
        except ssl.SSLCertVerificationError as exc:
            # Go's wording, with OpenSSL's reason: the operator sees a CA problem.
            raise HttpError(f"tls: failed to verify certificate: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise HttpError(f"tls: {exc.reason or exc}") from None
        except OSError as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
            raise HttpError(f"dial tcp {self._host}:{self._port}: connect: {reason}") from None
        return _Conn(reader, writer)

    async def _exchange(
        self, conn: _Conn, head: bytes, body: bytes | None, method: str
    ) -> HttpResponse:
        try:
            conn.writer.write(head + body if body else head)
            await conn.writer.drain()
            response, reusable = await self._read_response(conn.reader, method)
        except BaseException:
            conn.abort()
            raise
        if reusable and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def _read_response(
        self, reader: asyncio.StreamReader, method: str
    ) -> tuple[HttpResponse, bool]:
        status_line = await reader.readline()
        if not status_line:
            raise _EarlyClose
        status = _parse_status(status_line)
        headers = await _read_headers(reader)
        return await self._read_body(reader, method, status, headers)

    @staticmethod
    async def _read_body(
        reader: asyncio.StreamReader, method: str, status: int, headers: dict[str, str]
    ) -> tuple[HttpResponse, bool]:
        reusable = headers.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return HttpResponse(status, headers, b""), reusable
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _read_chunked(reader)
        elif "content-length" in headers:
            body = await _read_exact(reader, _content_length(headers["content-length"]))
        else:
            body = await reader.read(MAX_BODY_BYTES + 1)
            if len(body) > MAX_BODY_BYTES:
                raise HttpError(f"response body larger than {MAX_BODY_BYTES} bytes")
            reusable = False
        return HttpResponse(status, headers, body), reusable


def _parse_status(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"malformed HTTP status line {line[:100]!r}")
    return int(parts[1])


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_COUNT):
        line = await _readline(reader)
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise HttpError(f"malformed HTTP header line {line[:100]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise HttpError(f"more than {MAX_HEADER_COUNT} response headers")


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        raise HttpError("connection closed in the middle of a response") from None
    except asyncio.LimitOverrunError:
        raise HttpError(f"response line longer than {MAX_LINE_BYTES} bytes") from None
    return line


def _content_length(text: str) -> int:
    if not text.isdigit():
        raise HttpError(f"bad Content-Length {text[:40]!r}")
    length = int(text)
    if length > MAX_BODY_BYTES:
        raise HttpError(f"response body larger than {MAX_BODY_BYTES} bytes")
    return length


async def _read_exact(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise HttpError("connection closed in the middle of a response body") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_text = (await _readline(reader)).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_text[:40]!r}") from None
        if size == 0:
            await _read_headers(reader)  # trailers, up to the blank line
            return bytes(body)
        if len(body) + size > MAX_BODY_BYTES:
            raise HttpError(f"response body larger than {MAX_BODY_BYTES} bytes")
        body += await _read_exact(reader, size)
        if await _read_exact(reader, 2) != b"\r\n":
            raise HttpError("malformed chunk terminator")


async def _lines(conn: _Conn, headers: dict[str, str]) -> AsyncGenerator[bytes, None]:
    """The lines of a streamed body (chunked, or up to the close); a line longer than
    ``MAX_BODY_BYTES`` is an error. Closes the connection when done or abandoned."""
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    pending = bytearray()
    try:
        while True:
            data = await _next_chunk(conn.reader) if chunked else await conn.reader.read(1 << 16)
            if not data:
                if pending.strip():
                    yield bytes(pending)
                return
            pending += data
            while (end := pending.find(b"\n")) >= 0:
                line = bytes(pending[:end])
                del pending[: end + 1]
                if line.strip():
                    yield line
            if len(pending) > MAX_BODY_BYTES:
                raise HttpError(f"streamed line longer than {MAX_BODY_BYTES} bytes")
    finally:
        conn.abort()  # a watch ends by being abandoned: never reused


async def _next_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body; b"" at its end (or if the peer just closes)."""
    try:
        size_line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return b""
    except asyncio.LimitOverrunError:
        raise HttpError(f"response line longer than {MAX_LINE_BYTES} bytes") from None
    try:
        size = int(size_line.split(b";", 1)[0].strip(), 16)
    except ValueError:
        raise HttpError(f"bad chunk size {size_line[:40]!r}") from None
    if size == 0:
        return b""
    if size > MAX_BODY_BYTES:
        raise HttpError(f"chunk larger than {MAX_BODY_BYTES} bytes")
    data = await _read_exact(reader, size)
    if await _read_exact(reader, 2) != b"\r\n":
        raise HttpError("malformed chunk terminator")
    return data
