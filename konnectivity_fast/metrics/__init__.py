"""Prometheus metrics: a small registry writing client_golang's text format, and the
proxy-server's and proxy-agent's metric sets (``metrics.server``, ``metrics.agent``).

No HTTP here: the server and agent adapters serve ``Registry.expose()`` on ``/metrics``.
This package imports only the standard library and itself.
"""

from konnectivity_fast.metrics.negotiate import TEXT_CONTENT_TYPE, negotiate_content_type
from konnectivity_fast.metrics.process import ProcessCollector
from konnectivity_fast.metrics.registry import (
    DEFAULT_BUCKETS,
    Collector,
    Counter,
    CounterChild,
    CounterVec,
    Gauge,
    GaugeChild,
    GaugeVec,
    Histogram,
    HistogramChild,
    HistogramVec,
    Registry,
    escape_help,
    escape_label_value,
    format_value,
)

__all__ = [
    "DEFAULT_BUCKETS",
    "TEXT_CONTENT_TYPE",
    "Collector",
    "Counter",
    "CounterChild",
    "CounterVec",
    "Gauge",
    "GaugeChild",
    "GaugeVec",
    "Histogram",
    "HistogramChild",
    "HistogramVec",
    "ProcessCollector",
    "Registry",
    "escape_help",
    "escape_label_value",
    "format_value",
    "negotiate_content_type",
]
