"""``ClientSet``: this agent's connections to every proxy-server replica
(upstream's pkg/agent/clientset.go ``ClientSet``: ``sync`` and ``connectOnce``), and ours
beyond it: direct endpoints (docs/high-availability.md).

**The balancer loop**, strictly sequential as upstream's: try once at once, then sleep
``Backoff.idle()`` after a success or nothing to do, or ``Backoff.step()`` after a failure;
stop when asked. An attempt (``connect_once``):

1. does nothing once draining (no new connections after the first SIGTERM);
2. asks how many servers there are (``known_count``: the ``ServerCounter``, and with
   direct endpoints also every server ID a source names);
3. does nothing when that many are connected, unless ``--sync-forever``;
4. otherwise opens a new ``AgentClient`` (a new TCP connection, so the host name is
   resolved again and a load balancer may pick another replica), and keeps it unless its
   server ID is already connected (then it is closed: ``duplicate server: <id>``).

A duplicate costs upstream one ``--sync-interval`` (upstream issue #816: with 5 replicas
about 5 s to find the last one); here, while servers are missing, the next attempt after
a new server or a duplicate comes after ``DUPLICATE_RETRY_DELAY``, so a round-robin
balancer is walked through in milliseconds; only once the sticky window
(``StickyDetector``) is full of duplicates does the loop fall back to the interval.

**Detect and say it** (always on): when the last ``StickyDetector.window`` attempts all
reached held servers while some are missing, the balancer is suspected sticky or short:
the gauge ``konnectivity_fast_agent_lb_sticky_suspected`` is registered and set to 1, and
a warning names the balancer, the server it keeps returning and how many are missing
(again every ``STICKY_LOG_INTERVAL`` while it lasts). Holding every known server sets it
back to 0.

**Direct endpoints** (with an ``EndpointBook``): a second loop dials the book's due
addresses (``EndpointBook.due``), at most ``MAX_DIRECT_ATTEMPTS`` at once, each with
``ClientConfig.server_name`` unchanged so certificates verify against the name users
already have. It wakes when a source or the set of held servers changes, or when a
backed-off address becomes due. Sources are polled each turn (``sources``); the header
source is the union of the latest ``kf-server-endpoints`` of the servers held (every
connection's answer counts, a duplicate's too; the last ones are kept while none is
held). A server learns of new replicas after agents met it, so an agent that holds every
server it knows of still dials the balancer once after ``HEADER_REFRESH_FIRST``, then at
doubling pauses up to ``HEADER_REFRESH_CAP`` while nothing changes. With no book, and a
non-empty ``--proxy-server-host``, this is upstream's agent.

Invariants: at most one ``AgentClient`` per server ID whatever the path;
``open_server_connections`` follows the map on every add and remove.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Mapping
from random import Random

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.connect import ClientConfig, ConnectError
from konnectivity_fast.agent.discovery import EndpointBook, Source
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.agent.policy import Backoff, ServerCounter, StickyDetector, jitter
from konnectivity_fast.metrics import agent as metrics
from konnectivity_fast.metrics import discovery as discovery_metrics
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.contract import Extension
from konnectivity_fast.wire.endpoints import MD_SERVER_ENDPOINTS, Address, parse_server_endpoints

__all__ = [
    "DUPLICATE_RETRY_DELAY",
    "HEADER_REFRESH_CAP",
    "HEADER_REFRESH_FIRST",
    "MAX_DIRECT_ATTEMPTS",
    "STICKY_LOG_INTERVAL",
    "ClientSet",
    "DuplicateServerError",
    "EndpointSource",
]

log = logging.getLogger(__name__)

#: Seconds before the next try after a duplicate inside a streak (class docstring): one
#: TLS handshake on a LAN takes a few milliseconds, so this is a handful of attempts per
#: second at most, for at most the sticky window.
DUPLICATE_RETRY_DELAY = 0.05
#: The sticky warning is repeated this often (seconds) while the balancer stays suspect:
#: visible in any log window, not a flood.
STICKY_LOG_INTERVAL = 600.0
#: Seconds before an agent with header discovery first re-reads the servers' endpoint lists
#: once it holds every server it knows of: servers list each other's Leases every 15 s, so
#: a server an agent met at its start knows its peers about this much later.
HEADER_REFRESH_FIRST = 15.0
#: The re-reading pause doubles while the held servers stay the same, up to this (seconds):
#: one extra connection per agent every 10 minutes is cheap even for thousands of agents.
HEADER_REFRESH_CAP = 600.0
#: Direct dials in flight at once: a few replicas answer at once, and unreachable ones
#: (each up to the 20 s connect timeout) do not hold up the others.
MAX_DIRECT_ATTEMPTS = 8

#: A direct endpoint source: address -> the server ID it claims there ("" unknown).
EndpointSource = Callable[[], Mapping[Address, str]]


class DuplicateServerError(ConnectError):
    """The new connection reached a server this agent is already connected to."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"duplicate server: {server_id}")
        self.server_id = server_id


