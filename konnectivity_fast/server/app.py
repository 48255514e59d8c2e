"""The proxy-server process: listeners started in upstream's order, then stopped on request.

``run(options, stop)`` takes validated options (``cli.server_options.ProxyRunOptions``
satisfies ``RunOptions``; the server layer does not import the CLI) and:

1. builds a Kubernetes client when token auth (``--agent-namespace``) or
   ``--enable-lease-controller`` needs one (``--kubeconfig``, else in-cluster);
2. starts the frontend (gRPC or HTTP-CONNECT, on ``--uds-name`` created under umask 0007,
   or TCP+mTLS on ``--server-port``), then the agent listener (TLS; mTLS with
   ``--cluster-ca-cert``); an error here is fatal (exit 1);
3. parses ``--lease-label`` (even when unused, as upstream: a bad value stops the process),
   starts the lease controller if enabled, then the admin server (``/metrics`` and our
   tunnel listing) and the health server (a listen error there is only logged). Ours: the
   ``ServerDirectory`` (server/directory.py) holds this server's
   ``--agent-advertise-address``, the lease controller writes it on the Lease and feeds the
   directory the Leases it lists, and agents that negotiate ``server-endpoints.v1`` are
   told every replica's address from it;
4. waits for ``stop``, then shuts down in upstream's two modes (``_stop_listeners``): health
   and admin go first; with ``--graceful-shutdown-timeout`` 0 the Lease is deleted, agents
   are dropped and the frontend stops gracefully; with a timeout everything stops
   gracefully together, what is left at the timeout is dropped, then the Lease goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Protocol

from konnectivity_fast.kube import ConfigError, KubeClient, load_config
from konnectivity_fast.metrics import accept as accept_metrics
from konnectivity_fast.metrics import flow as flow_metrics
from konnectivity_fast.metrics import node_to_cp as node_to_cp_metrics
from konnectivity_fast.metrics import peering as peer_metrics
from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.server.auth import TokenAuthenticator
from konnectivity_fast.server.directory import ServerDirectory
from konnectivity_fast.server.health import admin_routes, health_routes, start_http
from konnectivity_fast.server.http_connect import start_http_connect_tcp, start_http_connect_uds
from konnectivity_fast.server.leases import LeaseController, parse_lease_labels
from konnectivity_fast.server.listeners import (
    ServerHandle,
    TlsSettings,
    start_agent_listener,
    start_frontend_tcp,
    start_frontend_uds,
)
from konnectivity_fast.server.peering import (
    PeerForwarder,
    PeeringRunOptions,
    peer_advertised,
    start_peering,
)
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.server.reverse import NodeToCpConfig
from konnectivity_fast.server.startup import (
    StartupError,
    check_tls_files,
    tcp_listen_failure,
    unix_listen_failure,
)
from konnectivity_fast.server.tunnel_list import tunnels_handler
from konnectivity_fast.transport import tls
from konnectivity_fast.transport.accept import Listener, set_exhaustion_observer
from konnectivity_fast.transport.grpc import GrpcServer
from konnectivity_fast.wire.contract import (
    NO_EXTENSIONS,
    DialBalance,
    Extension,
    ExtensionSet,
    FrontendMode,
    parse_proxy_strategies,
)
from konnectivity_fast.wire.endpoints import parse_address

__all__ = ["RunOptions", "StartupError", "run"]

log = logging.getLogger(__name__)

UDS_UMASK = 0o007
# Upstream waits without a bound for kube-apiserver to end its Proxy streams when
# --graceful-shutdown-timeout is 0; we give them this long, so a client that keeps an idle
# stream open cannot hold the process (its pod would be killed at its grace period anyway).
GRACEFUL_FRONTEND_LIMIT = 30.0


class RunOptions(PeeringRunOptions, Protocol):
    """The fields of ``ProxyRunOptions`` the process uses (peering's in
    ``server.peering``)."""

    mode: str
    uds_name: str
    server_port: int
    server_bind_address: str
    server_cert: str
    server_key: str
    server_ca_cert: str
    delete_uds_file: bool
    agent_port: int
    agent_bind_address: str
    cluster_cert: str
    cluster_key: str
    cluster_ca_cert: str
    admin_port: int
    admin_bind_address: str
    health_port: int
    health_bind_address: str
    server_id: str
    server_count: int
    proxy_strategies: str
    backend_dial_timeout: float
    graceful_shutdown_timeout: float
    needs_kubernetes_client: bool
    keepalive_time: float
    frontend_keepalive_time: float
    cipher_suites: list[str]
    tls_min_version: str
    enable_lease_controller: bool
    lease_namespace: str
    lease_label: str
    agent_namespace: str
    agent_service_account: str
    authentication_audience: str
    kubeconfig_path: str
    kubeconfig_qps: float
    kubeconfig_burst: int
    agent_advertise_address: str  # ours: host:port, validated; empty when not set


def _tls_settings(options: RunOptions) -> TlsSettings:
    return TlsSettings(tls.tls_version(options.tls_min_version), tuple(options.cipher_suites))


async def _frontend_uds(proxy: ProxyServer, options: RunOptions) -> GrpcServer | Listener:
    path = options.uds_name
    if options.delete_uds_file and os.path.lexists(path):
        os.unlink(path)
    old = os.umask(UDS_UMASK)
    try:
        match FrontendMode(options.mode):  # mypy checks that every mode has a listener
            case FrontendMode.HTTP_CONNECT:
                return await start_http_connect_uds(proxy, path)
            case FrontendMode.GRPC:
                return await start_frontend_uds(
                    proxy, path, keepalive_time=options.frontend_keepalive_time
                )
    except OSError as exc:
        raise unix_listen_failure(path, exc) from None
    finally:
        os.umask(old)


async def _frontend_tcp(proxy: ProxyServer, options: RunOptions) -> GrpcServer | Listener:
    host, port = options.server_bind_address or None, options.server_port
    cert, key, ca = options.server_cert, options.server_key, options.server_ca_cert
    check_tls_files(cert, key, ca)
    settings = _tls_settings(options)
    try:
        match FrontendMode(options.mode):
            case FrontendMode.HTTP_CONNECT:
                return await start_http_connect_tcp(
                    proxy,
                    host=host,
                    port=port,
                    cert_file=cert,
                    key_file=key,
                    client_ca_file=ca,
                    tls_settings=settings,
                )
            case FrontendMode.GRPC:
                return await start_frontend_tcp(
                    proxy,
                    host=host,
                    port=port,
                    cert_file=cert,
                    key_file=key,
                    client_ca_file=ca,
                    tls_settings=settings,
                    keepalive_time=options.frontend_keepalive_time,
                )
    except OSError as exc:
        raise tcp_listen_failure(options.server_bind_address, port, exc) from None


async def _agent_listener(proxy: ProxyServer, options: RunOptions) -> GrpcServer:
    check_tls_files(options.cluster_cert, options.cluster_key, options.cluster_ca_cert)
    try:
        return await start_agent_listener(
            proxy,
            host=options.agent_bind_address or None,
            port=options.agent_port,
            cert_file=options.cluster_cert,
            key_file=options.cluster_key,
            client_ca_file=options.cluster_ca_cert or None,
            tls_settings=_tls_settings(options),
            keepalive_time=options.keepalive_time,
        )
    except OSError as exc:
        raise tcp_listen_failure(options.agent_bind_address, options.agent_port, exc) from None


async def _listen(proxy: ProxyServer, options: RunOptions) -> ServerHandle:
    """Steps 3-4; a failure is a ``StartupError`` in upstream's words."""
    handle = ServerHandle(proxy)
    log.info("Starting frontend server for client connections.")
    try:
        if options.uds_name:
            handle.servers.append(await _frontend_uds(proxy, options))
        else:
            handle.servers.append(await _frontend_tcp(proxy, options))
    except ValueError as exc:
        raise StartupError(f"failed to run the frontend server: {exc}") from None
    try:
        log.info("Starting agent server for tunnel connections.")
        handle.servers.append(await _agent_listener(proxy, options))
    except BaseException as exc:
        await handle.close()
        if isinstance(exc, ValueError):
            raise StartupError(f"failed to run the agent server: {exc}") from None
        raise
    return handle


