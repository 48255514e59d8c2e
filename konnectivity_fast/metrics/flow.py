"""Metrics of the ``flow.v1`` extension (per-tunnel credit), for both programs.

Extension metrics carry the ``konnectivity_fast_`` prefix and are registered only when
the program offers the extension (``enable``), so a default ``/metrics`` stays upstream's.
The objects exist either way, so the data path updates them without asking.
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.metrics.registry import Counter, CounterVec, Registry

__all__ = ["CREDIT_BYTES", "CREDIT_STALLS", "enable"]

PREFIX = EXTENSION_PREFIX + "flow_"

GRANTED = "granted"  # credit this program gave its peer (it may send us that much more)
RECEIVED = "received"  # credit the peer gave this program

CREDIT_BYTES = CounterVec(
    PREFIX + "credit_bytes_total",
    "Bytes of flow.v1 credit exchanged with peers, by direction (granted to the peer, or "
    "received from it).",
    ["direction"],
)
CREDIT_STALLS = Counter(
    PREFIX + "credit_stalls_total",
    "Times a tunnel spent its flow.v1 credit and its source was paused until the peer "
    "granted more (a slow reader on the other side).",
)
_GRANTED = CREDIT_BYTES.labels(GRANTED)
_RECEIVED = CREDIT_BYTES.labels(RECEIVED)


def enable(registry: Registry) -> None:
    """Show these metrics on ``registry`` (once per registry)."""
    for collector in (CREDIT_BYTES, CREDIT_STALLS):
        if not registry.registered(collector):
            registry.register(collector)


def granted(nbytes: int) -> None:
    _GRANTED.add(nbytes)


def received(nbytes: int) -> None:
    _RECEIVED.add(nbytes)


def stalled() -> None:
    CREDIT_STALLS.inc()