class ClientSet:
    """The sync loops and the map of server ID -> ``AgentClient``."""

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
        book: EndpointBook | None = None,
        sources: Mapping[Source, EndpointSource] | None = None,
    ) -> None:
        self.config = config
        self.sync_interval = sync_interval
        self.sync_forever = sync_forever
        self.counter = counter or ServerCounter()
        self.pool = pool or EndpointPool()
        self._rng = rng or Random()
        self.backoff = Backoff(sync_interval, sync_interval_cap, self._rng)
        self._client_factory = client_factory
        self.clients: dict[str, AgentClient] = {}
        self.draining = False
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._connecting: set[AgentClient] = set()
        self.sticky = StickyDetector()
        self._sticky_logged_at: float | None = None
        self.attempts = 0
        # Direct endpoints: the book, its sources, and which address each client came by.
        self.book = book
        self.sources: dict[Source, EndpointSource] = dict(sources or {})
        self._via: dict[AgentClient, Address] = {}
        # Server ID -> the endpoint list it sent last (kf-server-endpoints).
        self._answers: dict[str, dict[Address, str]] = {}
        self._refresh_interval = HEADER_REFRESH_FIRST
        self._next_refresh: float | None = None
        self._wake = asyncio.Event()
        if book is not None and Extension.SERVER_ENDPOINTS in config.extensions:
            self.sources[Source.HEADER] = self.header_endpoints

    # -- state -----------------------------------------------------------------------------

    @property
    def clients_count(self) -> int:
        return len(self.clients)

    @property
    def healthy_clients_count(self) -> int:
        return sum(1 for client in self.clients.values() if client.ready)

    @property
    def duplicates_in_a_row(self) -> int:
        return self.sticky.in_a_row

    def known_count(self) -> int:
        """How many servers to hold: the counter's, or more when sources name more."""
        count = self.counter.count()
        if self.book is not None:
            count = max(count, len(self.book.claimed_ids() | self.clients.keys()))
        return count

    def _update_gauges(self) -> None:
        metrics.set_server_connections_count(len(self.clients))
        if self.book is not None:
            missing = self.known_count() - len(self.clients)
            discovery_metrics.MISSING_SERVERS.set(max(0, missing))

    def _removed(self, client: AgentClient) -> None:
        address = self._via.pop(client, None)
        if address is not None and self.book is not None:
            self.book.lost(address, asyncio.get_running_loop().time())
        if self.clients.get(client.server_id) is client:
            del self.clients[client.server_id]
            log.info("disconnected from server %s (%d left)", client.server_id, len(self.clients))
            self._changed()

    def _adopt(self, client: AgentClient, count: int, path: str) -> None:
        """Keep a connected client (its ID is not held yet)."""
        self.counter.last_received = client.server_count
        self.clients[client.server_id] = client
        client.start()
        log.info(
            "connected to server %s %s (%d of %d; it counts %d)",
            client.server_id,
            "directly at " + f"{client.config.host}:{client.config.port}"
            if path == discovery_metrics.PATH_DIRECT
            else "through the load balancer",
            len(self.clients),
            count,
            client.server_count,
        )
        if self.draining:  # the drain started while this one was connecting
            client.send_drain()
        self._changed()

    def _changed(self) -> None:
        """The set of held servers changed: refresh what depends on it."""
        self._refresh_interval = HEADER_REFRESH_FIRST
        self._next_refresh = None
        if self.book is not None:
            self._prune_answers()
            if len(self.clients) >= self.known_count():
                self._satisfied()
            self._wake.set()
        self._update_gauges()

    # -- the balancer loop -----------------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config.host:
            self._tasks.append(loop.create_task(self._run()))
        if self.book is not None:
            discovery_metrics.enable(metrics.REGISTRY)
            self._tasks.append(loop.create_task(self._run_direct()))

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                await self.connect_once()
            except DuplicateServerError as exc:
                self.backoff.reset()
                delay = self._pause()
                log.log(V(4), "%s", exc)
            except ConnectError as exc:
                log.error("cannot connect once: %s", exc)
                self._count_attempt(discovery_metrics.PATH_LB, discovery_metrics.RESULT_ERROR)
                delay = self.backoff.step()
            else:
                self.backoff.reset()
                delay = self._pause()
            await self._sleep(delay)

    def _pause(self) -> float:
        """The pause after a success or a duplicate: short while servers are missing and
        the balancer is not (yet) suspected of always answering with held ones, else the
        sync interval."""
        count = self.known_count()
        if len(self.clients) < count and self.sticky.may_move(count):
            return jitter(DUPLICATE_RETRY_DELAY, 1.0, self._rng)
        return self.backoff.idle()

    async def _sleep(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def connect_once(self) -> None:
        """One sync step; raises ``ConnectError`` (or ``DuplicateServerError``)."""
        if self.draining:
            return
        count = self.known_count()
        metrics.set_server_count(count)
        if not self.sync_forever and len(self.clients) >= count and not self._refresh_due():
            self._satisfied()
            return
        self.attempts += 1
        client = self._client_factory(self.config, self.pool, self._removed)
        self._connecting.add(client)
        try:
            await client.connect()
        finally:
            self._connecting.discard(client)
        if self._stop.is_set():
            client.close("stopping")
            return
        self._learn_endpoints(client)
        if client.server_id in self.clients:
            client.close("duplicate")
            self._prune_answers()
            self._wake.set()
            self._count_attempt(discovery_metrics.PATH_LB, discovery_metrics.RESULT_DUPLICATE)
            self._note_duplicate(client.server_id, count)
            raise DuplicateServerError(client.server_id)
        self.sticky.new_server()
        self._count_attempt(discovery_metrics.PATH_LB, discovery_metrics.RESULT_NEW)
        self._adopt(client, count, discovery_metrics.PATH_LB)

    def _count_attempt(self, path: str, result: str) -> None:
        if self.book is not None:
            discovery_metrics.attempt(path, result)

    def _note_duplicate(self, server_id: str, count: int) -> None:
        if self.sync_forever and len(self.clients) >= count:
            return  # --sync-forever looking for new servers: duplicates are expected
        newly = self.sticky.duplicate(server_id, len(self.clients), count)
        if not self.sticky.suspected:
            return
        now = asyncio.get_running_loop().time()
        if newly:
            discovery_metrics.enable_sticky(metrics.REGISTRY)
            discovery_metrics.LB_STICKY_SUSPECTED.set(1)
        elif (
            self._sticky_logged_at is not None
            and now - self._sticky_logged_at < STICKY_LOG_INTERVAL
        ):
            return
        self._sticky_logged_at = now
        self._warn_sticky(count)

    def _warn_sticky(self, count: int) -> None:
        returned = max(self.sticky.recent, key=self.sticky.recent.__getitem__)
        log.warning(
            "the load balancer at %s:%d looks sticky or short: its last %d connections all "
            "reached servers already connected (mostly %s); connected to %d of %d "
            "proxy-servers, %d missing, so kube-apiservers beside the missing ones answer "
            '"No agent available". Fix: balance round robin without session affinity, '
            "with every replica in the pool, or give this agent direct endpoints "
            "(--server-discovery=headers with --agent-advertise-address on the servers, "
            "or --proxy-server-list)",
            self.config.host,
            self.config.port,
            self.sticky.in_a_row,
            returned,
            len(self.clients),
            count,
            count - len(self.clients),
        )

    def _satisfied(self) -> None:
        if self.sticky.suspected:
            log.info("connected to every known proxy-server: the load balancer is not suspected")
            discovery_metrics.LB_STICKY_SUSPECTED.set(0)
        self.sticky.satisfied()

    # -- direct endpoints ------------------------------------------------------------------

    def _learn_endpoints(self, client: AgentClient) -> None:
        """Keep the endpoint list of a server that answered (held or a duplicate)."""
        if Extension.SERVER_ENDPOINTS not in client.extensions:
            return
        values = [v for k, v in client.response_headers if k == MD_SERVER_ENDPOINTS]
        listed = parse_server_endpoints(values)
        self._answers[client.server_id] = {address: sid for sid, address in listed.items()}

    def _prune_answers(self) -> None:
        """Keep the lists of the servers held now (all the last ones heard while none is
        held, so a reconnect can use them)."""
        held = [sid for sid in self.clients if sid in self._answers]
        if held:
            self._answers = {sid: self._answers[sid] for sid in held}

    def header_endpoints(self) -> dict[Address, str]:
        """The header source: the union of the lists kept (``_prune_answers``)."""
        found: dict[Address, str] = {}
        for answer in self._answers.values():
            for address, server_id in answer.items():
                found.setdefault(address, server_id)
        return found

    def _refresh_due(self) -> bool:
        """Whether to dial the balancer once more although every known server is held: the
        servers' lists come only with a connection, and a server learns of new replicas
        after an agent connected (from Leases, within about HEADER_REFRESH_FIRST). The
        pause doubles while nothing changes, up to HEADER_REFRESH_CAP."""
        if Extension.SERVER_ENDPOINTS not in self.config.extensions or self.book is None:
            return False
        now = asyncio.get_running_loop().time()
        if self._next_refresh is None:
            self._next_refresh = now + self._refresh_interval
        if now < self._next_refresh:
            return False
        self._refresh_interval = min(self._refresh_interval * 2, HEADER_REFRESH_CAP)
        self._next_refresh = now + self._refresh_interval
        log.log(V(4), "dialling the balancer to refresh the servers' endpoint lists")
        return True

    async def _run_direct(self) -> None:
        assert self.book is not None
        book = self.book
        loop = asyncio.get_running_loop()
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                for source, endpoints in self.sources.items():
                    book.set_source(source, endpoints())
                for source, n in book.counts().items():
                    discovery_metrics.SERVER_ENDPOINTS.labels(source.value).set(n)
                self._update_gauges()
                now = loop.time()
                if not self.draining:
                    for address in book.due(now, self.clients.keys()):
                        if len(in_flight) >= MAX_DIRECT_ATTEMPTS:
                            break
                        book.started(address)
                        task = loop.create_task(self._dial_direct(address))
                        in_flight.add(task)
                        task.add_done_callback(in_flight.discard)
                await self._wait_direct(book.next_due(self.clients.keys()), now)
        finally:
            for task in in_flight:
                task.cancel()

    async def _wait_direct(self, next_due: float | None, now: float) -> None:
        """Until a change, the next due address, or a source poll (each sync interval)."""
        delay = self.sync_interval
        if next_due is not None:
            delay = min(delay, max(0.0, next_due - now))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _dial_direct(self, address: Address) -> None:
        assert self.book is not None
        loop = asyncio.get_running_loop()
        config = dataclasses.replace(self.config, host=address.host, port=address.port)
        client = self._client_factory(config, self.pool, self._removed)
        self._connecting.add(client)
        try:
            await client.connect()
        except ConnectError as exc:
            log.log(V(2), "direct endpoint %s: %s", address, exc)
            self._count_attempt(discovery_metrics.PATH_DIRECT, discovery_metrics.RESULT_ERROR)
            self.book.failed(address, loop.time())
            return
        finally:
            self._connecting.discard(client)
            self._wake.set()
        self._learn_endpoints(client)
        if self._stop.is_set() or self.draining or client.server_id in self.clients:
            client.close("duplicate")
            self._prune_answers()
            self._count_attempt(discovery_metrics.PATH_DIRECT, discovery_metrics.RESULT_DUPLICATE)
            log.log(V(4), "direct endpoint %s: duplicate server: %s", address, client.server_id)
            self.book.connected(address, client.server_id, kept=False)
            return
        self._count_attempt(discovery_metrics.PATH_DIRECT, discovery_metrics.RESULT_NEW)
        self.book.connected(address, client.server_id, kept=True)
        self._via[client] = address
        self._adopt(client, self.known_count(), discovery_metrics.PATH_DIRECT)

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
        for client in list(self._connecting):
            client.close("stopping")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for client in list(self.clients.values()):
            client.close("stopping")
        self.clients.clear()
        self._update_gauges()