async def _close_http(servers: list[Listener]) -> None:
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()


def _kube_client(options: RunOptions) -> KubeClient | None:
    """Step 2: a Kubernetes client when token auth or the lease controller needs one."""
    if not options.needs_kubernetes_client:
        return None
    return KubeClient(
        load_config(options.kubeconfig_path, options.kubeconfig_qps, options.kubeconfig_burst)
    )


def _authenticator(options: RunOptions, kube: KubeClient | None) -> TokenAuthenticator | None:
    if not options.agent_namespace or kube is None:
        return None
    return TokenAuthenticator(
        kube,
        options.agent_namespace,
        options.agent_service_account,
        options.authentication_audience,
    )


async def _start_http(proxy: ProxyServer, options: RunOptions) -> list[Listener]:
    """Step 7: admin, then health (a listen error there is only logged)."""
    servers: list[Listener] = []
    log.info("Starting admin server for debug connections.")
    admin = await start_http(
        "admin",
        options.admin_bind_address,
        options.admin_port,
        admin_routes(tunnels_handler(proxy)),
    )
    if admin is not None:
        servers.append(admin)
    log.info("Starting health server for healthchecks.")
    health = await start_http(
        "health",
        options.health_bind_address,
        options.health_port,
        health_routes(lambda: proxy.router.ready),
    )
    if health is not None:
        servers.append(health)
    return servers


