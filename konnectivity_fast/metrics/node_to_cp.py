"""Metrics of node-to-control-plane tunneling on the proxy-server (node-to-cp.v1,
``--allowed-destination``; docs/node-to-control-plane.md).

Registered only when the feature is on (``enable``), so a default ``/metrics`` stays
upstream's; the objects exist either way, so the adapter updates them without asking.

- ``konnectivity_fast_server_agent_dials_total{result}``: agent-initiated dials by result:
  ``ok``, ``not_allowed`` (not on the allow-list), ``dial_error``, ``timeout``,
  ``canceled`` (the agent sent DIAL_CLS first), ``limit`` (the agent's cap was reached).
- ``konnectivity_fast_server_agent_dial_duration_seconds``: how long dials that were made
  took (ok, dial_error and timeout).
- ``konnectivity_fast_server_agent_connections``: open agent-initiated connections.
- ``konnectivity_fast_server_agent_bytes_total{direction}``: payload bytes,
  ``to_destination`` (from the agent) and ``from_destination`` (to the agent).
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.metrics.registry import CounterVec, Gauge, Histogram, Registry

__all__ = [
    "AGENT_BYTES",
    "AGENT_CONNECTIONS",
    "AGENT_DIALS",
    "AGENT_DIAL_DURATION",
    "DIAL_RESULTS",
    "FROM_DESTINATION",
    "TO_DESTINATION",
    "enable",
]

PREFIX = EXTENSION_PREFIX + "server_agent_"

DIAL_RESULTS = ("ok", "not_allowed", "dial_error", "timeout", "canceled", "limit")
TO_DESTINATION = "to_destination"
FROM_DESTINATION = "from_destination"
# Dials to a control-plane address: a local one takes well under a millisecond, a remote
# one a round trip; the top bucket is above the default --agent-initiated-dial-timeout.
_DIAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

AGENT_DIALS = CounterVec(
    PREFIX + "dials_total",
    "Agent-initiated dials (node-to-cp.v1) by result: ok, not_allowed, dial_error, "
    "timeout, canceled, limit.",
    ["result"],
)
AGENT_DIAL_DURATION = Histogram(
    PREFIX + "dial_duration_seconds",
    "Latency of agent-initiated dials that were attempted, in seconds.",
    buckets=_DIAL_BUCKETS,
)
AGENT_CONNECTIONS = Gauge(
    PREFIX + "connections",
    "Open agent-initiated connections.",
)
AGENT_BYTES = CounterVec(
    PREFIX + "bytes_total",
    "Payload bytes of agent-initiated connections, by direction (to_destination, "
    "from_destination).",
    ["direction"],
)


def enable(registry: Registry) -> None:
    """Show these metrics on ``registry`` (once per registry), every series from 0."""
    for collector in (AGENT_DIALS, AGENT_DIAL_DURATION, AGENT_CONNECTIONS, AGENT_BYTES):
        if not registry.registered(collector):
            registry.register(collector)
    for result in DIAL_RESULTS:
        AGENT_DIALS.labels(result).add(0)
    for direction in (TO_DESTINATION, FROM_DESTINATION):
        AGENT_BYTES.labels(direction).add(0)
