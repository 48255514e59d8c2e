"""Server peering's listener (ours, beyond upstream; docs/high-availability.md, "Server
peering"): where peer servers forward the dials they have no agent for.

``start_peer_listener`` serves ``ProxyService`` over TCP with mTLS: a peer must present a
certificate chaining to the peer CA. Every stream it accepts is a *forwarded* frontend
(``ProxyServer._open_frontend(forwarded=True)``): its dials are served by this server's
agents only, never forwarded again (hop limit 1), whatever its metadata says; otherwise it
is a frontend like any other, with the same buffering (its own sink, unwrapped, so the data
path's budgets apply). The streams opened toward peers are ``server.peering``'s.

Invariant: the ``forwarded`` peer-streams gauge counts each accepted stream from its
opening to its close, once.
"""

from __future__ import annotations

import asyncio
import logging

from konnectivity_fast.metrics import peering as peer_metrics
from konnectivity_fast.server.listeners import FRONTEND_ENGINE_DEFAULTS, TlsSettings
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.transport.call import CallSink, GrpcCall
from konnectivity_fast.transport.grpc import GrpcServer, serve
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.contract import PROXY_PATH, PROXY_SERVICE
from konnectivity_fast.wire.endpoints import MD_FORWARDED_FROM
from konnectivity_fast.wire.errors import StatusCode

__all__ = ["start_peer_listener"]

log = logging.getLogger(__name__)


class _RefusedSink:
    __slots__ = ()

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        pass

    def on_end(self, call: GrpcCall) -> None:
        pass

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        pass


class _PeerService:
    """``ProxyService`` for peers: every stream is a forwarded frontend."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: ProxyServer) -> None:
        self.proxy = proxy

    def open_call(self, call: GrpcCall) -> CallSink:
        if call.path != PROXY_PATH:
            call.finish(StatusCode.UNIMPLEMENTED, f"unknown service {call.path} ({PROXY_SERVICE})")
            return _RefusedSink()
        origin = next((v for k, v in call.metadata if k == MD_FORWARDED_FROM), "?")
        log.log(V(3), "stream %d forwarded by peer %s", call.stream_id, origin)
        # The frontend's own sink, unwrapped: the data path recognises it by its class
        # (its buffer toward the peer is charged and budgeted as any frontend's).
        sink = self.proxy._open_frontend(call, forwarded=True)
        peer_metrics.stream_opened(peer_metrics.FORWARDED)
        call.closed.add_done_callback(_forwarded_closed)
        return sink


def _forwarded_closed(_: asyncio.Future[int]) -> None:
    peer_metrics.stream_closed(peer_metrics.FORWARDED)


async def start_peer_listener(
    proxy: ProxyServer,
    *,
    host: str | None,
    port: int,
    cert_file: str,
    key_file: str,
    ca_file: str,
    tls_settings: TlsSettings,
) -> GrpcServer:
    """The peer listener: ``ProxyService`` on TCP, mTLS with ``ca_file`` always."""
    ctx = tls_settings.server_context(cert_file, key_file, ca_file)  # CERT_REQUIRED
    return await serve(
        _PeerService(proxy), host=host, port=port, ssl=ctx, name="peer", **FRONTEND_ENGINE_DEFAULTS
    )