async def run(
    options: RunOptions,
    stop: asyncio.Event,
    *,
    extensions: ExtensionSet = NO_EXTENSIONS,
    dial_balance: DialBalance = DialBalance.RANDOM,
    node_to_cp: NodeToCpConfig | None = None,
) -> int:
    """Serve until ``stop`` is set; the process's exit code. A start-up failure raises
    ``StartupError`` with upstream's message. ``extensions``: what the server offers to
    agents and frontends (``wire.contract``). ``dial_balance``: how dials choose among a
    strategy's candidate agents (``tunnel.balance``). ``node_to_cp``: agent-initiated
    connections (``server.reverse``), None when off."""
    try:
        kube = _kube_client(options)
    except ConfigError as exc:
        raise StartupError(f"failed to load kubernetes client config: {exc}") from None
    strategies = parse_proxy_strategies(options.proxy_strategies)
    server_metrics.startup(strategies)
    # Failed accepts (descriptor exhaustion) are counted; nothing shows until one.
    accept_metrics.enable(server_metrics.REGISTRY)
    set_exhaustion_observer(accept_metrics.exhausted)
    if Extension.FLOW in extensions:
        flow_metrics.enable(server_metrics.REGISTRY)
    proxy = ProxyServer(
        server_id=options.server_id,
        server_count=options.server_count,
        strategies=strategies,
        dial_timeout=options.backend_dial_timeout,
        authenticator=_authenticator(options, kube),
        extensions=extensions,
        dial_balance=dial_balance,
        forward_dials=options.enable_peer_forwarding,
        node_to_cp=node_to_cp,
    )
    if proxy.node_to_cp is not None:
        node_to_cp_metrics.enable(server_metrics.REGISTRY)
        log.info(
            "Agents may dial %s through this server (%s).",
            proxy.node_to_cp.allowed,
            Extension.NODE_TO_CP,
        )
    directory = _directory(options, proxy.server_id)
    proxy.server_endpoints = directory.agent_endpoints
    if options.enable_peer_forwarding:
        peer_metrics.enable(server_metrics.REGISTRY)
    if dial_balance is not DialBalance.RANDOM:
        log.info("Dials go to the candidate agent with the fewest open tunnels (%s).", dial_balance)
    try:
        return await _serve(proxy, options, kube, stop, directory)
    finally:
        proxy.close()
        if kube is not None:
            await kube.close()


def _directory(options: RunOptions, server_id: str) -> ServerDirectory:
    """This server's entry from its flags; the others come from the Leases it lists."""
    advertised = options.agent_advertise_address
    try:
        endpoint = parse_address(advertised) if advertised else None
    except ValueError as exc:  # the command line checks it first; an embedder may not
        raise StartupError(f"invalid --agent-advertise-address: {exc}") from None
    directory = ServerDirectory(
        server_id, agent_endpoint=endpoint, peer_endpoint=peer_advertised(options)
    )
    if advertised:
        log.info("Agents are told to reach this server at %s.", directory.agent_endpoint)
    return directory


