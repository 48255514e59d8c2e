"""The agent's metrics of reaching every proxy-server (docs/high-availability.md).

Extension metrics: the ``konnectivity_fast_`` prefix, and registered only when the agent
has direct endpoints (``enable``), so a default ``/metrics`` stays upstream's. The one
exception is the sticky-balancer gauge: detection is always on, so the gauge is
registered (``enable_sticky``) the first time a sticky balancer is suspected, and a scrape
of an agent that never suspected one stays upstream's.
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.metrics.registry import CounterVec, Gauge, GaugeVec, Registry

__all__ = [
    "CONNECT_ATTEMPTS",
    "LB_STICKY_SUSPECTED",
    "MISSING_SERVERS",
    "SERVER_ENDPOINTS",
    "enable",
    "enable_sticky",
]

PREFIX = EXTENSION_PREFIX + "agent_"

# Values of the ``path`` and ``result`` labels.
PATH_LB = "lb"
PATH_DIRECT = "direct"
RESULT_NEW = "new"
RESULT_DUPLICATE = "duplicate"
RESULT_ERROR = "error"

SERVER_ENDPOINTS = GaugeVec(
    PREFIX + "server_endpoints",
    "Direct proxy-server endpoints this agent knows, by source (static, service, lease, header).",
    ("source",),
)
CONNECT_ATTEMPTS = CounterVec(
    PREFIX + "connect_attempts_total",
    "Connection attempts to proxy-servers, by path (lb: through --proxy-server-host; "
    "direct: to a server's own endpoint) and result (new server, duplicate, error).",
    ("path", "result"),
)
MISSING_SERVERS = Gauge(
    PREFIX + "missing_servers",
    "Proxy-servers this agent knows of but holds no connection to.",
)
LB_STICKY_SUSPECTED = Gauge(
    PREFIX + "lb_sticky_suspected",
    "1 while the load balancer at --proxy-server-host looks sticky or short: the agent "
    "is short of servers and its recent attempts through it all reached servers it "
    "already held.",
)


def enable(registry: Registry) -> None:
    """Show every metric here on ``registry`` (once per registry)."""
    for collector in (SERVER_ENDPOINTS, CONNECT_ATTEMPTS, MISSING_SERVERS):
        if not registry.registered(collector):
            registry.register(collector)
    enable_sticky(registry)


def enable_sticky(registry: Registry) -> None:
    if not registry.registered(LB_STICKY_SUSPECTED):
        registry.register(LB_STICKY_SUSPECTED)


def attempt(path: str, result: str) -> None:
    CONNECT_ATTEMPTS.labels(path, result).inc()
