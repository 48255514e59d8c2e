"""The proxy-agent process: ``run(options, stop, drain)`` (upstream's
cmd/agent/app/server.go ``Agent.Run`` and ``runProxyConnection``).

Start-up in upstream's order: build the TLS configuration (CA, optional client pair, ALPN;
errors are fatal: ``failed to run proxy connection with ...``), start lease counting when
asked (the seam below), start the ``ClientSet`` sync loop, then the health server, then
the admin server (``/metrics``'s redirect and our tunnel listing; a listen failure is
only logged). Then:

- ``drain`` set (first SIGTERM/SIGINT): the node-to-control-plane listeners close first
  (``node_to_cp``, agent/reverse.py), then one DRAIN on every server stream, no new server
  connections; existing streams keep serving dials; readiness is unchanged;
- ``stop`` set (second signal): close the HTTP servers and every server connection and
  return 0.

``options`` is anything with the fields of ``AgentRunOptions``
(``cli.agent_options.GrpcProxyAgentOptions`` has them; this layer does not import the CLI).

Lease counting (``--count-server-leases``) needs a Kubernetes client. ``run`` takes it as a
``LeaseCounter`` (``agent.leases.LeaseCounter`` is one; ``start()`` returns once the lease
cache is synced, as upstream blocks start-up on it; ``count()`` gives the number of valid
server Leases) built by the caller; without one, ``--count-server-leases`` is refused at
start-up. A stop while start-up waits for the lease cache ends ``run`` cleanly.

Start-up errors raise ``SetupError`` (its text follows ``failed to run proxy connection
with``, in upstream's words) for the caller to report; ``run`` itself prints nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
from collections.abc import Mapping
from random import Random
from typing import Protocol

from konnectivity_fast.agent.clientset import ClientSet, EndpointSource
from konnectivity_fast.agent.connect import ClientConfig
from konnectivity_fast.agent.discovery import EndpointBook, Source
from konnectivity_fast.agent.health import admin_routes, health_routes, start_http
from konnectivity_fast.agent.policy import ServerCounter
from konnectivity_fast.agent.reverse import (
    ListenError,
    LocalListeners,
    NodeToCpConfig,
    ReverseStream,
)
from konnectivity_fast.agent.tunnel_list import tunnels_handler
from konnectivity_fast.metrics import accept as accept_metrics
from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.metrics import flow as flow_metrics
from konnectivity_fast.metrics import reverse as reverse_metrics
from konnectivity_fast.transport.accept import Listener, set_exhaustion_observer
from konnectivity_fast.transport.tls import H2_ALPN
from konnectivity_fast.wire.contract import NO_EXTENSIONS, Extension, ExtensionSet
from konnectivity_fast.wire.endpoints import Address, parse_address_list

__all__ = [
    "AgentRunOptions",
    "EndpointWatcher",
    "LeaseCounter",
    "SetupError",
    "build_ssl_context",
    "discovery_names",
    "run",
]

log = logging.getLogger(__name__)

_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class AgentRunOptions(Protocol):
    """The fields of ``GrpcProxyAgentOptions`` the process uses."""

    agent_cert: str
    agent_key: str
    ca_cert: str
    proxy_server_host: str
    proxy_server_port: int
    alpn_protos: list[str]
    health_server_host: str
    health_server_port: int
    admin_bind_address: str
    admin_server_port: int
    agent_id: str
    agent_identifiers: str
    sync_interval: float
    probe_interval: float
    sync_interval_cap: float
    keepalive_time: float
    service_account_token_path: str
    sync_forever: bool
    warn_on_channel_limit: bool
    count_server_leases: bool
    server_count_source: str
    proxy_server_list: str
    server_discovery: str
    proxy_server_tls_name: str


class LeaseCounter(Protocol):
    """Counts the valid proxy-server Leases (``--count-server-leases``); ``endpoints``:
    the agent endpoints our servers publish on them (``--server-discovery=leases``)."""

    async def start(self) -> None: ...
    def count(self) -> int: ...
    def endpoints(self) -> Mapping[Address, str]: ...
    async def close(self) -> None: ...


class EndpointWatcher(Protocol):
    """Ready endpoints of the proxy-servers' Service (``--server-discovery=service``)."""

    async def start(self) -> None: ...
    def endpoints(self) -> Mapping[Address, str]: ...
    async def close(self) -> None: ...