async def _serve(
    proxy: ProxyServer,
    options: RunOptions,
    kube: KubeClient | None,
    stop: asyncio.Event,
    directory: ServerDirectory,
) -> int:
    handle = await _listen(proxy, options)
    forwarder = await _start_peering(proxy, options, handle, directory)
    leases: LeaseController | None = None
    try:
        labels = parse_lease_labels(options.lease_label)  # step 5, even when unused
    except ValueError as exc:
        await _stop_listeners(handle, 0.0)
        raise StartupError(str(exc)) from None
    if options.enable_lease_controller and kube is not None:
        leases = LeaseController(
            kube,
            proxy.server_id,
            options.lease_namespace,
            labels,
            annotations=directory.own_annotations(),
            on_list=directory.update,
        )
        leases.start()
    http = await _start_http(proxy, options)
    frontend = options.uds_name or f"{options.server_bind_address}:{options.server_port}"
    log.info(
        "Proxy server %s ready: %s frontend on %s, agents on port %s",
        proxy.server_id,
        options.mode,
        frontend,
        handle.agent_port,
    )
    await stop.wait()
    log.info("Shutting down server.")
    proxy.drain_agents()  # node-to-cp.v1 streams only
    timeout = options.graceful_shutdown_timeout
    await _close_http(http)  # health goes away at once, in both modes
    if timeout <= 0 and leases is not None:
        await leases.stop()
    await _stop_listeners(handle, timeout)
    if timeout > 0 and leases is not None:
        await leases.stop()
    if forwarder is not None:
        await forwarder.close()
    log.info("Proxy server stopped.")
    return 0


async def _start_peering(
    proxy: ProxyServer, options: RunOptions, handle: ServerHandle, directory: ServerDirectory
) -> PeerForwarder | None:
    """Server peering (``server.peering``), with ``--enable-peer-forwarding``: the
    forwarder (peers: ``--peer-endpoints``, then the other servers' Leases), and the peer
    listener (stopped with the agent listener)."""
    if not options.enable_peer_forwarding:
        return None
    try:
        forwarder, listener = await start_peering(
            proxy, options, _tls_settings(options), extra_peers=directory.peer_endpoints
        )
    except ValueError as exc:
        await _stop_listeners(handle, 0.0)
        raise StartupError(f"failed to run the peer server: {exc}") from None
    if listener is not None:
        handle.servers.append(listener)
    return forwarder


async def _stop_listeners(handle: ServerHandle, timeout: float) -> None:
    """Upstream's two shutdown modes (cmd/server/app/server.go ``Proxy.Run``; with
    ``timeout`` 0 in the order of upstream's later main branch, docs/differences.md).
    ``timeout`` 0: drop the agents at once, then stop the frontend gracefully (its clients
    finish their streams, bounded by ``GRACEFUL_FRONTEND_LIMIT``); ``timeout`` > 0: stop
    both gracefully, and whatever is left after ``timeout`` is dropped."""
    frontend, agents = handle.servers[0], handle.servers[1:]
    if timeout <= 0:
        for server in agents:
            _abort(server)
        _stop_gracefully(frontend)
        await _wait_stopped([frontend, *agents], GRACEFUL_FRONTEND_LIMIT)
    else:
        for server in handle.servers:
            _stop_gracefully(server)
        await _wait_stopped(handle.servers, timeout)
    handle.proxy.close()


def _abort(server: GrpcServer | Listener) -> None:
    if isinstance(server, GrpcServer):
        server.abort()
    else:
        server.close()


def _stop_gracefully(server: GrpcServer | Listener) -> None:
    if isinstance(server, GrpcServer):
        server.stop_gracefully()
    else:  # HTTP-CONNECT: stop listening; established tunnels are not tracked (as upstream)
        server.close()


async def _wait_stopped(servers: list[GrpcServer | Listener], timeout: float) -> None:
    waits = [s.wait_stopped() if isinstance(s, GrpcServer) else s.wait_closed() for s in servers]
    try:
        await asyncio.wait_for(asyncio.gather(*waits), timeout)
    except TimeoutError:
        log.warning("graceful shutdown did not finish within %ss; closing what is left", timeout)
        for server in servers:
            _abort(server)
        await asyncio.gather(*(s.wait_closed() for s in servers))
