"""``ClientSet``: this agent's connections to every proxy-server replica
(upstream's pkg/agent/clientset.go ``ClientSet``: ``sync`` and ``connectOnce``).

One sync loop, strictly sequential as upstream's: try once at once, then sleep
``Backoff.idle()`` after a success, a duplicate or nothing to do, or ``Backoff.step()``
after a failure; stop when asked. An attempt (``connect_once``):

1. does nothing once draining (no new connections after the first SIGTERM);
2. asks the ``ServerCounter`` how many servers there are (``known_server_count``);
3. does nothing when that many are connected, unless ``--sync-forever``;
4. otherwise opens a new ``AgentClient`` (a new TCP connection, so the host name is
   resolved again and a load balancer may pick another replica), and keeps it unless its
   server ID is already connected (then it is closed: ``duplicate server: <id>``).

Only a new unique server's ``servercount`` header updates the response-based count.
``open_server_connections`` follows the map on every add and remove.

Sticky load balancers (every new connection reaching the same replica) leave the agent on
fewer servers than it knows of, forever; upstream says nothing. This loop logs a warning
after ``STICKY_WARN_AFTER`` duplicates in a row while short of servers, and again every
``STICKY_WARN_AFTER`` more; the metrics show it as ``open_server_connections`` below
``known_server_count``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from random import Random

from konnectivity_fast.agent.client import AgentClient, ClientConfig, ConnectError
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.agent.policy import Backoff, ServerCounter
from konnectivity_fast.metrics import agent as metrics
from konnectivity_fast.verbosity import V

__all__ = ["STICKY_WARN_AFTER", "ClientSet", "DuplicateServerError"]

log = logging.getLogger(__name__)

#: Duplicates in a row, while connected to fewer servers than known, before the agent warns
#: that the load balancer looks sticky (about this many seconds at the default interval).
STICKY_WARN_AFTER = 30


class DuplicateServerError(ConnectError):
    """The new connection reached a server this agent is already connected to."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"duplicate server: {server_id}")
        self.server_id = server_id


class ClientSet:
    """The sync loop and the map of server ID -> ``AgentClient``."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        sync_interval: float = 1.0,
        sync_interval_cap: float = 10.0,
        sync_forever: bool = False,
        counter: ServerCounter | None = None,
        pool: EndpointPool | None = None,
        rng: Random | None = None,
        client_factory: Callable[..., AgentClient] = AgentClient,
    ) -> None:
        self.config = config
        self.sync_forever = sync_forever
        self.counter = counter or ServerCounter()
        self.pool = pool or EndpointPool()
        self.backoff = Backoff(sync_interval, sync_interval_cap, rng or Random())
        self._client_factory = client_factory
        self.clients: dict[str, AgentClient] = {}
        self.draining = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connecting: AgentClient | None = None
        self.duplicates_in_a_row = 0
        self.attempts = 0

    # -- state -----------------------------------------------------------------------------

    @property
    def clients_count(self) -> int:
        return len(self.clients)

    @property
    def healthy_clients_count(self) -> int:
        return sum(1 for client in self.clients.values() if client.ready)

    def _update_gauge(self) -> None:
        metrics.set_server_connections_count(len(self.clients))

    def _removed(self, client: AgentClient) -> None:
        if self.clients.get(client.server_id) is client:
            del self.clients[client.server_id]
            log.info("disconnected from server %s (%d left)", client.server_id, len(self.clients))
            self._update_gauge()

    # -- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.connect_once()
            except DuplicateServerError as exc:
                self.backoff.reset()
                delay = self.backoff.idle()
                log.log(V(4), "%s", exc)
            except ConnectError as exc:
                log.error("cannot connect once: %s", exc)
                delay = self.backoff.step()
            else:
                self.backoff.reset()
                delay = self.backoff.idle()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)

    async def connect_once(self) -> None:
        """One sync step; raises ``ConnectError`` (or ``DuplicateServerError``)."""
        if self.draining:
            return
        count = self.counter.count()
        metrics.set_server_count(count)
        if not self.sync_forever and len(self.clients) >= count:
            self.duplicates_in_a_row = 0
            return
        self.attempts += 1
        client = self._client_factory(self.config, self.pool, self._removed)
        self._connecting = client
        try:
            server_count = await client.connect()
        finally:
            self._connecting = None
        if self._stop.is_set():
            client.close("stopping")
            return
        if client.server_id in self.clients:
            client.close("duplicate")
            self._note_duplicate(count)
            raise DuplicateServerError(client.server_id)
        self.duplicates_in_a_row = 0
        self.counter.last_received = server_count
        self.clients[client.server_id] = client
        self._update_gauge()
        client.start()
        log.info(
            "connected to server %s (%d of %d; it counts %d)",
            client.server_id,
            len(self.clients),
            count,
            server_count,
        )
        if self.draining:  # the drain started while this one was connecting
            client.send_drain()

    def _note_duplicate(self, count: int) -> None:
        if len(self.clients) >= count:
            return  # --sync-forever looking for new servers: duplicates are expected
        self.duplicates_in_a_row += 1
        if self.duplicates_in_a_row % STICKY_WARN_AFTER == 0:
            log.warning(
                "connected to %d of %d proxy-servers, and the last %d connections to %s:%d "
                "all reached servers already connected (%s): the load balancer in front of "
                "the proxy-servers looks sticky (session affinity or connection reuse), so "
                "the other servers cannot reach this agent",
                len(self.clients),
                count,
                self.duplicates_in_a_row,
                self.config.host,
                self.config.port,
                ", ".join(sorted(self.clients)),
            )

    # -- drain and stop --------------------------------------------------------------------

    def drain(self) -> None:
        """First SIGTERM: DRAIN on every stream, no new connections; streams keep serving."""
        if self.draining:
            return
        self.draining = True
        for client in list(self.clients.values()):
            client.send_drain()

    async def stop(self) -> None:
        """End the loop and close every connection."""
        self._stop.set()
        if self._connecting is not None:
            self._connecting.close("stopping")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for client in list(self.clients.values()):
            client.close("stopping")
        self.clients.clear()
        self._update_gauge()
