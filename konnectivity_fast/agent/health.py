"""The proxy-agent's plain-HTTP endpoints (shared/reference/upstream-agent-client.md §5).

A small asyncio HTTP/1.1 server, one request per connection (``Connection: close``):

- health (``--health-server-host``:``--health-server-port``, 8093): ``/healthz`` (always
  ``ok``, up before any server is reached), ``/readyz`` and the deprecated ``/ready`` (the
  ``ping`` and ``server-connected`` checks, upstream's bodies, ``?verbose``), ``/metrics``;
- admin (``--admin-bind-address``:``--admin-server-port``, 8094): ``/metrics`` answers
  ``301`` to the same path and query on the health port of the host the client used. The
  pprof paths are Go's; they answer 404 here.

Paths are exact, any method is accepted (HEAD gets the headers only). Request heads are
bounded (1 MiB, 60 s, as upstream's servers); a request body is not read. A failure to
listen is only logged, as upstream does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.metrics import negotiate_content_type

__all__ = [
    "MAX_HEADER_BYTES",
    "NOT_READY_BODY",
    "READ_HEADER_TIMEOUT",
    "Request",
    "Response",
    "admin_routes",
    "health_routes",
    "start_http",
]

log = logging.getLogger(__name__)

#: Go's http.Server limits that upstream sets: header bytes and time to read them.
MAX_HEADER_BYTES = 1 << 20
READ_HEADER_TIMEOUT = 60.0
TEXT_PLAIN = "text/plain; charset=utf-8"
TEXT_HTML = "text/html; charset=utf-8"
NOT_READY_BODY = b"[+]ping ok\n[-]server-connected failed: no servers connected\n"
READY_VERBOSE_BODY = b"[+]ping ok\n[+]server-connected ok\ncheck passed\n"

_REASONS = {
    200: "OK",
    301: "Moved Permanently",
    400: "Bad Request",
    404: "Not Found",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str  # raw, without '?'; empty when absent
    headers: Mapping[str, str]  # lower-case names


# (status, content type, body, extra headers)
Response = tuple[int, str, bytes, tuple[tuple[str, str], ...]]
Handler = Callable[[Request], Response]

_NOSNIFF = (("X-Content-Type-Options", "nosniff"),)
# RFC 9110 dates by hand: email.utils and html cost ~1.2 MiB of RSS, and the agent runs
# under 30 MiB limits.
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"})


def _http_date(now: float | None = None) -> str:
    t = time.gmtime(now)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT"
    )


def _not_found() -> Response:
    return 404, TEXT_PLAIN, b"404 page not found\n", _NOSNIFF


def _metrics(request: Request) -> Response:
    content_type = negotiate_content_type(request.headers.get("accept"))
    return 200, content_type, agent_metrics.expose(), ()


def _healthz(request: Request) -> Response:
    return 200, TEXT_PLAIN, b"ok", ()


def _has_verbose(query: str) -> bool:
    return any(part.split("=", 1)[0] == "verbose" for part in query.split("&"))


def health_routes(ready: Callable[[], bool]) -> dict[str, Handler]:
    """The health server's paths; ``ready()``: at least one server connection is usable."""

    def readyz(request: Request) -> Response:
        if not ready():
            log.info("readiness check failed: no servers connected")
            return 503, TEXT_PLAIN, NOT_READY_BODY, _NOSNIFF
        if _has_verbose(request.query):
            return 200, TEXT_PLAIN, READY_VERBOSE_BODY, ()
        return 200, TEXT_PLAIN, b"ok", ()

    return {"/healthz": _healthz, "/readyz": readyz, "/ready": readyz, "/metrics": _metrics}


def admin_routes(health_port: int) -> dict[str, Handler]:
    """The admin server's paths: ``/metrics`` moved to the health port."""

    def redirect(request: Request) -> Response:
        host = request.headers.get("host", "")
        if host.startswith("["):  # [v6]:port
            end = host.find("]")
            host = host[: end + 1] if end >= 0 else host
        elif host.count(":") == 1:
            host = host.split(":", 1)[0]
        target = f"//{host}:{health_port}{request.path}"
        if request.query:
            target += "?" + request.query
        body = b""
        if request.method in ("GET", "HEAD"):  # Go's http.Redirect adds a short note
            href = target.translate(_HTML_ESCAPES)
            body = f'<a href="{href}">Moved Permanently</a>.\n\n'.encode()
        return 301, TEXT_HTML, body, (("Location", target),)

    return {"/metrics": redirect}


def _render(
    status: int,
    content_type: str,
    body: bytes,
    extra: tuple[tuple[str, str], ...],
    head: bool,
) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in extra)
    lines.append(f"Content-Type: {content_type}")
    lines.append(f"Date: {_http_date()}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    header = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return header if head else header + body


def _parse(head: bytes) -> Request | None:
    """The request in a request head, or ``None`` when malformed."""
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
        return None
    method, target = parts[0], parts[1]
    if target.startswith(("http://", "https://")):  # absolute form
        after = target.split("://", 1)[1]
        slash = after.find("/")
        target = after[slash:] if slash >= 0 else "/"
    target = target.split("#", 1)[0]
    path, _, query = target.partition("?")
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return Request(method, path, query, headers)


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return None
    except asyncio.IncompleteReadError:
        return b""


def _respond(routes: Mapping[str, Handler], head: bytes | None) -> bytes:
    if head is None:
        return _render(431, TEXT_PLAIN, b"431 Request Header Fields Too Large", (), False)
    request = _parse(head[:-4])
    if request is None:
        return _render(400, TEXT_PLAIN, b"400 Bad Request", (), False)
    handler = routes.get(request.path)
    status, ctype, body, extra = handler(request) if handler else _not_found()
    return _render(status, ctype, body, extra, request.method == "HEAD")


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
            writer.write(_respond(routes, head))
            await writer.drain()
        except (ConnectionError, OSError) as exc:
            log.debug("http connection failed: %s", exc)
        except Exception:
            log.exception("http handler failed")
        finally:
            writer.close()

    return handle


async def start_http(
    name: str, host: str, port: int, routes: Mapping[str, Handler]
) -> asyncio.Server | None:
    """Serve ``routes`` on ``host:port`` (empty host: every interface). A failure to listen
    is only logged (upstream: "<name> server could not listen") and gives ``None``."""
    try:
        return await asyncio.start_server(
            _connection_handler(routes), host or None, port, limit=MAX_HEADER_BYTES
        )
    except OSError as exc:
        log.error("%s server could not listen on %s:%d: %s", name, host, port, exc)
        return None
