"""The proxy-server process: listeners started in upstream's order, then stopped on request.

``run(options, stop)`` takes validated options (``cli.server_options.ProxyRunOptions``
satisfies ``RunOptions``; the server layer does not import the CLI) and:

1. starts the gRPC frontend on ``--uds-name`` (created under umask 0007, an existing file
   removed first when ``--delete-existing-uds-file``), then the agent listener with
   ``--cluster-cert``/``--cluster-key`` (mTLS when ``--cluster-ca-cert`` is set); an error
   here is fatal (exit 1);
2. starts the admin server, then the health server (a listen error is only logged);
3. waits for ``stop``, then closes health and admin first, and the listeners after them
   (bounded by ``--graceful-shutdown-timeout`` when it is positive).

Not served yet: ``--mode=http-connect``, the TCP+mTLS frontend (no ``--uds-name``), token
authentication and the lease controller: ``run`` says so in one line and returns 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Protocol

from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.server.health import admin_routes, health_routes, start_http
from konnectivity_fast.server.http_connect import start_http_connect_tcp, start_http_connect_uds
from konnectivity_fast.server.proxy import (
    ProxyServer,
    ServerHandle,
    TlsSettings,
    start_agent_listener,
    start_frontend_tcp,
    start_frontend_uds,
)
from konnectivity_fast.transport import tls
from konnectivity_fast.transport.grpc import GrpcServer

__all__ = ["RunOptions", "run", "unsupported"]

log = logging.getLogger(__name__)

UDS_UMASK = 0o007


class RunOptions(Protocol):
    """The fields of ``ProxyRunOptions`` the process uses."""

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


def unsupported(options: RunOptions) -> str | None:
    """Why this build cannot run ``options`` yet, or ``None``."""
    if options.enable_lease_controller:
        return "--enable-lease-controller is not supported yet by konnectivity-fast"
    if options.needs_kubernetes_client:
        return "agent token authentication is not supported yet by konnectivity-fast"
    if not options.cluster_cert or not options.cluster_key:
        return "--cluster-cert and --cluster-key are required by the agent listener"
    return None


def _strategies(text: str) -> list[str]:
    return [item for item in text.split(",") if item]


def _tls_settings(options: RunOptions) -> TlsSettings:
    return TlsSettings(tls.tls_version(options.tls_min_version), tuple(options.cipher_suites))


async def _frontend_uds(proxy: ProxyServer, options: RunOptions) -> GrpcServer | asyncio.Server:
    path = options.uds_name
    if options.delete_uds_file and os.path.lexists(path):
        os.unlink(path)
    old = os.umask(UDS_UMASK)
    try:
        if options.mode == "http-connect":
            return await start_http_connect_uds(proxy, path)
        return await start_frontend_uds(
            proxy, path, keepalive_time=options.frontend_keepalive_time
        )
    finally:
        os.umask(old)


async def _frontend_tcp(proxy: ProxyServer, options: RunOptions) -> GrpcServer | asyncio.Server:
    host, port = options.server_bind_address or None, options.server_port
    cert, key, ca = options.server_cert, options.server_key, options.server_ca_cert
    settings = _tls_settings(options)
    if options.mode == "http-connect":
        return await start_http_connect_tcp(
            proxy, host=host, port=port, cert_file=cert, key_file=key, client_ca_file=ca,
            tls_settings=settings,
        )
    return await start_frontend_tcp(
        proxy, host=host, port=port, cert_file=cert, key_file=key, client_ca_file=ca,
        tls_settings=settings, keepalive_time=options.frontend_keepalive_time,
    )


async def _listen(proxy: ProxyServer, options: RunOptions) -> ServerHandle:
    handle = ServerHandle(proxy)
    log.info("Starting frontend server for client connections.")
    if options.uds_name:
        handle.servers.append(await _frontend_uds(proxy, options))
    else:
        handle.servers.append(await _frontend_tcp(proxy, options))
    try:
        log.info("Starting agent server for tunnel connections.")
        handle.servers.append(
            await start_agent_listener(
                proxy,
                host=options.agent_bind_address or None,
                port=options.agent_port,
                cert_file=options.cluster_cert,
                key_file=options.cluster_key,
                client_ca_file=options.cluster_ca_cert or None,
                tls_settings=_tls_settings(options),
                keepalive_time=options.keepalive_time,
            )
        )
    except BaseException:
        await handle.close()
        raise
    return handle


async def _close_http(servers: list[asyncio.Server]) -> None:
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()


async def run(options: RunOptions, stop: asyncio.Event) -> int:
    """Serve until ``stop`` is set; the process's exit code."""
    reason = unsupported(options)
    if reason is not None:
        log.error("%s", reason)
        return 1
    strategies = _strategies(options.proxy_strategies)
    server_metrics.startup(strategies)
    proxy = ProxyServer(
        server_id=options.server_id,
        server_count=options.server_count,
        strategies=strategies,
        dial_timeout=options.backend_dial_timeout,
    )
    try:
        handle = await _listen(proxy, options)
    except (OSError, ValueError) as exc:
        log.error("failed to run the proxy server: %s", exc)
        proxy.close()
        return 1
    http: list[asyncio.Server] = []
    log.info("Starting admin server for debug connections.")
    admin = await start_http(
        "admin", options.admin_bind_address, options.admin_port, admin_routes()
    )
    if admin is not None:
        http.append(admin)
    log.info("Starting health server for healthchecks.")
    health = await start_http(
        "health",
        options.health_bind_address,
        options.health_port,
        health_routes(lambda: proxy.router.ready),
    )
    if health is not None:
        http.append(health)
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
    timeout = options.graceful_shutdown_timeout
    if timeout > 0:
        try:
            await asyncio.wait_for(asyncio.gather(_close_http(http), handle.close()), timeout)
        except TimeoutError:
            log.warning("graceful shutdown did not finish within %ss", timeout)
    else:
        await _close_http(http)
        await handle.close()
    log.info("Proxy server stopped.")
    return 0
