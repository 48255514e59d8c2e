"""Counting proxy-servers by their Leases (``--count-server-leases``,
upstream's pkg/agent/lease_counter.go).

``LeaseCounter`` keeps a cache of the ``coordination.k8s.io/v1`` Leases in the lease
namespace that match the label selector, as upstream's informer does: one list, then a
watch from the list's resourceVersion, re-opened when the API server ends it, and a fresh
list when the watch's resourceVersion is too old (410) or the watch fails. Failures are
logged and retried with a capped backoff; they never end the loop, and the cache keeps
the last Leases seen (so an unreachable API server leaves the last count in force).

``start()`` returns once the first list succeeded (upstream blocks start-up until the
informer has synced; while the API is unreachable it waits, retrying). ``count()`` is
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

The Kubernetes client is made in ``start()`` (from ``--kubeconfig``, or in-cluster when
empty), so its errors come after the TLS ones, in upstream's order; they raise
``SetupError`` with upstream's words. Only JSON is spoken: ``--kube-api-content-type``
is accepted and not used (our client has no protobuf codec).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

from konnectivity_fast.agent.app import SetupError
from konnectivity_fast.kube import ApiError, ConfigError, KubeClient, KubeError, load_config
from konnectivity_fast.kube.leases import Lease, is_expired, lease_start
from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.verbosity import V

__all__ = [
    "LIST_RETRY_CAP",
    "LIST_RETRY_INITIAL",
    "TLS_CLOSE_SETTLE",
    "WATCH_TIMEOUT_SECONDS",
    "LeaseCounter",
    "is_valid",
]

log = logging.getLogger(__name__)

# client-go's reflector backs off from 800 ms to at most 30 s between failed list/watch
# attempts: an API server that is down is not hammered, one that comes back is seen soon.
LIST_RETRY_INITIAL = 0.8
LIST_RETRY_CAP = 30.0
# The reflector asks the API server to end each watch after 5-10 minutes (random, so
# many agents do not re-watch together); the watch is then re-opened from the last
# resourceVersion, which costs no list.
WATCH_TIMEOUT_SECONDS = 300
# Loopback or LAN: a TLS close_notify exchange takes well under this.
TLS_CLOSE_SETTLE = 0.2
# 410 Gone: the resourceVersion the watch asked for is compacted away; list again.
_GONE = 410


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


class LeaseCounter:
    """The valid server Leases of ``namespace`` matching ``selector``; see the module doc.

    ``client``: an existing client (tests); without one ``start()`` builds it from
    ``kubeconfig`` (empty: in-cluster). ``now``: the wall clock, injectable for tests.
    """

    def __init__(
        self,
        namespace: str,
        selector: str,
        *,
        kubeconfig: str = "",
        client: KubeClient | None = None,
        now: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.namespace = namespace
        self.selector = selector
        self._kubeconfig = kubeconfig
        self._client = client
        self._owns_client = client is None
        self._now = now
        self._leases: dict[str, Lease] = {}
        self._resource_version = ""
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    # --- the seam agent.app.run uses ------------------------------------------------------

    async def start(self) -> None:
        """Build the client if needed, list until that succeeds, then keep watching."""
        client = self._client or self._connect()
        self._client = client
        delay = LIST_RETRY_INITIAL
        while True:
            try:
                await self._list(client)
                break
            except KubeError as exc:
                log.error("Could not list leases: %s", exc)
            await asyncio.sleep(self._jittered(delay))
            delay = min(delay * 2, LIST_RETRY_CAP)
        log.log(
            V(2),
            "lease cache synced: %d leases match %r in %s",
            len(self._leases),
            self.selector,
            self.namespace,
        )
        self._task = asyncio.get_running_loop().create_task(self._follow(client))

    def count(self) -> int:
        """The number of valid Leases now, at least 1."""
        now = self._now()
        count = sum(1 for lease in self._leases.values() if is_valid(lease, now))
        if count == 0:
            log.warning("No valid leases found, assuming server count of 1")
            return 1
        return count

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            # The cancelled watch closed its TLS connection, but the TLS shutdown ends on
            # later loop turns (kube/http.py does not wait for it); give it those turns so
            # a caller that closes its loop next does not leak the socket.
            await asyncio.sleep(TLS_CLOSE_SETTLE)
        if self._client is not None and self._owns_client:
            await self._client.close()
            self._client = None

    # --- the informer ---------------------------------------------------------------------

    def _connect(self) -> KubeClient:
        try:
            config = load_config(self._kubeconfig)
        except ConfigError as exc:
            if self._kubeconfig:
                raise SetupError(f"failed to load kubernetes client config: {exc}") from None
            raise SetupError(f"failed to load in cluster kubernetes client config: {exc}") from None
        try:
            return KubeClient(config)
        except ConfigError as exc:
            raise SetupError(f"failed to create kubernetes clientset: {exc}") from None

    def _jittered(self, delay: float) -> float:
        return delay * (1.0 + self._rng.random() * 0.1)

    async def _list(self, client: KubeClient) -> None:
        query = {"labelSelector": self.selector} if self.selector else None
        started = time.monotonic()
        code = 200
        try:
            result = await client.request("GET", client.leases_path(self.namespace), query=query)
        except ApiError as exc:
            code = exc.code
            agent_metrics.observe_lease_list(exc.code, exc.reason)
            raise
        finally:
            agent_metrics.observe_lease_list_latency(code, time.monotonic() - started)
        agent_metrics.observe_lease_list(200, "")
        items = result.get("items") or []
        self._leases = {_name(item): item for item in items if isinstance(item, dict)}
        self._resource_version = str((result.get("metadata") or {}).get("resourceVersion", ""))

    async def _follow(self, client: KubeClient) -> None:
        """Watch, re-watch and re-list for ever; failures back off and list again (the
        cache may have missed deletions meanwhile)."""
        delay = LIST_RETRY_INITIAL
        while True:
            try:
                if not self._resource_version:
                    await self._list(client)
                if await self._watch(client):
                    delay = LIST_RETRY_INITIAL
                    continue
                # Ended without a single event: do not spin on a server that ends
                # every watch at once.
                await asyncio.sleep(self._jittered(delay))
                continue
            except ApiError as exc:
                self._resource_version = ""
                if exc.code == _GONE:
                    log.log(V(2), "lease watch expired (%s), listing again", exc)
                    continue
                log.error("Could not watch leases: %s", exc)
            except KubeError as exc:
                self._resource_version = ""
                log.error("Could not watch leases: %s", exc)
            await asyncio.sleep(self._jittered(delay))
            delay = min(delay * 2, LIST_RETRY_CAP)

    async def _watch(self, client: KubeClient) -> bool:
        """One watch until the server ends it; whether any event came."""
        events = client.watch_leases(
            self.namespace, self.selector, self._resource_version, WATCH_TIMEOUT_SECONDS
        )
        opened = False
        async with contextlib.aclosing(events):
            try:
                async for kind, lease in events:
                    if not opened:
                        opened = True
                        agent_metrics.observe_lease_list(200, "")  # upstream's watch metric
                    self._apply(kind, lease)
            except ApiError as exc:
                if not opened:
                    agent_metrics.observe_lease_list(exc.code, exc.reason)
                raise
        if not opened:
            agent_metrics.observe_lease_list(200, "")
        return opened

    def _apply(self, kind: str, lease: Lease) -> None:
        version = (lease.get("metadata") or {}).get("resourceVersion")
        if version:
            self._resource_version = str(version)
        name = _name(lease)
        if kind in ("ADDED", "MODIFIED"):
            self._leases[name] = lease
        elif kind == "DELETED":
            self._leases.pop(name, None)
