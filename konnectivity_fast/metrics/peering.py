"""Metrics of server peering (``--enable-peer-forwarding``; docs/high-availability.md).

Registered only when peering is on (``enable``), so a default ``/metrics`` stays
upstream's; the objects exist either way, so the adapter updates them without asking.

- ``konnectivity_fast_server_peer_dials_total{result}``: dials this server offered to a
  peer, one count per peer asked: ``ok`` (the peer had an agent and answered the dial, the
  agent's dial error included), ``no_agent`` (it had none either: the next peer is asked),
  ``error`` (unreachable, refused by TLS, or its stream failed before answering).
- ``konnectivity_fast_server_peer_streams{role}``: open peer streams: ``forwarding`` (opened
  by this server toward a peer) and ``forwarded`` (opened by a peer on this server's peer
  listener). Both go back to 0 when the tunnels they carry close.
"""

from __future__ import annotations

from konnectivity_fast.metrics._common import EXTENSION_PREFIX
from konnectivity_fast.metrics.registry import CounterVec, GaugeVec, Registry

__all__ = [
    "DIAL_ERROR",
    "DIAL_NO_AGENT",
    "DIAL_OK",
    "FORWARDED",
    "FORWARDING",
    "PEER_DIALS",
    "PEER_STREAMS",
    "enable",
]

PREFIX = EXTENSION_PREFIX + "server_peer_"

DIAL_OK = "ok"
DIAL_NO_AGENT = "no_agent"
DIAL_ERROR = "error"
FORWARDING = "forwarding"
FORWARDED = "forwarded"

PEER_DIALS = CounterVec(
    PREFIX + "dials_total",
    "Dials offered to peer servers because no agent here could take them, one per peer "
    "asked, by result (ok: the peer answered with its agent; no_agent: it had none either; "
    "error: unreachable or failed).",
    ["result"],
)
PEER_STREAMS = GaugeVec(
    PREFIX + "streams",
    "Open peer-forwarded streams, by role (forwarding: opened by this server toward a "
    "peer; forwarded: opened by a peer on this server).",
    ["role"],
)


def enable(registry: Registry) -> None:
    """Show these metrics on ``registry`` (once per registry), every series from 0."""
    for collector in (PEER_DIALS, PEER_STREAMS):
        if not registry.registered(collector):
            registry.register(collector)
    for result in (DIAL_OK, DIAL_NO_AGENT, DIAL_ERROR):
        PEER_DIALS.labels(result).add(0)
    for role in (FORWARDING, FORWARDED):
        PEER_STREAMS.labels(role).add(0)


def dialled(result: str) -> None:
    PEER_DIALS.labels(result).inc()


def stream_opened(role: str) -> None:
    PEER_STREAMS.labels(role).add(1)


def stream_closed(role: str) -> None:
    PEER_STREAMS.labels(role).add(-1)
