"""The proxy-server's gRPC listeners around a ``ProxyServer`` (upstream's
cmd/server/app/server.go runUDSFrontendServer, runMTLSFrontendServer, runAgentServer).

- ``start_frontend_uds``: the gRPC frontend on a Unix socket, h2c, no auth;
- ``start_frontend_tcp``: the gRPC frontend on TCP, mTLS always;
- ``start_agent_listener``: the agent listener, TLS, mTLS with a CA;
- ``ServerHandle``: the running listeners, closed together.

Keepalive and ping enforcement default to what upstream configures on grpc-go
(``AGENT_ENGINE_DEFAULTS``, ``FRONTEND_ENGINE_DEFAULTS``); ``--tls-min-version`` and
``--cipher-suites`` arrive as ``TlsSettings``.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any

from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.transport import tls
from konnectivity_fast.transport.accept import Listener
from konnectivity_fast.transport.grpc import GrpcServer, serve

__all__ = [
    "AGENT_ENGINE_DEFAULTS",
    "DEFAULT_TLS",
    "FRONTEND_ENGINE_DEFAULTS",
    "ServerHandle",
    "TlsSettings",
    "start",
    "start_agent_listener",
    "start_frontend_tcp",
    "start_frontend_uds",
]


@dataclass
class ServerHandle:
    """A running proxy-server's listeners. ``close()`` stops listening and ends every
    connection (GOAWAY, then abort after a grace period)."""

    proxy: ProxyServer
    servers: list[GrpcServer | Listener] = field(default_factory=list)

    @property
    def agent_port(self) -> int | None:
        """The agent listener's TCP port (useful with port 0), if any."""
        for server in self.servers:
            for sock in server.sockets:
                name = sock.getsockname()
                if isinstance(name, tuple):
                    return int(name[1])
        return None

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for server in self.servers:
            await server.wait_closed()
        self.proxy.close()


#: Control frames an agent connection may send at once, and per second after that, before
#: it is refused (the engine's flood guard, csrc/h2_flood.pxi): the engine's defaults, as
#: on the frontends. An agent's control frames are mostly its SETTINGS and PINGs
#: (keepalive, and those that answer our data: grpc-go's BDP pings); WINDOW_UPDATEs are
#: not counted (grpcio sends two per message, and they only ever let us send more). A
#: grpcio agent carrying 1000 tunnels spent a budget of a tenth of this in a second
#: (tests/server/test_scenarios_bulk.py). A reset flood costs little beyond the budget:
#: streams reset in the read that opened them never become calls.
AGENT_CONTROL_FRAME_BURST = 10000
AGENT_CONTROL_FRAME_RATE = 1000.0

#: grpc-go's keepalive defaults as upstream sets them (cmd/server/app/server.go
#: runAgentServer; grpc-go internal/transport/defaults.go). Agent listener: a ping after
#: ``--keepalive-time`` of silence; clients may ping every 30 s, even with no stream open.
AGENT_ENGINE_DEFAULTS: dict[str, Any] = {
    "keepalive_time": 3600.0,
    "min_ping_interval": 30.0,
    "ping_without_streams": True,
    "control_frame_burst": AGENT_CONTROL_FRAME_BURST,
    "control_frame_rate": AGENT_CONTROL_FRAME_RATE,
}
#: Frontend listener: a ping after ``--frontend-keepalive-time``; grpc-go's default policy
#: (pings every 5 min at most, none without a stream).
FRONTEND_ENGINE_DEFAULTS: dict[str, Any] = {
    "keepalive_time": 3600.0,
    "min_ping_interval": 300.0,
    "ping_without_streams": False,
}


@dataclass(frozen=True)
class TlsSettings:
    """``--tls-min-version`` and ``--cipher-suites``, for both TLS listeners."""

    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    go_ciphers: tuple[str, ...] = ()

    def server_context(
        self,
        cert_file: str,
        key_file: str,
        client_ca_file: str | None,
        alpn: tuple[str, ...] = (tls.H2_ALPN,),
    ) -> ssl.SSLContext:
        """A listener's TLS context with these settings."""
        return tls.server_context(
            cert_file,
            key_file,
            client_ca_file,
            alpn=alpn,
            minimum_version=self.minimum_version,
            go_ciphers=self.go_ciphers,
        )


DEFAULT_TLS = TlsSettings()


async def start_frontend_uds(proxy: ProxyServer, path: str, **engine_options: Any) -> GrpcServer:
    """The gRPC frontend on a Unix socket: plaintext h2c, no auth (upstream's
    runUDSFrontendServer)."""
    options = {**FRONTEND_ENGINE_DEFAULTS, **engine_options}
    return await serve(proxy.frontend_service, path=path, name="frontend", **options)


async def start_frontend_tcp(
    proxy: ProxyServer,
    *,
    host: str | None,
    port: int,
    cert_file: str,
    key_file: str,
    client_ca_file: str,
    tls_settings: TlsSettings = DEFAULT_TLS,
    **engine_options: Any,
) -> GrpcServer:
    """The gRPC frontend on TCP: mTLS always, client certificates verified against
    ``client_ca_file`` (upstream's runMTLSFrontendServer)."""
    ctx = tls_settings.server_context(cert_file, key_file, client_ca_file)
    options = {**FRONTEND_ENGINE_DEFAULTS, **engine_options}
    return await serve(
        proxy.frontend_service, host=host, port=port, ssl=ctx, name="frontend", **options
    )


async def start_agent_listener(
    proxy: ProxyServer,
    *,
    host: str | None,
    port: int,
    cert_file: str,
    key_file: str,
    client_ca_file: str | None = None,
    tls_settings: TlsSettings = DEFAULT_TLS,
    **engine_options: Any,
) -> GrpcServer:
    """The agent listener: TCP with TLS (ALPN h2), client certificates required and verified
    when ``client_ca_file`` is given (upstream's runAgentServer and getTLSConfig)."""
    ctx = tls_settings.server_context(cert_file, key_file, client_ca_file)
    options = {**AGENT_ENGINE_DEFAULTS, **engine_options}
    return await serve(proxy.agent_service, host=host, port=port, ssl=ctx, name="agent", **options)


async def start(
    proxy: ProxyServer,
    *,
    uds_path: str,
    agent_host: str | None,
    agent_port: int,
    cert_file: str,
    key_file: str,
    client_ca_file: str | None = None,
) -> ServerHandle:
    """Both listeners of a gRPC-mode proxy-server with ``--uds-name``."""
    handle = ServerHandle(proxy)
    try:
        handle.servers.append(await start_frontend_uds(proxy, uds_path))
        handle.servers.append(
            await start_agent_listener(
                proxy,
                host=agent_host,
                port=agent_port,
                cert_file=cert_file,
                key_file=key_file,
                client_ca_file=client_ca_file,
            )
        )
    except BaseException:
        await handle.close()
        raise
    return handle
