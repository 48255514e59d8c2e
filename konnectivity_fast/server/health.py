"""The proxy-server's plain-HTTP endpoints (shared/reference/upstream-server.md §6).

A small asyncio HTTP/1.1 server, one request per connection (``Connection: close``):

- the health server (``--health-bind-address``:``--health-port``): ``/healthz``,
  ``/readyz`` and ``/ready`` (deprecated alias), ``/metrics``;
- the admin server (``--admin-bind-address``:``--admin-port``): ``/metrics``. pprof is
  Go-specific: its paths answer 404 here.

Paths are exact, any method is accepted (HEAD gets the headers only), the query string is
ignored. Request headers are bounded (1 MiB, 60 s, as upstream's ``ReadHeaderTimeout``);
a request body is not read.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
from collections.abc import Awaitable, Callable, Mapping

from konnectivity_fast.metrics import negotiate_content_type
from konnectivity_fast.metrics import server as server_metrics

__all__ = [
    "MAX_HEADER_BYTES",
    "NOT_READY_BODY",
    "READ_HEADER_TIMEOUT",
    "Response",
    "admin_routes",
    "health_routes",
    "start_http",
]

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 1 << 20
READ_HEADER_TIMEOUT = 60.0
TEXT_PLAIN = "text/plain; charset=utf-8"
NOT_READY_BODY = b"no connection to any proxy agent"

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 431:
            "Request Header Fields Too Large", 500: "Internal Server Error"}

# (status, content type, body, extra headers)
Response = tuple[int, str, bytes, tuple[tuple[str, str], ...]]
# A handler gets the request's headers (lower-case names).
Handler = Callable[[Mapping[str, str]], Response]

_NOSNIFF = (("X-Content-Type-Options", "nosniff"),)


def _not_found() -> Response:
    # Go's http.NotFound: http.Error's text, newline included.
    return 404, TEXT_PLAIN, b"404 page not found\n", _NOSNIFF


def _metrics(headers: Mapping[str, str]) -> Response:
    return 200, negotiate_content_type(headers.get("accept")), server_metrics.expose(), ()


def _healthz(headers: Mapping[str, str]) -> Response:
    return 200, TEXT_PLAIN, b"ok", ()


def health_routes(ready: Callable[[], bool]) -> dict[str, Handler]:
    """The health server's paths; ``ready()`` is the router's readiness (§4.6)."""

    def readyz(headers: Mapping[str, str]) -> Response:
        if ready():
            return 200, TEXT_PLAIN, b"ok", ()
        return 500, TEXT_PLAIN, NOT_READY_BODY, ()

    return {"/healthz": _healthz, "/readyz": readyz, "/ready": readyz, "/metrics": _metrics}


def admin_routes() -> dict[str, Handler]:
    """The admin server's paths (``/metrics``, kept for backward compatibility)."""
    return {"/metrics": _metrics}


def _render(status: int, content_type: str, body: bytes,
            extra: tuple[tuple[str, str], ...], head: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    lines.extend(f"{name}: {value}" for name, value in extra)
    lines.append(f"Content-Type: {content_type}")
    lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    header = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return header if head else header + body


def _parse(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """Method, path and headers of a request head, or ``None`` when malformed."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        return None
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1]:
        return None
    method, target = parts[0], parts[1]
    if target.startswith(("http://", "https://")):  # absolute form
        after = target.split("://", 1)[1]
        slash = after.find("/")
        target = after[slash:] if slash >= 0 else "/"
    path = target.split("?", 1)[0].split("#", 1)[0]
    headers: dict[str, str] = {}
    for line in header_lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.lower()] = value.strip()
    return method, path, headers


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return None
    except asyncio.IncompleteReadError:
        return b""


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
            if head is None:
                writer.write(_render(431, TEXT_PLAIN, b"431 Request Header Fields Too Large",
                                     (), False))
                return
            parsed = _parse(head[:-4])
            if parsed is None:
                writer.write(_render(400, TEXT_PLAIN, b"400 Bad Request", (), False))
                return
            method, path, headers = parsed
            handler = routes.get(path)
            status, ctype, body, extra = handler(headers) if handler else _not_found()
            writer.write(_render(status, ctype, body, extra, method == "HEAD"))
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
) -> asyncio.Server | None:
    """Serve ``routes`` on ``host:port`` (empty host: every interface). A failure to listen
    is only logged (§6) and gives ``None``."""
    try:
        return await asyncio.start_server(
            _connection_handler(routes), host or None, port, limit=MAX_HEADER_BYTES)
    except OSError as exc:
        log.error("failed to start %s server on %s:%d: %s", name, host, port, exc)
        return None
