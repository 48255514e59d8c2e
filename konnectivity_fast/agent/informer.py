"""``Informer``: a cache of one Kubernetes collection, as client-go's informer keeps it, for
the agent's Lease counting (``agent.leases``) and Service endpoints (``agent.service``).

One list, then a watch from the list's resourceVersion, re-opened when the API server
ends it, and a fresh list when the watch's resourceVersion is too old (410) or the watch
fails. Failures are logged and retried with a capped backoff; they never end the loop,
and the cache keeps the last objects seen (an unreachable API server leaves the last
state in force). ``start()`` returns once the first list succeeded (upstream blocks
start-up until its informer has synced; while the API is unreachable it waits, retrying).

The label selector text is sent to the API server, which filters both list and watch.
Subclasses name the collection (``path``) and may observe lists and watches for their
metrics (``observe_list``, ``observe_list_latency``, ``observe_watch``).

The Kubernetes client is made in ``start()`` (from ``kubeconfig``, or in-cluster when
empty), so its errors come after the TLS ones, in upstream's order; they raise
``SetupError`` with upstream's words.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from konnectivity_fast.agent.app import SetupError
from konnectivity_fast.kube import ApiError, ConfigError, KubeClient, KubeError, load_config
from konnectivity_fast.verbosity import V

__all__ = [
    "LIST_RETRY_CAP",
    "LIST_RETRY_INITIAL",
    "TLS_CLOSE_SETTLE",
    "WATCH_TIMEOUT_SECONDS",
    "Informer",
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

Obj = dict[str, Any]


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


class Informer:
    """The objects of ``path`` matching ``selector``, by name (``objects``); see the
    module doc. ``client``: an existing client (tests); without one ``start()`` builds it
    from ``kubeconfig`` (empty: in-cluster). ``what`` names the objects in logs."""

    what = "objects"

    def __init__(
        self,
        path: str,
        selector: str,
        *,
        kubeconfig: str = "",
        client: KubeClient | None = None,
    ) -> None:
        self.path = path
        self.selector = selector
        self._kubeconfig = kubeconfig
        self._client = client
        self._owns_client = client is None
        self.objects: dict[str, Obj] = {}
        self._resource_version = ""
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    # --- hooks for metrics ----------------------------------------------------------------

    def observe_list(self, code: int, reason: str) -> None:
        """A list (or, for upstream's lease metrics, a watch) ended with ``code``."""

    def observe_list_latency(self, code: int, seconds: float) -> None:
        """A list took ``seconds``."""

    def observe_watch(self, code: int, reason: str) -> None:
        """A watch was opened (its first event came: 200), or failed or ended before any
        event (with the failure's code, or 200)."""

    # --- start and stop -------------------------------------------------------------------

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
                log.error("Could not list %s: %s", self.what, exc)
            await asyncio.sleep(self._jittered(delay))
            delay = min(delay * 2, LIST_RETRY_CAP)
        log.log(V(2), "%s cache synced: %d match %r", self.what, len(self.objects), self.selector)
        self._task = asyncio.get_running_loop().create_task(self._follow(client))

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

    # --- list and watch -------------------------------------------------------------------

    async def _list(self, client: KubeClient) -> None:
        query = {"labelSelector": self.selector} if self.selector else None
        started = time.monotonic()
        code = 200
        try:
            result = await client.request("GET", self.path, query=query)
        except ApiError as exc:
            code = exc.code
            self.observe_list(exc.code, exc.reason)
            raise
        finally:
            self.observe_list_latency(code, time.monotonic() - started)
        self.observe_list(200, "")
        items = result.get("items") or []
        self.objects = {_name(item): item for item in items if isinstance(item, dict)}
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
                    log.log(V(2), "%s watch expired (%s), listing again", self.what, exc)
                    continue
                log.error("Could not watch %s: %s", self.what, exc)
            except KubeError as exc:
                self._resource_version = ""
                log.error("Could not watch %s: %s", self.what, exc)
            await asyncio.sleep(self._jittered(delay))
            delay = min(delay * 2, LIST_RETRY_CAP)

    async def _watch(self, client: KubeClient) -> bool:
        """One watch until the server ends it; whether any event came."""
        query = {"allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_TIMEOUT_SECONDS)}
        if self.selector:
            query["labelSelector"] = self.selector
        if self._resource_version:
            query["resourceVersion"] = self._resource_version
        events = client.watch(self.path, query)
        opened = False
        async with contextlib.aclosing(events):
            try:
                async for kind, obj in events:
                    if not opened:
                        opened = True
                        self.observe_watch(200, "")
                    self._apply(kind, obj)
            except ApiError as exc:
                if not opened:
                    self.observe_watch(exc.code, exc.reason)
                raise
        if not opened:
            self.observe_watch(200, "")
        return opened

    def _apply(self, kind: str, obj: Obj) -> None:
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self._resource_version = str(version)
        name = _name(obj)
        if kind in ("ADDED", "MODIFIED"):
            self.objects[name] = obj
        elif kind == "DELETED":
            self.objects.pop(name, None)
