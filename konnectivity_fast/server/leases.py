"""The proxy-server's Lease publishing and Lease garbage collection
(upstream's pkg/server/leases/controller.go and gc_controller.go,
``--enable-lease-controller``).

``LeaseController`` runs two loops on the event loop:

- **renew**: keeps the ``coordination.k8s.io/v1`` Lease ``konnectivity-proxy-server-<id>``
  in the lease namespace with ``holderIdentity=<id>``, ``leaseDurationSeconds=30`` and
  ``renewTime=now``, its labels replaced by the ``--lease-label`` map on every write.
  Annotations are merged, not replaced (ours, beyond upstream): the ``annotations`` map
  (this server's endpoints, server/directory.py) is written over the Lease's own, and a
  key of ``managed_annotations`` the map lacks is removed, so a flag turned off takes its
  annotation away while annotations others wrote stay. Created when missing. Updates
  carry the last seen resourceVersion; on a conflict the Lease is read again and the
  update retried, a bounded number of times;
- **GC**: lists the Leases matching the label map and deletes each expired one
  (``(renewTime or acquireTime) + leaseDurationSeconds <= now``; no time at all means
  expired) with a resourceVersion precondition, so a Lease renewed meanwhile survives.
  NotFound is tolerated. List and delete calls feed upstream's lease metrics. Each list
  is also handed, whole, to ``on_list`` (ours: the server directory learns its peers'
  endpoints from it, so no second list is made).

Both loops run their work at once, then after each run wait ``period`` plus up to
``jitter * period`` (wait.JitterUntil with sliding=true). Periods and duration are
constructor parameters so tests can use short ones; the defaults are upstream's.
``stop()`` ends both loops and deletes the server's own Lease.

Invariant: a failed API call is logged and retried on the next period; it never ends a
loop. Times are wall-clock UTC, in the MicroTime format Kubernetes writes.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime

from konnectivity_fast.kube import ApiError, KubeClient, KubeError
from konnectivity_fast.kube.labels import parse_lease_labels
from konnectivity_fast.kube.leases import Lease, is_expired, parse_micro_time
from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.endpoints import AGENT_ENDPOINT_ANNOTATION, PEER_ENDPOINT_ANNOTATION

__all__ = [
    "GC_PERIOD",
    "JITTER",
    "LEASE_DURATION_SECONDS",
    "LEASE_NAME_PREFIX",
    "MANAGED_ANNOTATIONS",
    "RENEW_PERIOD",
    "LeaseController",
    "format_micro_time",
    "is_expired",
    "label_selector",
    "lease_name",
    "parse_lease_labels",
    "parse_micro_time",
]

log = logging.getLogger(__name__)

LEASE_NAME_PREFIX = "konnectivity-proxy-server-"
# Upstream's hard-coded values (cmd/server/app/server.go LeaseDuration,
# LeaseRenewalInterval, LeaseGCInterval): lease 30 s, renew and GC every 15 s; 4 % jitter, as
# the renewal loop of k8s.io/component-helpers apimachinery/lease/controller.go.
LEASE_DURATION_SECONDS = 30
RENEW_PERIOD = 15.0
GC_PERIOD = 15.0
JITTER = 0.04
# Conflicting writers (another process with our server ID) must not spin us: after this
# many conflicts in one round we wait for the next period, as client-go's lease controller.
MAX_UPDATE_RETRIES = 5
# Deleting our own Lease at shutdown must not hold the shutdown up for long.
STOP_DELETE_TIMEOUT = 5.0
# The annotations this controller owns on its Lease: written when configured, removed
# when not (module docstring).
MANAGED_ANNOTATIONS: frozenset[str] = frozenset(
    {AGENT_ENDPOINT_ANNOTATION, PEER_ENDPOINT_ANNOTATION}
)


def lease_name(server_id: str) -> str:
    return LEASE_NAME_PREFIX + server_id


def format_micro_time(when: datetime) -> str:
    """Kubernetes' MicroTime text: RFC 3339 in UTC with exactly six fractional digits."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def label_selector(labels: Mapping[str, str]) -> str:
    """An equality selector matching every label of the map (sorted, as Go's
    ``labels.SelectorFromSet`` prints it)."""
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))


