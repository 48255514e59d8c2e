"""The proxy-server's asyncio adapters (docs/architecture.md, "The layers").

``proxy``: ``ProxyServer`` (the gRPC frontend and agent services around one
``tunnel.Router``); ``listeners``: the ``start`` helpers for its listeners. ``http_connect``: the
HTTP-CONNECT frontend (``HttpConnectProtocol``) and its listeners. The service names and
paths served are re-exported from their home, ``wire.contract``.
"""

from __future__ import annotations

from konnectivity_fast.server.http_connect import (
    HttpConnectProtocol,
    start_http_connect_tcp,
    start_http_connect_uds,
)
from konnectivity_fast.server.listeners import (
    ServerHandle,
    start,
    start_agent_listener,
    start_frontend_uds,
)
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.wire.contract import AGENT_SERVICE, CONNECT_PATH, PROXY_PATH, PROXY_SERVICE

__all__ = [
    "AGENT_SERVICE",
    "CONNECT_PATH",
    "PROXY_PATH",
    "PROXY_SERVICE",
    "HttpConnectProtocol",
    "ProxyServer",
    "ServerHandle",
    "start",
    "start_agent_listener",
    "start_frontend_uds",
    "start_http_connect_tcp",
    "start_http_connect_uds",
]
