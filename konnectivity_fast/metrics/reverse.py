"""Metrics of the agent's half of node-to-control-plane tunneling (``node-to-cp.v1``,
docs/node-to-control-plane.md).

Registered only when the feature is active (``enable``), so a default ``/metrics`` stays
upstream's; the objects exist either way, so the data path updates them without asking.
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.metrics.registry import CounterVec, Gauge, GaugeVec, HistogramVec, Registry

__all__ = [
    "CAPABLE_SERVERS",
    "LOCAL_CONNECTIONS",
    "LOCAL_CONNECTIONS_TOTAL",
    "LOCAL_DIAL_DURATION",
    "RESULTS",
    "enable",
]

PREFIX = EXTENSION_PREFIX + "agent_"

#: ``result`` values: carried; no capable server; the server refused (allow-list or cap);
#: no answer within --apiserver-port-mapping-dial-timeout; anything else (dial failure
#: after the retry, stream lost, the client left while pending).
OK = "ok"
NO_SERVER = "no_server"
REJECTED = "rejected"
TIMEOUT = "timeout"
ERROR = "error"
RESULTS = (OK, NO_SERVER, REJECTED, TIMEOUT, ERROR)
# A local connection's set-up is a server's dial of a nearby API server: milliseconds,
# up to the dial timeout (10 s by default).
DIAL_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.5, 2.5, 10)

LOCAL_CONNECTIONS_TOTAL = CounterVec(
    PREFIX + "local_connections_total",
    "Connections accepted on --apiserver-port-mapping listeners, by local port and result.",
    ["local_port", "result"],
)
LOCAL_CONNECTIONS = GaugeVec(
    PREFIX + "local_connections",
    "Open node-to-control-plane connections, by local port.",
    ["local_port"],
)
LOCAL_DIAL_DURATION = HistogramVec(
    PREFIX + "local_dial_duration_seconds",
    "Seconds from accepting a local connection to the server's successful DIAL_RSP.",
    ["local_port"],
    buckets=DIAL_BUCKETS,
)
CAPABLE_SERVERS = Gauge(
    PREFIX + "capable_servers",
    "Server streams that negotiated node-to-cp.v1 and are not draining.",
)


def enable(registry: Registry) -> None:
    """Show these metrics on ``registry`` (once per registry)."""
    for collector in (LOCAL_CONNECTIONS_TOTAL, LOCAL_CONNECTIONS, LOCAL_DIAL_DURATION):
        if not registry.registered(collector):
            registry.register(collector)
    if not registry.registered(CAPABLE_SERVERS):
        registry.register(CAPABLE_SERVERS)
