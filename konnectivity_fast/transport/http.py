"""A small asyncio HTTP/1.1 server for the health and admin endpoints of both programs.

One request per connection (``Connection: close``), as much as Go's ``net/http`` shows to
a probe or a Prometheus scrape: exact paths, any method (HEAD gets the headers only),
absolute-form targets, ``404 page not found``. Heads are read as Go reads them
(``transport.httphead``: bare-LF line ends too), and those Go refuses get Go's raw error
reply (``400 Bad Request...``, ``431``, ``505``). Request heads are bounded
(``MAX_HEADER_BYTES``, ``READ_HEADER_TIMEOUT``: the limits upstream sets on its servers);
a request body is never read. Dates are written by hand:
``email.utils`` costs about a MiB of RSS in a process that should stay small.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from konnectivity_fast.transport.accept import Listener, listen_tcp
from konnectivity_fast.transport.httphead import HeadError, error_response, head_end, parse_head

__all__ = [
    "MAX_HEADER_BYTES",
    "NOSNIFF",
    "READ_HEADER_TIMEOUT",
    "TEXT_PLAIN",
    "Handler",
    "Request",
    "Response",
    "http_date",
    "start_http",
]

log = logging.getLogger(__name__)

#: Go's http.Server limits that upstream sets: header bytes and the time to read them.
MAX_HEADER_BYTES = 1 << 20
READ_HEADER_TIMEOUT = 60.0
#: The listen backlog of these servers: asyncio.start_server's default, ample for probes
#: and scrapes.
HTTP_BACKLOG = 100
#: Go's server reads this much past MaxHeaderBytes before it answers 431.
GO_HEADER_SLACK = 4096
#: Bytes read from the socket at a time while looking for the end of a head.
READ_CHUNK = 64 << 10
TOO_LARGE = "431 Request Header Fields Too Large"
TEXT_PLAIN = "text/plain; charset=utf-8"
NOSNIFF = (("X-Content-Type-Options", "nosniff"),)

_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    404: "Not Found",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str  # raw, without '?'; empty when absent
    headers: Mapping[str, str]  # lower-case names
    http10: bool = False  # an HTTP/1.0 request: Go answers in that version


# (status, content type, body, extra headers)
Response = tuple[int, str, bytes, tuple[tuple[str, str], ...]]
#: A route's handler; one that must ask elsewhere first (the proxy-server supervisor's
#: routes ask its workers) returns an awaitable of the response.
Handler = Callable[[Request], Response | Awaitable[Response]]


def http_date(now: float | None = None) -> str:
    """An RFC 9110 date, as Go writes the ``Date`` header."""
    t = time.gmtime(now)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _not_found() -> Response:
    # Go's http.NotFound: http.Error's text, newline included.
    return 404, TEXT_PLAIN, b"404 page not found\n", NOSNIFF


def _render(
    status: int,
    content_type: str,
    body: bytes,
    extra: tuple[tuple[str, str], ...],
    *,
    head: bool,
    http10: bool = False,
) -> bytes:
    version = "HTTP/1.0" if http10 else "HTTP/1.1"
    lines = [f"{version} {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in extra)
    lines.append(f"Content-Type: {content_type}")
    lines.append(f"Date: {http_date()}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    header = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return header if head else header + body


def _request(head: bytes) -> Request:
    """The request in a request head; raises ``HeadError`` for one Go refuses."""
    parsed = parse_head(head)
    target = parsed.target
    if target.startswith(("http://", "https://")):  # absolute form
        after = target.split("://", 1)[1]
        slash = after.find("/")
        target = after[slash:] if slash >= 0 else "/"
    path, _, query = target.split("#", 1)[0].partition("?")
    headers = {name.lower(): values[0] for name, values in parsed.headers.items()}
    return Request(parsed.method, path, query, headers, parsed.version == (1, 0))


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The request head (its empty line included); None when it is too large, b"" when
    the client left first."""
    buf = bytearray()
    while (end := head_end(buf)) < 0:
        if len(buf) > MAX_HEADER_BYTES + GO_HEADER_SLACK:
            return None
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            return b""
        buf += chunk
    return bytes(buf[:end])


async def _respond(routes: Mapping[str, Handler], head: bytes | None) -> bytes:
    if head is None:
        return error_response(TOO_LARGE)
    try:
        request = _request(head)
    except HeadError as exc:
        return error_response(exc.status)
    handler = routes.get(request.path)
    answer = handler(request) if handler else _not_found()
    if inspect.isawaitable(answer):
        answer = await answer
    status, ctype, body, extra = answer
    return _render(status, ctype, body, extra, head=request.method == "HEAD", http10=request.http10)


def _connection_handler(
    routes: Mapping[str, Handler],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(_read_head(reader), READ_HEADER_TIMEOUT)
            except TimeoutError:
                return
            if head == b"":
                return  # the client left before sending a whole request
            writer.write(await _respond(routes, head))
            await writer.drain()
        except (ConnectionError, OSError, RuntimeError) as exc:
            # RuntimeError: uvloop's "handler is closed" when the client reset first.
            log.debug("http connection failed: %s", exc)
        except Exception:
            log.exception("http handler failed")
        finally:
            writer.close()

    return handle


async def start_http(
    name: str, host: str, port: int, routes: Mapping[str, Handler]
) -> Listener | None:
    """Serve ``routes`` on ``host:port`` (empty host: every interface). A failure to listen
    is only logged, as upstream does, and gives ``None``."""
    loop = asyncio.get_running_loop()
    handler = _connection_handler(routes)

    def factory() -> asyncio.StreamReaderProtocol:
        # What asyncio.start_server makes per connection, accepted by our Listener.
        reader = asyncio.StreamReader(loop=loop)
        return asyncio.StreamReaderProtocol(reader, handler, loop=loop)

    try:
        return await listen_tcp(name, factory, host or None, port, backlog=HTTP_BACKLOG)
    except OSError as exc:
        log.error("%s server could not listen on %s:%d: %s", name, host, port, exc)
        return None
