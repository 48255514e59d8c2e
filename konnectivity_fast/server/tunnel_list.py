"""The proxy-server's tunnel listing on its admin port (``ADMIN_TUNNELS_PATH``; the
document is described in ``tunnel/listing.py``).

One row per established connection (pending dials are counted, not listed), read from the
router's records: its agent stream (``Backend``), its frontend (``Frontend``, whose
``bytes_up``/``bytes_down`` the data path counts) and the frontend's side of the
buffering (``streams.FrontendStream`` for gRPC, ``HttpConnectProtocol`` for HTTP-CONNECT; both
have a ``TunnelBuffer`` and ``source_paused``, see ``TunnelSide``). Per agent: its streams,
tunnels, pending dials and bytes, whether one of its streams drains, and whether the
buffering holds or pauses one (``BufferBudget.paused``).

The handler runs on the loop, between packets: it reads, never changes, and costs one pass
over the open tunnels that both counts and chooses the rows (``tunnel.listing.TopN``).
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from konnectivity_fast.server.buffering import TunnelBuffer
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.transport.http import NOSNIFF, TEXT_PLAIN, Handler, Request, Response
from konnectivity_fast.tunnel import Backend, Frontend, ProxyClientConnection
from konnectivity_fast.tunnel.listing import (
    JSON_CONTENT_TYPE,
    ListingError,
    TopN,
    TunnelQuery,
    age,
    destination,
    encode_listing,
    parse_tunnel_query,
    top_peers,
)
from konnectivity_fast.wire.contract import FrontendMode, TunnelQueryParam, TunnelSort

__all__ = ["PROGRAM", "TunnelSide", "server_listing", "tunnel_window", "tunnels_handler"]

PROGRAM = "proxy-server"


class TunnelSide(Protocol):
    """What the listing reads of a frontend's adapter object."""

    buffer: TunnelBuffer

    @property
    def source_paused(self) -> bool: ...


def tunnel_window(frontend: Frontend) -> int | None:
    """The tunnel's flow.v1 window toward its frontend (what the agent may have in flight
    plus what waits for the frontend), where flow.v1 is negotiated; None elsewhere."""
    conn = frontend.conn
    holder = getattr(conn, "sink", None) if frontend.mode is FrontendMode.GRPC else conn
    tunnel = getattr(holder, "flow", None)
    return None if tunnel is None else int(tunnel.window.window)


def _side(frontend: Frontend) -> TunnelSide | None:
    conn = frontend.conn
    holder = getattr(conn, "sink", None) if frontend.mode is FrontendMode.GRPC else conn
    # A plain attribute test: isinstance() on a runtime-checkable Protocol costs ~15 µs a
    # row, most of a 1000-row listing.
    if isinstance(getattr(holder, "buffer", None), TunnelBuffer):
        return cast(TunnelSide, holder)
    return None


def _row(conn: ProxyClientConnection, now: float) -> dict[str, Any]:
    frontend = conn.frontend
    side = _side(frontend)
    buffer = side.buffer if side is not None else None
    return {
        "connection_id": conn.connect_id,
        "agent_id": conn.backend.agent_id,
        "destination": destination(conn.address),
        "frontend": frontend.mode.value,
        "bytes_up": frontend.bytes_up,
        "bytes_down": frontend.bytes_down,
        "buffered": buffer.backlog() if buffer is not None and buffer.backlog else 0,
        "paused": side.source_paused if side is not None else False,
        "holding": bool(buffer.pausing) if buffer is not None else False,
        "window": tunnel_window(frontend),
        "age_seconds": age(now, conn.start),
    }


def _agent_entry(backend: Backend) -> dict[str, Any]:
    return {
        "agent_id": backend.agent_id,
        "streams": 0,
        "tunnels": 0,
        "pending_dials": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "draining": False,
        "paused": False,
    }


def _scan(
    proxy: ProxyServer, query: TunnelQuery
) -> tuple[dict[str, dict[str, Any]], list[ProxyClientConnection]]:
    """One pass over every open tunnel: the per-agent counts, and the rows ``query``
    chooses (``TopN``). Each tunnel's records are read once: with 100k tunnels the pass
    is bound by memory reads, not by the arithmetic."""
    budget = proxy.budget
    agents: dict[str, dict[str, Any]] = {}
    chosen: TopN[ProxyClientConnection] = TopN(query.limit)
    floor = chosen.floor
    by_bytes = query.sort is TunnelSort.BYTES
    for backend in proxy.router.backends.values():
        entry = agents.get(backend.agent_id)
        if entry is None:
            entry = agents[backend.agent_id] = _agent_entry(backend)
        listed = query.peer is None or backend.agent_id == query.peer
        up = down = 0
        for conn in backend.connections.values():
            frontend = conn.frontend
            moved_up = frontend.bytes_up
            moved_down = frontend.bytes_down
            up += moved_up
            down += moved_down
            if listed:
                key = moved_up + moved_down if by_bytes else -conn.start
                if key > floor:  # most tunnels stop here, without a call
                    chosen.offer(key, conn)
                    floor = chosen.floor
        entry["streams"] += 1
        entry["tunnels"] += len(backend.connections)
        entry["pending_dials"] += len(backend.dials)
        entry["bytes_up"] += up
        entry["bytes_down"] += down
        entry["draining"] = entry["draining"] or backend.draining
        entry["paused"] = entry["paused"] or budget.paused(backend.conn)
    return agents, chosen.items()


def server_listing(proxy: ProxyServer, query: TunnelQuery, now: float) -> dict[str, Any]:
    """The listing document for ``query`` at loop time ``now``."""
    router = proxy.router
    agents, rows = _scan(proxy, query)
    every = list(agents.values())
    shown = every if query.peer is None else [a for a in every if a["agent_id"] == query.peer]
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
            "matched": sum(a["tunnels"] for a in shown),
            "listed": len(rows),
        },
        "agents": top_peers(shown, query.limit),
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
