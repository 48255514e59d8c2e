"""The proxy-agent's plain-HTTP endpoints (upstream's cmd/agent/app/server.go
``runHealthServer`` and ``runAdminServer``).

Routes for ``transport.http``'s small HTTP/1.1 server:

- health (``--health-server-host``:``--health-server-port``, 8093): ``/healthz`` (always
  ``ok``, up before any server is reached), ``/readyz`` and the deprecated ``/ready`` (the
  ``ping`` and ``server-connected`` checks, upstream's bodies, ``?verbose``), ``/metrics``;
- admin (``--admin-bind-address``:``--admin-server-port``, 8094): ``/metrics`` answers
  ``301`` to the same path and query on the health port of the host the client used; ours
  beyond upstream, the tunnel listing (``ADMIN_TUNNELS_PATH``, ``tunnel_list``), only on
  this port. The pprof paths are Go's; they answer 404 here.

A failure to listen is only logged, as upstream does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.metrics import negotiate_content_type
from konnectivity_fast.transport.http import (
    MAX_HEADER_BYTES,
    NOSNIFF,
    READ_HEADER_TIMEOUT,
    TEXT_PLAIN,
    Handler,
    Request,
    Response,
    start_http,
)
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH

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

TEXT_HTML = "text/html; charset=utf-8"
NOT_READY_BODY = b"[+]ping ok\n[-]server-connected failed: no servers connected\n"
READY_VERBOSE_BODY = b"[+]ping ok\n[+]server-connected ok\ncheck passed\n"
# html.escape's table, without importing html (RSS, see transport.http).
_HTML_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&#34;", "'": "&#39;"})


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
            return 503, TEXT_PLAIN, NOT_READY_BODY, NOSNIFF
        if _has_verbose(request.query):
            return 200, TEXT_PLAIN, READY_VERBOSE_BODY, ()
        return 200, TEXT_PLAIN, b"ok", ()

    return {"/healthz": _healthz, "/readyz": readyz, "/ready": readyz, "/metrics": _metrics}


def admin_routes(health_port: int, tunnels: Handler | None = None) -> dict[str, Handler]:
    """The admin server's paths: ``/metrics`` moved to the health port, and, given its
    handler, the tunnel listing."""

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

    routes: dict[str, Handler] = {"/metrics": redirect}
    if tunnels is not None:
        routes[ADMIN_TUNNELS_PATH] = tunnels
    return routes
