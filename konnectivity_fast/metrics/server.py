"""The proxy-server's metrics: upstream v0.36.0's names, types, label names, HELP texts and
buckets (pkg/server/metrics/metrics.go ``newServerMetrics``, and konnectivity-client's
pkg/common/metrics for the stream families), on ``REGISTRY`` with the process metrics.

Which series show from start-up follows upstream: ``http_connections`` and
``culled_leases_count`` are plain metrics, shown at 0; ``ready_backend_connections`` and
``ready_backends{proxy_strategy}`` show at 0 once ``startup()`` has run; everything else is a
vector that shows with its first update. The helpers are named after the events that move
the metrics; ``tests/data/metrics/proxy-server.txt`` is the golden list of the definitions.
"""

from __future__ import annotations

from collections.abc import Iterable

from konnectivity_fast.metrics._common import (
    PACKET_TYPE_UNKNOWN,
    SEGMENT_FROM_AGENT,
    SEGMENT_FROM_CLIENT,
    SEGMENT_TO_AGENT,
    SEGMENT_TO_CLIENT,
    PacketCounters,
    grpc_code_name,
    packet_type_name,
    stream_errors,
    stream_packets,
)
from konnectivity_fast.metrics.process import ProcessCollector
from konnectivity_fast.metrics.registry import (
    Counter,
    CounterVec,
    Gauge,
    GaugeChild,
    GaugeVec,
    HistogramVec,
    Registry,
)

__all__ = [
    "CONNECT",
    "PROXY",
    "REGISTRY",
    "SEGMENT_FROM_AGENT",
    "SEGMENT_FROM_CLIENT",
    "SEGMENT_TO_AGENT",
    "SEGMENT_TO_CLIENT",
]

PREFIX = "konnectivity_network_proxy_server_"

# service_method label values: the gRPC method that carries the stream.
PROXY = "Proxy"  # frontends (ProxyService)
CONNECT = "Connect"  # agents (AgentService)

# dial_failure_count reasons.
DIAL_FAILURE_NO_AGENT = "no_agent"
DIAL_FAILURE_ERROR_RESPONSE = "error_response"
DIAL_FAILURE_UNRECOGNIZED_RESPONSE = "unrecognized_response"
DIAL_FAILURE_SEND_RESPONSE = "send_rsp"
DIAL_FAILURE_BACKEND_CLOSE = "backend_close"
DIAL_FAILURE_BACKEND_DIAL_TIMEOUT = "backend_dial_timeout"
DIAL_FAILURE_FRONTEND_CLOSE = "frontend_close"

# Buckets, in seconds: 1 µs to 12.5 s for latencies; the lease histograms use the default
# buckets. (v0.36.0 has no connection-duration histogram: upstream added it later, so a
# scrape of ours matches a scrape of the binary we replace.)
LATENCY_BUCKETS = (0.000001, 0.00001, 0.0001, 0.005, 0.025, 0.1, 0.5, 2.5, 12.5)

REGISTRY = Registry()
PROCESS = REGISTRY.register(ProcessCollector())

