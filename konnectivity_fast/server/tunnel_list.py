"""The proxy-server's tunnel listing on its admin port (``ADMIN_TUNNELS_PATH``; the
document is described in ``tunnel/listing.py``).

One row per established connection (pending dials are counted, not listed), read from the
router's records: its agent stream (``Backend``), its frontend (``Frontend``, whose
``bytes_up``/``bytes_down`` the data path counts) and the frontend's side of the
buffering (``_FrontendStream`` for gRPC, ``HttpConnectProtocol`` for HTTP-CONNECT; both
have a ``TunnelBuffer`` and ``source_paused``, see ``TunnelSide``). Per agent: its streams,
tunnels, pending dials and bytes, whether one of its streams drains, and whether the
buffering holds or pauses one (``BufferBudget.paused``).

The handler runs on the loop, between packets: it reads, never changes, and costs one pass
over the open tunnels to count and one to choose the rows (``tunnel.listing.top``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from konnectivity_fast.server.buffering import TunnelBuffer
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.transport.http import NOSNIFF, TEXT_PLAIN, Handler, Request, Response
from konnectivity_fast.tunnel import Backend, Frontend, ProxyClientConnection
from konnectivity_fast.tunnel.listing import (
    JSON_CONTENT_TYPE,
    ListingError,
    TunnelQuery,
    age,
    encode_listing,
    parse_tunnel_query,
    top,
    top_peers,
)
from konnectivity_fast.wire.contract import FrontendMode, TunnelQueryParam

__all__ = ["PROGRAM", "TunnelSide", "server_listing", "tunnel_window", "tunnels_handler"]

PROGRAM = "proxy-server"


@runtime_checkable
class TunnelSide(Protocol):
    """What the listing reads of a frontend's adapter object."""

    buffer: TunnelBuffer

    @property
    def source_paused(self) -> bool: ...


def tunnel_window(frontend: Frontend) -> int | None:
    """The tunnel's flow.v1 credit window, where flow.v1 is negotiated on its streams;
    None until flow control exists (the one place to fill it in)."""
    return None


def _side(frontend: Frontend) -> TunnelSide | None:
    conn = frontend.conn
    holder = getattr(conn, "sink", None) if frontend.mode is FrontendMode.GRPC else conn
    return holder if isinstance(holder, TunnelSide) else None


def _bytes(conn: ProxyClientConnection) -> int:
    frontend = conn.frontend
    return frontend.bytes_up + frontend.bytes_down


def _start(conn: ProxyClientConnection) -> float:
    return conn.start


def _row(conn: ProxyClientConnection, now: float) -> dict[str, Any]:
    frontend = conn.frontend
    side = _side(frontend)
    buffer = side.buffer if side is not None else None
    return {
        "connection_id": conn.connect_id,
        "agent_id": conn.backend.agent_id,
        "destination": conn.address,
        "frontend": frontend.mode.value,
        "bytes_up": frontend.bytes_up,
        "bytes_down": frontend.bytes_down,
        "buffered": buffer.backlog() if buffer is not None and buffer.backlog else 0,
        "paused": side.source_paused if side is not None else False,
        "holding": bool(buffer.pausing) if buffer is not None else False,
        "window": tunnel_window(frontend),
        "age_seconds": age(now, conn.start),
    }


def _agents(proxy: ProxyServer, query: TunnelQuery) -> list[dict[str, Any]]:
    """Per agent ID, over every open stream of it (the filter keeps one agent)."""
    budget = proxy.budget
    agents: dict[str, dict[str, Any]] = {}
    for backend in proxy.router.backends.values():
        if query.peer is not None and backend.agent_id != query.peer:
            continue
        entry = agents.get(backend.agent_id)
        if entry is None:
            entry = agents[backend.agent_id] = {
                "agent_id": backend.agent_id,
                "streams": 0,
                "tunnels": 0,
                "pending_dials": 0,
                "bytes_up": 0,
                "bytes_down": 0,
                "draining": False,
                "paused": False,
            }
        entry["streams"] += 1
        entry["tunnels"] += len(backend.connections)
        entry["pending_dials"] += len(backend.dials)
        entry["bytes_up"] += sum(c.frontend.bytes_up for c in backend.connections.values())
        entry["bytes_down"] += sum(c.frontend.bytes_down for c in backend.connections.values())
        entry["draining"] = entry["draining"] or backend.draining
        entry["paused"] = entry["paused"] or budget.paused(backend.conn)
    return list(agents.values())


def _connections(backends: Iterator[Backend]) -> Iterator[ProxyClientConnection]:
    for backend in backends:
        yield from backend.connections.values()


def server_listing(proxy: ProxyServer, query: TunnelQuery, now: float) -> dict[str, Any]:
    """The listing document for ``query`` at loop time ``now``."""
    router = proxy.router
    agents = _agents(proxy, query)
    backends = (
        b for b in router.backends.values() if query.peer is None or b.agent_id == query.peer
    )
    rows = top(_connections(backends), query, _bytes, _start)
    every = _agents(proxy, TunnelQuery()) if query.peer is not None else agents
    return {
        "program": PROGRAM,
        "server_id": proxy.server_id,
        "dial_balance": router.backend_managers.balance.value,
        "sort": query.sort.value,
        "limit": query.limit,
        "agent": query.peer,
        "totals": {
            "tunnels": router.established_connections,
            "pending_dials": router.pending_dials,
            "agents": len(every),
            "bytes_up": sum(a["bytes_up"] for a in every),
            "bytes_down": sum(a["bytes_down"] for a in every),
            "buffer_charged": proxy.budget.total,
            "matched": sum(a["tunnels"] for a in agents),
            "listed": len(rows),
        },
        "agents": top_peers(agents, query.limit),
        "tunnels": [_row(conn, now) for conn in rows],
    }


def tunnels_handler(proxy: ProxyServer) -> Handler:
    """The admin route: 200 with the JSON listing, 400 with the reason for a bad query."""

    def handle(request: Request) -> Response:
        try:
            query = parse_tunnel_query(request.query, TunnelQueryParam.AGENT)
        except ListingError as exc:
            return 400, TEXT_PLAIN, f"{exc}\n".encode(), NOSNIFF
        document = server_listing(proxy, query, proxy.loop.time())
        return 200, JSON_CONTENT_TYPE, encode_listing(document), ()

    return handle
