"""The proxy-agent's metrics: upstream v0.36.0's names, types, label names, HELP texts and
buckets (pkg/agent/metrics/metrics.go ``newAgentMetrics``, and konnectivity-client's
pkg/common/metrics for the stream families), on ``REGISTRY`` with the process metrics.

``known_server_count`` is a plain gauge and ``open_server_connections`` is set to 0 at import,
so both show at 0 from the first scrape (tests and dashboards read the latter as "connected
servers"); every other vector shows with its first update. The helpers are named after the
events that move the metrics; ``tests/data/metrics/proxy-agent.txt`` is the golden list of the
definitions.
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import (
    EXTENSION_PREFIX,
    PACKET_TYPE_UNKNOWN,
    SEGMENT_FROM_AGENT,
    SEGMENT_TO_AGENT,
    PacketCounters,
    grpc_code_name,
    packet_type_name,
    stream_errors,
    stream_packets,
)
from konnectivity_fast.metrics.process import ProcessCollector
from konnectivity_fast.metrics.registry import CounterVec, Gauge, GaugeVec, HistogramVec, Registry

__all__ = ["REGISTRY", "SEGMENT_FROM_AGENT", "SEGMENT_TO_AGENT"]

PREFIX = "konnectivity_network_proxy_agent_"

# endpoint_dial_failure_total reasons.
DIAL_FAILURE_TIMEOUT = "timeout"
DIAL_FAILURE_UNKNOWN = "unknown"

# server_connection_failure_count directions.
DIRECTION_TO_SERVER = "to_server"
DIRECTION_FROM_SERVER = "from_server"

# Buckets, in seconds: 5 ms to 30 s.
LATENCY_BUCKETS = (0.005, 0.025, 0.1, 0.5, 2.5, 10, 30)

REGISTRY = Registry()
PROCESS = REGISTRY.register(ProcessCollector())

DIAL_DURATION = HistogramVec(
    PREFIX + "dial_duration_seconds",
    "Latency of dial to the remote endpoint in seconds",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
SERVER_CONNECTION_FAILURES = CounterVec(
    PREFIX + "server_connection_failure_count",
    "Count of failures to send to or receive from the proxy server, labeled by the direction "
    "(from_server or to_server). DEPRECATED, please use stream_events_error_total",
    ("direction",),
    registry=REGISTRY,
)
ENDPOINT_DIAL_FAILURES = CounterVec(
    PREFIX + "endpoint_dial_failure_total",
    "Number of failures dialing the remote endpoint, by reason (example: timeout).",
    ("reason",),
    registry=REGISTRY,
)
OPEN_SERVER_CONNECTIONS = GaugeVec(
    PREFIX + "open_server_connections",
    "Current number of open server connections.",
    registry=REGISTRY,
)
KNOWN_SERVER_COUNT = Gauge(
    PREFIX + "known_server_count",
    "Current number of servers agent is trying to connect to.",
    registry=REGISTRY,
)
OPEN_ENDPOINT_CONNECTIONS = GaugeVec(
    PREFIX + "open_endpoint_connections",
    "Current number of open endpoint connections.",
    registry=REGISTRY,
)
STREAM_PACKETS = stream_packets(PREFIX, REGISTRY)
STREAM_ERRORS = stream_errors(PREFIX, REGISTRY)
LEASE_LISTS = CounterVec(
    PREFIX + "lease_lists_total",
    "Count of server lease list calls made by the agent to the k8s apiserver, "
    "labeled by HTTP response code and reason",
    ("http_response_code", "reason"),
    registry=REGISTRY,
)
LEASE_WATCHES = CounterVec(
    PREFIX + "lease_watches_total",
    "Count of server lease watch calls made by the agent to the k8s apiserver, "
    "labeled by HTTP response code and reason",
    ("http_response_code", "reason"),
    registry=REGISTRY,
)
LEASE_LIST_LATENCY = HistogramVec(
    PREFIX + "lease_list_latency_seconds",
    "Latency of server lease listing in seconds",
    ("http_response_code",),
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)

_packets = PacketCounters(STREAM_PACKETS)


def _initial() -> None:
    OPEN_SERVER_CONNECTIONS.labels().set(0)


_initial()


# --- events -----------------------------------------------------------------------------------


def observe_dial_latency(seconds: float) -> None:
    """An endpoint dial succeeded after ``seconds``."""
    DIAL_DURATION.labels().observe(seconds)


def observe_dial_failure(reason: str) -> None:
    ENDPOINT_DIAL_FAILURES.labels(reason).inc()


def observe_server_failure_deprecated(direction: str) -> None:
    """A send to (or receive from) the server failed other than at end of stream."""
    SERVER_CONNECTION_FAILURES.labels(direction).inc()


def set_server_connections_count(count: int) -> None:
    OPEN_SERVER_CONNECTIONS.labels().set(count)


def set_server_count(count: int) -> None:
    KNOWN_SERVER_COUNT.set(count)


def endpoint_connection_opened() -> None:
    OPEN_ENDPOINT_CONNECTIONS.labels().inc()


def endpoint_connection_closed() -> None:
    OPEN_ENDPOINT_CONNECTIONS.labels().dec()


def observe_packet(segment: str, packet_type: int) -> None:
    """A packet received (to_agent) or about to be sent (from_agent)."""
    _packets.inc(segment, packet_type)


def observe_stream_error(segment: str, code: int, packet_type: int) -> None:
    STREAM_ERRORS.labels(segment, grpc_code_name(code), packet_type_name(packet_type)).inc()


def observe_stream_error_no_packet(segment: str, code: int) -> None:
    STREAM_ERRORS.labels(segment, grpc_code_name(code), PACKET_TYPE_UNKNOWN).inc()


def observe_lease_list(http_code: int, reason: str) -> None:
    """A lease list call (and, as upstream does, a lease watch call)."""
    LEASE_LISTS.labels(str(http_code), reason).inc()


def observe_lease_list_latency(http_code: int, seconds: float) -> None:
    LEASE_LIST_LATENCY.labels(str(http_code)).observe(seconds)


def observe_lease_watch(http_code: int, reason: str) -> None:
    LEASE_WATCHES.labels(str(http_code), reason).inc()


def reset() -> None:
    """Back to the state right after import (for tests): extension families, which
    features register when they start, are unregistered too."""
    for collector in list(REGISTRY.collectors()):
        if str(getattr(collector, "name", "")).startswith(EXTENSION_PREFIX):
            REGISTRY.unregister(collector)
        elif isinstance(collector, (Gauge, CounterVec, GaugeVec, HistogramVec)):
            collector.reset()
    _packets.clear()
    _initial()


def expose() -> bytes:
    return REGISTRY.expose()