DIAL_DURATION = HistogramVec(
    PREFIX + "dial_duration_seconds",
    "Latency of dial to the remote endpoint in seconds",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
FRONTEND_WRITE_DURATION = HistogramVec(
    PREFIX + "frontend_write_duration_seconds",
    "Latency of write to the frontend in seconds",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
GRPC_CONNECTIONS = GaugeVec(
    PREFIX + "grpc_connections",
    "Number of current grpc connections, partitioned by service method.",
    ("service_method",),
    registry=REGISTRY,
)
HTTP_CONNECTIONS = Gauge(
    PREFIX + "http_connections", "Number of current HTTP CONNECT connections", registry=REGISTRY
)
READY_BACKEND_CONNECTIONS = GaugeVec(
    PREFIX + "ready_backend_connections",
    "Number of konnectivity agent connected to the proxy server. "
    "DEPRECATED, please use ready_backends",
    registry=REGISTRY,
)
READY_BACKENDS = GaugeVec(
    PREFIX + "ready_backends",
    "Number of konnectivity agent connected to the proxy server",
    ("proxy_strategy",),
    registry=REGISTRY,
)
PENDING_BACKEND_DIALS = GaugeVec(
    PREFIX + "pending_backend_dials",
    "Current number of pending backend dial requests",
    registry=REGISTRY,
)
ESTABLISHED_CONNECTIONS = GaugeVec(
    PREFIX + "established_connections",
    "Current number of established end-to-end connections (post-dial).",
    registry=REGISTRY,
)
FULL_RECEIVE_CHANNELS = GaugeVec(
    PREFIX + "full_receive_channels",
    "Number of current connections blocked by a full receive channel, "
    "partitioned by service method.",
    ("service_method",),
    registry=REGISTRY,
)
DIAL_FAILURES = CounterVec(
    PREFIX + "dial_failure_count",
    "Number of dial failures observed. Multiple failures can occur for a single dial request.",
    ("reason",),
    registry=REGISTRY,
)
STREAM_PACKETS = stream_packets(PREFIX, REGISTRY)
STREAM_ERRORS = stream_errors(PREFIX, REGISTRY)
CULLED_LEASES = Counter(
    PREFIX + "culled_leases_count",
    "Count of expired leases that the lease garbage collection controller has culled.",
    registry=REGISTRY,
)
LEASE_DELETE_LATENCY = HistogramVec(
    PREFIX + "lease_delete_latency_seconds",
    "Latency of lease deletion calls by the garbage collection controller in seconds.",
    ("http_status_code",),
    registry=REGISTRY,
)
# "delection" and the list counter's "deletion" are upstream's words.
LEASE_DELETES = CounterVec(
    PREFIX + "lease_delete_total",
    "Count of lease delection calls by the garbage collection controller. "
    "Labeled by HTTP status code and reason.",
    ("http_status_code", "reason"),
    registry=REGISTRY,
)
LEASE_LIST_LATENCY = HistogramVec(
    PREFIX + "lease_list_latency_seconds",
    "Latency of lease list calls by the garbage collection controller in seconds.",
    ("http_status_code",),
    registry=REGISTRY,
)
LEASE_LISTS = CounterVec(
    PREFIX + "lease_list_total",
    "Count of lease deletion calls by the garbage collection controller. "
    "Labeled by HTTP status code and reason.",
    ("http_status_code", "reason"),
    registry=REGISTRY,
)

_packets = PacketCounters(STREAM_PACKETS)


# --- events -----------------------------------------------------------------------------------


def startup(proxy_strategies: Iterable[str]) -> None:
    """At start-up: the deprecated backend count and each configured strategy's count at 0."""
    READY_BACKEND_CONNECTIONS.labels().set(0)
    for strategy in proxy_strategies:
        READY_BACKENDS.labels(strategy).set(0)


def observe_dial_latency(seconds: float) -> None:
    """A DIAL_RSP made a connection established; ``seconds`` since the pending dial began."""
    DIAL_DURATION.labels().observe(seconds)


def observe_frontend_write_latency(seconds: float) -> None:
    FRONTEND_WRITE_DURATION.labels().observe(seconds)


def grpc_connection_opened(service_method: str) -> None:
    GRPC_CONNECTIONS.labels(service_method).inc()


def grpc_connection_closed(service_method: str) -> None:
    GRPC_CONNECTIONS.labels(service_method).dec()


def http_connection_opened() -> None:
    HTTP_CONNECTIONS.inc()


def http_connection_closed() -> None:
    HTTP_CONNECTIONS.dec()


def set_backend_count_deprecated(count: int) -> None:
    READY_BACKEND_CONNECTIONS.labels().set(count)


def set_ready_backends(proxy_strategy: str, count: int) -> None:
    READY_BACKENDS.labels(proxy_strategy).set(count)


def set_pending_dial_count(count: int) -> None:
    PENDING_BACKEND_DIALS.labels().set(count)


def set_established_connection_count(count: int) -> None:
    ESTABLISHED_CONNECTIONS.labels().set(count)


def full_receive_channel(service_method: str) -> GaugeChild:
    """The gauge a stream reader raises while blocked on a full receive queue."""
    return FULL_RECEIVE_CHANNELS.labels(service_method)


def observe_dial_failure(reason: str) -> None:
    DIAL_FAILURES.labels(reason).inc()


def observe_packet(segment: str, packet_type: int) -> None:
    """A packet received (from_client, from_agent) or about to be sent (to_client, to_agent)."""
    _packets.inc(segment, packet_type)


def observe_stream_error(segment: str, code: int, packet_type: int) -> None:
    """A send failed with gRPC status ``code``."""
    STREAM_ERRORS.labels(segment, grpc_code_name(code), packet_type_name(packet_type)).inc()


def observe_stream_error_no_packet(segment: str, code: int) -> None:
    """A receive failed (other than at end of stream)."""
    STREAM_ERRORS.labels(segment, grpc_code_name(code), PACKET_TYPE_UNKNOWN).inc()


def culled_lease() -> None:
    CULLED_LEASES.inc()


def observe_lease_delete(http_code: int, reason: str) -> None:
    """A lease GC delete call: 200 and reason "" on success, else the API status's."""
    LEASE_DELETES.labels(str(http_code), reason).inc()


def observe_lease_delete_latency(http_code: int, seconds: float) -> None:
    LEASE_DELETE_LATENCY.labels(str(http_code)).observe(seconds)


def observe_lease_list(http_code: int, reason: str) -> None:
    """A lease GC list call: 200 and reason "" on success, else the API status's."""
    LEASE_LISTS.labels(str(http_code), reason).inc()


def observe_lease_list_latency(http_code: int, seconds: float) -> None:
    LEASE_LIST_LATENCY.labels(str(http_code)).observe(seconds)


def reset() -> None:
    """Back to the state right after import (for tests)."""
    for collector in REGISTRY.collectors():
        if isinstance(collector, (Counter, Gauge, CounterVec, GaugeVec, HistogramVec)):
            collector.reset()
    _packets.clear()


def expose() -> bytes:
    return REGISTRY.expose()
