"""The proxy-agent's tunnel listing on its admin port (``ADMIN_TUNNELS_PATH``; the
document is described in ``tunnel/listing.py``).

One row per backend connection (``Endpoint``) of every server connection
(``AgentClient``) in the ``ClientSet``: its server, destination and byte counters (which
the endpoint counts), what the agent holds for it (server -> backend bytes the backend has
not taken, plus a backend read waiting for its turn on the server stream), whether its
backend is not being read (``Endpoint.reading_paused``) and whether it pauses its server
stream (over its write budget). Per server: tunnels, dials in progress, bytes, whether
the stream is paused and whether DRAIN was sent on it.

The handler runs on the loop between packets; it only reads, in one pass over the
endpoints that both counts and chooses the rows (``tunnel.listing.TopN``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.clientset import ClientSet
from konnectivity_fast.agent.endpoint import Endpoint
from konnectivity_fast.transport.http import NOSNIFF, TEXT_PLAIN, Handler, Request, Response
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
from konnectivity_fast.wire.contract import TunnelQueryParam, TunnelSort

__all__ = ["PROGRAM", "agent_listing", "tunnel_window", "tunnels_handler"]

PROGRAM = "proxy-agent"

Pair = tuple[AgentClient, Endpoint]


def tunnel_window(client: AgentClient, endpoint: Endpoint) -> int | None:
    """The tunnel's flow.v1 window toward its backend (what the server may have in flight
    plus what waits for the backend), where flow.v1 is negotiated on ``client``'s stream;
    None elsewhere."""
    window = endpoint.window
    return None if window is None else window.window


def _row(client: AgentClient, endpoint: Endpoint, now: float) -> dict[str, Any]:
    sender = client.sender
    held = sender.held(endpoint) if sender is not None else 0
    return {
        "connection_id": endpoint.connect_id,
        "server_id": client.server_id,
        "destination": destination(endpoint.address),
        "bytes_up": endpoint.bytes_up,
        "bytes_down": endpoint.bytes_down,
        "buffered": endpoint.queued() + held,
        "paused": endpoint.reading_paused,
        "holding": endpoint.over_budget,
        "window": tunnel_window(client, endpoint),
        "age_seconds": age(now, endpoint.started),
    }


def _scan(
    clients: Sequence[AgentClient], query: TunnelQuery
) -> tuple[list[dict[str, Any]], list[Pair]]:
    """One pass over every endpoint: the per-server counts, and the rows ``query`` chooses
    (``TopN``)."""
    servers: list[dict[str, Any]] = []
    chosen: TopN[Pair] = TopN(query.limit)
    floor = chosen.floor
    by_bytes = query.sort is TunnelSort.BYTES
    for client in clients:
        listed = query.peer is None or client.server_id == query.peer
        up = down = 0
        for endpoint in client.endpoints.values():
            moved_up = endpoint.bytes_up
            moved_down = endpoint.bytes_down
            up += moved_up
            down += moved_down
            if listed:
                key = moved_up + moved_down if by_bytes else -endpoint.started
                if key > floor:  # most endpoints stop here, without a call
                    chosen.offer(key, (client, endpoint))
                    floor = chosen.floor
        servers.append(
            {
                "server_id": client.server_id,
                "tunnels": len(client.endpoints),
                "pending_dials": client.pending_dials,
                "bytes_up": up,
                "bytes_down": down,
                "draining": client.drain_sent,
                "paused": client.inbound_paused,
            }
        )
    return servers, chosen.items()


def agent_listing(
    agent_id: str, clients: Sequence[AgentClient], query: TunnelQuery, now: float
) -> dict[str, Any]:
    """The listing document of the server connections ``clients`` for ``query`` at loop
    time ``now``."""
    every, rows = _scan(clients, query)
    servers = [s for s in every if query.peer is None or s["server_id"] == query.peer]
    return {
        "program": PROGRAM,
        "agent_id": agent_id,
        "sort": query.sort.value,
        "limit": query.limit,
        "server": query.peer,
        "totals": {
            "tunnels": sum(s["tunnels"] for s in every),
            "pending_dials": sum(s["pending_dials"] for s in every),
            "servers": len(every),
            "bytes_up": sum(s["bytes_up"] for s in every),
            "bytes_down": sum(s["bytes_down"] for s in every),
            "matched": sum(s["tunnels"] for s in servers),
            "listed": len(rows),
        },
        "servers": top_peers(servers, query.limit),
        "tunnels": [_row(client, endpoint, now) for client, endpoint in rows],
    }


def tunnels_handler(agent_id: str, clients: ClientSet) -> Handler:
    """The admin route over ``clients`` (its server connections as they are at each
    request): 200 with the JSON listing, 400 with the reason for a bad query."""

    def handle(request: Request) -> Response:
        try:
            query = parse_tunnel_query(request.query, TunnelQueryParam.SERVER)
        except ListingError as exc:
            return 400, TEXT_PLAIN, f"{exc}\n".encode(), NOSNIFF
        now = asyncio.get_running_loop().time()
        document = agent_listing(agent_id, list(clients.clients.values()), query, now)
        return 200, JSON_CONTENT_TYPE, encode_listing(document), ()

    return handle
