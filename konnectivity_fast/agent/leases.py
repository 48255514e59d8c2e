"""Counting proxy-servers by their Leases (``--count-server-leases``,
upstream's pkg/agent/lease_counter.go).

``LeaseCounter`` keeps a cache of the ``coordination.k8s.io/v1`` Leases in the lease
namespace that match the label selector, as upstream's informer does (``agent.informer``:
list, then watch; failures retried, the last Leases seen kept, so an unreachable API
server leaves the last count in force; ``start()`` returns once synced). ``count()`` is
evaluated on every call against the wall clock: a Lease is valid while
``(renewTime or acquireTime) + leaseDurationSeconds`` is after now, so a Lease that stops
being renewed drops out of the count without any event. A count of 0 is reported as 1.

The label selector text (``--lease-label``, Kubernetes selector syntax) is sent to the
API server, which filters both the list and the watch; upstream filters its cache with
the same selector, so the Leases counted are the same.

Metrics as upstream: each list feeds ``lease_lists_total`` and
``lease_list_latency_seconds``; each watch opened also feeds ``lease_lists_total`` (an
upstream bug: pkg/agent/metrics/metrics.go ``ObserveLeaseWatch`` increments the list
counter, so ``lease_watches_total`` never moves). A failure that is not an API status
(connection refused, TLS) feeds only the latency, labelled 200, as upstream.

``endpoints()`` (ours, ``--server-discovery=leases``): the agent endpoint each valid
Lease's holder published in the annotation ``wire.endpoints.AGENT_ENDPOINT_ANNOTATION``.

Only JSON is spoken: ``--kube-api-content-type`` is accepted and not used (our client has
no protobuf codec).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from konnectivity_fast.agent.informer import (
    LIST_RETRY_CAP,
    LIST_RETRY_INITIAL,
    TLS_CLOSE_SETTLE,
    WATCH_TIMEOUT_SECONDS,
    Informer,
)
from konnectivity_fast.kube import KubeClient
from konnectivity_fast.kube.leases import Lease, is_expired, lease_start
from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.endpoints import AGENT_ENDPOINT_ANNOTATION, Address, parse_address

__all__ = [
    "LIST_RETRY_CAP",
    "LIST_RETRY_INITIAL",
    "TLS_CLOSE_SETTLE",
    "WATCH_TIMEOUT_SECONDS",
    "LeaseCounter",
    "is_valid",
]

log = logging.getLogger(__name__)


def is_valid(lease: Lease, now: datetime) -> bool:
    """Upstream's ``IsLeaseValid``: ``(renewTime or acquireTime) + leaseDurationSeconds``
    is after ``now``. Neither time: invalid. A missing duration counts as 0 (upstream
    crashes on it; a Lease nobody maintains is better not counted)."""
    if lease_start(lease) is None:
        name = (lease.get("metadata") or {}).get("name", "")
        log.warning(
            "lease %s has neither a renew time or an acquire time, marking as expired", name
        )
        return False
    return not is_expired(lease, now)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _name(lease: Lease) -> str:
    return str((lease.get("metadata") or {}).get("name", ""))


class LeaseCounter(Informer):
    """The valid server Leases of ``namespace`` matching ``selector``; see the module doc.

    ``client``: an existing client (tests); without one ``start()`` builds it from
    ``kubeconfig`` (empty: in-cluster). ``now``: the wall clock, injectable for tests.
    """

    what = "leases"

    def __init__(
        self,
        namespace: str,
        selector: str,
        *,
        kubeconfig: str = "",
        client: KubeClient | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        super().__init__(
            KubeClient.leases_path(namespace), selector, kubeconfig=kubeconfig, client=client
        )
        self.namespace = namespace
        self._now = now

    # --- the seam agent.app.run uses ------------------------------------------------------

    def count(self) -> int:
        """The number of valid Leases now, at least 1."""
        now = self._now()
        count = sum(1 for lease in self.objects.values() if is_valid(lease, now))
        if count == 0:
            log.warning("No valid leases found, assuming server count of 1")
            return 1
        return count

    def endpoints(self) -> dict[Address, str]:
        """Address -> server ID: the agent endpoint each valid Lease's holder published
        (``AGENT_ENDPOINT_ANNOTATION``; upstream's servers publish none). An annotation
        that does not parse is skipped."""
        now = self._now()
        found: dict[Address, str] = {}
        for lease in self.objects.values():
            annotations = (lease.get("metadata") or {}).get("annotations") or {}
            text = annotations.get(AGENT_ENDPOINT_ANNOTATION)
            holder = (lease.get("spec") or {}).get("holderIdentity")
            if not isinstance(text, str) or not isinstance(holder, str) or not holder:
                continue
            if not is_valid(lease, now):
                continue
            try:
                found.setdefault(parse_address(text), holder)
            except ValueError:
                log.log(
                    V(2), "lease %s: unusable %s %r", _name(lease), AGENT_ENDPOINT_ANNOTATION, text
                )
        return found

    # --- upstream's lease metrics ---------------------------------------------------------

    def observe_list(self, code: int, reason: str) -> None:
        agent_metrics.observe_lease_list(code, reason)

    def observe_list_latency(self, code: int, seconds: float) -> None:
        agent_metrics.observe_lease_list_latency(code, seconds)

    def observe_watch(self, code: int, reason: str) -> None:
        agent_metrics.observe_lease_list(code, reason)  # upstream's watch metric (above)
