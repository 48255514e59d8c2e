"""The proxy-server's plain-HTTP endpoints (upstream's cmd/server/app/server.go
runHealthServer and runAdminServer).

Routes for ``transport.http``'s small HTTP/1.1 server:

- the health server (``--health-bind-address``:``--health-port``): ``/healthz``,
  ``/readyz`` and ``/ready`` (deprecated alias), ``/metrics``;
- the admin server (``--admin-bind-address``:``--admin-port``): ``/metrics``, and ours
  beyond upstream, the tunnel listing (``ADMIN_TUNNELS_PATH``, ``tunnel_list``): only
  here, never on the health, agent or frontend ports. pprof is Go-specific: its paths
  answer 404 here.

Paths are exact, any method is accepted (HEAD gets the headers only), the query string is
ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from konnectivity_fast.metrics import negotiate_content_type
from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.transport.http import (
    MAX_HEADER_BYTES,
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
    "Response",
    "admin_routes",
    "health_routes",
    "start_http",
]

NOT_READY_BODY = b"no connection to any proxy agent"


def _metrics(request: Request) -> Response:
    content_type = negotiate_content_type(request.headers.get("accept"))
    return 200, content_type, server_metrics.expose(), ()


def _healthz(request: Request) -> Response:
    return 200, TEXT_PLAIN, b"ok", ()


def health_routes(ready: Callable[[], bool]) -> dict[str, Handler]:
    """The health server's paths; ``ready()`` is the router's readiness (the first
    strategy's manager holds an agent: pkg/server/readiness_manager.go Ready)."""

    def readyz(request: Request) -> Response:
        if ready():
            return 200, TEXT_PLAIN, b"ok", ()
        return 500, TEXT_PLAIN, NOT_READY_BODY, ()

    return {"/healthz": _healthz, "/readyz": readyz, "/ready": readyz, "/metrics": _metrics}


def admin_routes(tunnels: Handler | None = None) -> dict[str, Handler]:
    """The admin server's paths: ``/metrics`` (kept for backward compatibility) and, given
    its handler, the tunnel listing."""
    routes: dict[str, Handler] = {"/metrics": _metrics}
    if tunnels is not None:
        routes[ADMIN_TUNNELS_PATH] = tunnels
    return routes