class SetupError(Exception):
    """A fatal start-up error; the text follows ``failed to run proxy connection with``."""


def _go_read_error(path: str, exc: OSError) -> str:
    """Go's ``os.ReadFile`` error text: Python fails a folder at open, Go at read."""
    clean = os.path.normpath(path) if path else "."
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    verb = "read" if exc.errno == errno.EISDIR else "open"
    return f"{verb} {clean}: {reason[:1].lower()}{reason[1:]}"


def _load_key_pair(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    """``tls.LoadX509KeyPair`` with Go's words for the common failures."""
    for path, what in ((cert, "certificate"), (key, "key")):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SetupError(
                f"failed to load X509 key pair {cert} and {key}: {_go_read_error(path, exc)}"
            ) from None
        if b"-----BEGIN" not in data:
            raise SetupError(
                f"failed to load X509 key pair {cert} and {key}: "
                f"tls: failed to find any PEM data in {what} input"
            )
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise SetupError(f"failed to load X509 key pair {cert} and {key}: {exc}") from None


def build_ssl_context(options: AgentRunOptions) -> ssl.SSLContext:
    """The agent's TLS client configuration (upstream's pkg/util/certificates.go
    GetClientTLSConfig): trust only ``--ca-cert`` (read even when empty, as upstream, so an
    empty flag fails), the client pair when either is set, TLS 1.2 at least, ALPN
    ``--alpn-proto`` values then ``h2``."""
    try:
        with open(options.ca_cert or ".", "rb") as f:
            ca = f.read()
    except OSError as exc:
        raise SetupError(
            f"failed to read CA cert {options.ca_cert}: {_go_read_error(options.ca_cert, exc)}"
        ) from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if _PEM_CERT not in ca:
            raise ssl.SSLError("no certificate")
        ctx.load_verify_locations(cadata=ca.decode("latin-1"))
    except (ssl.SSLError, ValueError):
        raise SetupError("failed to append CA cert to the cert pool") from None
    if options.agent_cert or options.agent_key:
        _load_key_pair(ctx, options.agent_cert, options.agent_key)
    alpn = list(options.alpn_protos)
    if H2_ALPN not in alpn:  # grpc-go appends h2 unless it is already offered
        alpn.append(H2_ALPN)
    ctx.set_alpn_protocols(alpn)
    return ctx


def discovery_names(text: str) -> frozenset[str]:
    """The ``--server-discovery`` names (the CLI checked them)."""
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def client_config(
    options: AgentRunOptions,
    ctx: ssl.SSLContext,
    extensions: ExtensionSet = NO_EXTENSIONS,
) -> ClientConfig:
    return ClientConfig(
        host=options.proxy_server_host,
        port=options.proxy_server_port,
        ssl_context=ctx,
        agent_id=options.agent_id,
        agent_identifiers=options.agent_identifiers,
        token_path=options.service_account_token_path,
        keepalive_time=options.keepalive_time,
        probe_interval=options.probe_interval,
        server_name=options.proxy_server_tls_name or options.proxy_server_host,
        warn_on_channel_limit=options.warn_on_channel_limit,
        extensions=extensions,
    )


def _capable_streams(clients: ClientSet) -> list[ReverseStream]:
    """Server streams that negotiated node-to-cp.v1 and may take a new connection."""
    return [
        client.reverse
        for client in clients.clients.values()
        if client.reverse is not None and client.ready and not client.server_draining
    ]


def _start_listeners(
    node_to_cp: NodeToCpConfig | None, clients: ClientSet
) -> LocalListeners | None:
    """Node-to-control-plane: its metrics and listeners, before any server connection, so
    that a local port in use fails start-up."""
    if node_to_cp is None:
        return None
    reverse_metrics.enable(agent_metrics.REGISTRY)
    listeners = LocalListeners(node_to_cp, lambda: _capable_streams(clients))
    try:
        listeners.start()
    except ListenError as exc:
        raise SetupError(str(exc)) from None
    return listeners


async def _drain_when(
    drain: asyncio.Event, clients: ClientSet, listeners: LocalListeners | None = None
) -> None:
    await drain.wait()
    if listeners is not None:
        log.info("Received drain signal: closing the node-to-control-plane listeners.")
        listeners.close()
    log.info("Received drain signal: sending DRAIN to every server, no new connections.")
    clients.drain()


async def _start_leases(lease_counter: LeaseCounter, stop: asyncio.Event) -> bool:
    """Wait for the lease cache to sync, or for ``stop``; False (counter closed) if
    stopped first."""
    loop = asyncio.get_running_loop()
    starting = loop.create_task(lease_counter.start())
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        try:
            starting.result()
        except BaseException:
            await lease_counter.close()
            raise
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await starting
    await lease_counter.close()
    return False


async def run(
    options: AgentRunOptions,
    stop: asyncio.Event,
    drain: asyncio.Event | None = None,
    *,
    lease_counter: LeaseCounter | None = None,
    service_watcher: EndpointWatcher | None = None,
    extensions: ExtensionSet = NO_EXTENSIONS,
    node_to_cp: NodeToCpConfig | None = None,
) -> int:
    """Serve until ``stop`` is set; the process's exit code. Raises ``SetupError``.
    ``extensions``: what the agent offers each server (``wire.contract``);
    ``node_to_cp``: the node-to-control-plane listeners, when the feature is active (the
    caller then offers ``node-to-cp.v1``)."""
    ctx = build_ssl_context(options)
    # Failed accepts (descriptor exhaustion) are counted; nothing shows until one.
    accept_metrics.enable(agent_metrics.REGISTRY)
    set_exhaustion_observer(accept_metrics.exhausted)
    if Extension.FLOW in extensions:
        flow_metrics.enable(agent_metrics.REGISTRY)
    counter = ServerCounter()
    if options.count_server_leases:
        if lease_counter is None:
            raise SetupError("--count-server-leases needs a lease counter")
        if not await _start_leases(lease_counter, stop):
            return 0
        counter = ServerCounter(lease_counter.count, options.server_count_source)
    sources = _direct_sources(options, lease_counter, service_watcher)
    if service_watcher is not None:
        await service_watcher.start()
    clients = ClientSet(
        client_config(options, ctx, extensions),
        sync_interval=options.sync_interval,
        sync_interval_cap=options.sync_interval_cap,
        sync_forever=options.sync_forever,
        counter=counter,
        book=EndpointBook(options.sync_interval, options.sync_interval_cap, Random())
        if sources is not None
        else None,
        sources=sources,
    )
    listeners = _start_listeners(node_to_cp, clients)
    clients.start()
    http: list[Listener] = []
    health = await start_http(
        "health",
        options.health_server_host,
        options.health_server_port,
        health_routes(lambda: clients.healthy_clients_count > 0),
    )
    if health is not None:
        http.append(health)
    admin = await start_http(
        "admin",
        options.admin_bind_address,
        options.admin_server_port,
        admin_routes(options.health_server_port, tunnels_handler(options.agent_id, clients)),
    )
    if admin is not None:
        http.append(admin)
    log.info(
        "proxy-agent %s connecting to %s:%d",
        options.agent_id,
        options.proxy_server_host,
        options.proxy_server_port,
    )
    drainer = asyncio.get_running_loop().create_task(
        _drain_when(drain or asyncio.Event(), clients, listeners)
    )
    try:
        await stop.wait()
    finally:
        log.info("Shutting down agent.")
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
        for server in http:
            server.close()
        if listeners is not None:
            await listeners.stop()
        await clients.stop()
        for server in http:
            await server.wait_closed()
        if lease_counter is not None and options.count_server_leases:
            await lease_counter.close()
        if service_watcher is not None:
            await service_watcher.close()
    return 0


def _direct_sources(
    options: AgentRunOptions,
    lease_counter: LeaseCounter | None,
    service_watcher: EndpointWatcher | None,
) -> dict[Source, EndpointSource] | None:
    """The direct endpoint sources the flags ask for; None: upstream's agent (the header
    source is the ``ClientSet``'s own)."""
    discovery = discovery_names(options.server_discovery)
    if not options.proxy_server_list and not discovery:
        return None
    sources: dict[Source, EndpointSource] = {}
    if options.proxy_server_list:
        static = dict.fromkeys(parse_address_list(options.proxy_server_list), "")
        sources[Source.STATIC] = lambda: static
    if "leases" in discovery:
        if lease_counter is None:
            raise SetupError("--server-discovery=leases needs --count-server-leases")
        sources[Source.LEASE] = lease_counter.endpoints
    if "service" in discovery:
        if service_watcher is None:
            raise SetupError("--server-discovery=service needs --proxy-server-service")
        sources[Source.SERVICE] = service_watcher.endpoints
    return sources