class LeaseController:
    """Publishes this server's Lease and removes expired ones; see the module docstring.
    ``annotations``: written on the Lease; ``managed_annotations``: the keys removed when
    ``annotations`` lacks them. ``on_list``: called with each GC list of Leases."""

    def __init__(
        self,
        client: KubeClient,
        server_id: str,
        namespace: str,
        labels: Mapping[str, str],
        *,
        lease_duration_seconds: int = LEASE_DURATION_SECONDS,
        renew_period: float = RENEW_PERIOD,
        gc_period: float = GC_PERIOD,
        jitter: float = JITTER,
        annotations: Mapping[str, str] | None = None,
        managed_annotations: Collection[str] = MANAGED_ANNOTATIONS,
        on_list: Callable[[list[Lease]], object] | None = None,
    ) -> None:
        self._client = client
        self._server_id = server_id
        self._namespace = namespace
        self._labels = dict(labels)
        self._annotations = dict(annotations or {})
        self._managed = frozenset(managed_annotations) | frozenset(self._annotations)
        self._on_list = on_list
        self._duration = lease_duration_seconds
        self._renew_period = renew_period
        self._gc_period = gc_period
        self._jitter = jitter
        self.name = lease_name(server_id)
        self._latest: Lease | None = None  # last Lease we wrote or read
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start both loops on the running event loop (the first runs happen at once)."""
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(self._loop(self.renew, self._renew_period), name="lease-renew"),
            asyncio.create_task(self._loop(self.collect, self._gc_period), name="lease-gc"),
        ]

    async def stop(self) -> None:
        """End both loops, then delete this server's Lease (NotFound tolerated)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(STOP_DELETE_TIMEOUT):
                await self._client.delete_lease(self._namespace, self.name)
        except ApiError as exc:
            if not exc.not_found:
                log.error("failed to delete lease %s/%s: %s", self._namespace, self.name, exc)
        except (KubeError, TimeoutError) as exc:
            log.error("failed to delete lease %s/%s: %s", self._namespace, self.name, exc)
        self._latest = None

    async def _loop(self, work: Callable[[], Awaitable[None]], period: float) -> None:
        while True:
            try:
                await work()
            except KubeError as exc:
                log.error("lease %s: %s", getattr(work, "__name__", "work"), exc)
            except Exception:
                # A malformed answer must not end the loop for the life of the process.
                log.exception("lease %s failed", getattr(work, "__name__", "work"))
            await asyncio.sleep(period + random.random() * self._jitter * period)

    # --- renew ---------------------------------------------------------------------------

    async def renew(self) -> None:
        """One renewal: update the Lease, creating it if missing."""
        for _ in range(MAX_UPDATE_RETRIES):
            if self._latest is None and await self._ensure():
                return  # just created with renewTime=now
            assert self._latest is not None
            try:
                self._latest = await self._client.update_lease(
                    self._namespace, self._stamped(self._latest)
                )
                log.log(V(4), "renewed lease %s/%s", self._namespace, self.name)
                return
            except ApiError as exc:
                self._latest = None  # read it again before the next try
                if not (exc.conflict or exc.not_found):
                    raise
        log.error("lease %s/%s: update kept conflicting", self._namespace, self.name)

    async def _ensure(self) -> bool:
        """Read the Lease into ``_latest``, creating it if missing; True if created."""
        try:
            self._latest = await self._client.get_lease(self._namespace, self.name)
            return False
        except ApiError as exc:
            if not exc.not_found:
                raise
        fresh: Lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self._namespace},
        }
        self._latest = await self._client.create_lease(self._namespace, self._stamped(fresh))
        log.log(V(2), "created lease %s/%s", self._namespace, self.name)
        return True

    def _stamped(self, base: Lease) -> Lease:
        lease = copy.deepcopy(base)
        meta = lease.setdefault("metadata", {})
        meta["labels"] = dict(self._labels)
        old = meta.get("annotations")
        kept = (
            {k: v for k, v in old.items() if k not in self._managed}
            if isinstance(old, dict)
            else {}
        )
        annotations = kept | self._annotations
        if annotations:
            meta["annotations"] = annotations
        else:
            meta.pop("annotations", None)
        spec = lease.setdefault("spec", {})
        spec["holderIdentity"] = self._server_id
        spec["leaseDurationSeconds"] = self._duration
        spec["renewTime"] = format_micro_time(datetime.now(UTC))
        return lease

    # --- garbage collection ---------------------------------------------------------------

    async def collect(self) -> None:
        """One GC round: delete every expired Lease that carries our labels."""
        started = time.monotonic()
        try:
            leases = await self._client.list_leases(self._namespace, label_selector(self._labels))
        except ApiError as exc:
            server_metrics.observe_lease_list_latency(exc.code, time.monotonic() - started)
            server_metrics.observe_lease_list(exc.code, exc.reason)
            raise
        server_metrics.observe_lease_list_latency(200, time.monotonic() - started)
        server_metrics.observe_lease_list(200, "")
        if self._on_list is not None:
            self._on_list(leases)
        now = datetime.now(UTC)
        for lease in leases:
            if is_expired(lease, now):
                await self._delete_expired(lease)

    async def _delete_expired(self, lease: Lease) -> None:
        meta = lease.get("metadata") or {}
        name = str(meta.get("name", ""))
        started = time.monotonic()
        try:
            await self._client.delete_lease(
                self._namespace, name, resource_version=str(meta.get("resourceVersion", ""))
            )
        except ApiError as exc:
            server_metrics.observe_lease_delete_latency(exc.code, time.monotonic() - started)
            server_metrics.observe_lease_delete(exc.code, exc.reason)
            if exc.not_found:
                log.log(V(2), "expired lease %s/%s was already gone", self._namespace, name)
            else:
                log.error("could not delete lease %s/%s: %s", self._namespace, name, exc)
            return
        except KubeError as exc:
            log.error("could not delete lease %s/%s: %s", self._namespace, name, exc)
            return
        server_metrics.observe_lease_delete_latency(200, time.monotonic() - started)
        server_metrics.observe_lease_delete(200, "")
        server_metrics.culled_lease()
        log.log(V(2), "deleted expired lease %s/%s", self._namespace, name)
