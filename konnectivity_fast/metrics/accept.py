"""The count of accepts that failed for lack of resources, for both programs.

When a listener cannot accept for want of file descriptors or kernel memory it waits and
tries again, leaving the connections in the backlog (``transport/accept.py``), and logs
it at a bounded rate; this counter says how often it happened, by listener and error, so
that an alert need not read logs. Upstream has no such metric (Go only logs), so the
family carries our prefix. It is a vector: nothing is shown until the first failure, so a
scrape of a process that never ran out stays upstream's (tests/data/metrics/).
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.metrics.registry import CounterVec, Registry

__all__ = ["ACCEPT_EXHAUSTED", "enable", "exhausted"]

ACCEPT_EXHAUSTED = CounterVec(
    EXTENSION_PREFIX + "accept_exhausted_total",
    "Accept calls that failed for lack of resources (file descriptors or kernel memory), "
    "by listener and error; the listener waits and retries, connections wait in the "
    "backlog.",
    ("listener", "error"),
)


def enable(registry: Registry) -> None:
    """Show the counter on ``registry`` once it counts something (once per registry)."""
    if not registry.registered(ACCEPT_EXHAUSTED):
        registry.register(ACCEPT_EXHAUSTED)


def exhausted(listener: str, error: str) -> None:
    """One failed accept on ``listener`` (its name) with ``error`` (``EMFILE``...)."""
    ACCEPT_EXHAUSTED.labels(listener, error).inc()
