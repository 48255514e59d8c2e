"""The admin port's tunnel listing (``wire.contract.ADMIN_TUNNELS_PATH``), sans-IO: the
query, the top-N choice and the JSON document, shared by both programs
(``server/tunnel_list.py``, ``agent/tunnel_list.py``) and read by ``konnectivity-fast
tunnels`` (``cli/tunnels.py``).

The document, one JSON object (``own`` and ``peer`` are ``server``/``agent`` on the
proxy-server, ``agent``/``server`` on the proxy-agent)::

    {"program": "proxy-server" | "proxy-agent",
     "<own>_id": "...",                        # this process's ID
     "sort": "bytes" | "age", "limit": N,      # as applied (limit clamped)
     "<peer>": "ID" | null,                    # the filter, if any
     "totals": {"tunnels": n, "pending_dials": n, "<peer>s": n,
                "bytes_up": n, "bytes_down": n, "matched": n, "listed": n},
     "<peer>s": [{"<peer>_id": "...", "tunnels": n, "pending_dials": n,
                  "bytes_up": n, "bytes_down": n, "paused": bool, "draining": bool, ...}],
     "tunnels": [{"connection_id": n, "<peer>_id": "...", "destination": "host:port",
                  ["frontend": "grpc" | "http-connect",]   # the proxy-server's rows only
                  "bytes_up": n, "bytes_down": n, "buffered": n,
                  "paused": bool, "holding": bool, "window": n | null,
                  "age_seconds": s}],
     ...}                                       # program-specific extras

``destination`` is the dial address (cut past ``MAX_DESTINATION_CHARS``). ``bytes_up``
flows toward the destination (frontend -> agent -> backend), ``bytes_down`` back.
``buffered``: bytes this process holds for the tunnel toward its slow side. ``paused``:
the tunnel's own source is not being read; ``holding``: the tunnel holds its shared agent
stream (the server's ``TunnelBuffer.pausing``, the agent's backend over its
write budget). ``window``: the tunnel's flow-control credit window where one is
negotiated, else null. Totals and the peer counts cover the whole process (``matched``:
the tunnels the filter keeps); ``tunnels`` holds at most ``limit`` rows.

Bounds: the programs never serialise every tunnel. One pass over the open tunnels counts
them and keeps the ``limit`` best by the sort key in a heap (``TopN``: O(n log limit), and
most tunnels cost one comparison); ``limit`` is at most ``MAX_LIMIT``, and the peer list
is cut the same way. The pass runs on the event loop: ~4 ms for 10,000 tunnels and ~65 ms
for 100,000 on the reference machine (``bench/tunnel_listing.py``), so the listing is for
people and their ``--watch``, not a scrape target. Time is an argument (``now``, the
loop's clock).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from konnectivity_fast.wire.contract import TunnelQueryParam, TunnelSort
from konnectivity_fast.wire.gotext import parse_query

__all__ = [
    "DEFAULT_LIMIT",
    "JSON_CONTENT_TYPE",
    "MAX_DESTINATION_CHARS",
    "MAX_LIMIT",
    "ListingError",
    "TopN",
    "TunnelQuery",
    "age",
    "destination",
    "encode_listing",
    "parse_tunnel_query",
    "top_peers",
]

#: Rows when the query names no ``limit``: a screenful and more.
DEFAULT_LIMIT = 100
#: The most rows one answer holds, whatever is asked: a person reads far fewer, and it
#: bounds an answer to ~250 KB of JSON and a few milliseconds even with 100k tunnels open.
MAX_LIMIT = 1000
# A limit written with more digits is clamped without being converted (Python refuses to
# convert very long digit strings).
_MAX_LIMIT_DIGITS = 9
JSON_CONTENT_TYPE = "application/json"
#: A destination longer than this is cut (and marked): a DNS name and a port fit in 260
#: characters, and a frontend may send any text as a dial address (up to a 4 MiB message),
#: which a listing of ``MAX_LIMIT`` rows must not repeat in full.
MAX_DESTINATION_CHARS = 260

T = TypeVar("T")


class ListingError(ValueError):
    """A query the listing refuses; the text is the 400 answer's body."""


@dataclass(frozen=True, slots=True)
class TunnelQuery:
    """A parsed query: the order, the row count and the peer filter (an agent ID on the
    proxy-server, a server ID on the proxy-agent; None for all)."""

    sort: TunnelSort = TunnelSort.BYTES
    limit: int = DEFAULT_LIMIT
    peer: str | None = None


def _limit(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ListingError(f"invalid limit {text!r}: want a whole number from 0 to {MAX_LIMIT}")
    if len(text) > _MAX_LIMIT_DIGITS:
        return MAX_LIMIT
    return min(int(text), MAX_LIMIT)


def parse_tunnel_query(query: str, peer_param: TunnelQueryParam) -> TunnelQuery:
    """The listing's query string (without ``?``): ``sort``, ``limit`` (clamped to
    ``MAX_LIMIT``) and ``peer_param`` (``agent`` on the server, ``server`` on the agent),
    each at most once. Raises ``ListingError`` for anything else."""
    values, error = parse_query(query)
    if error is not None:
        raise ListingError(f"invalid query: {error}")
    known = (TunnelQueryParam.SORT, TunnelQueryParam.LIMIT, peer_param)
    for name, given in values.items():
        if name not in known:
            raise ListingError(
                f"unknown parameter {name!r}: want {', '.join(str(k) for k in known)}"
            )
        if len(given) > 1:
            raise ListingError(f"parameter {name!r} given {len(given)} times")
    result = TunnelQuery()
    if TunnelQueryParam.SORT in values:
        text = values[TunnelQueryParam.SORT][0]
        try:
            sort = TunnelSort(text)
        except ValueError:
            names = " or ".join(TunnelSort)
            raise ListingError(f"invalid sort {text!r}: want {names}") from None
        result = TunnelQuery(sort, result.limit)
    if TunnelQueryParam.LIMIT in values:
        result = TunnelQuery(result.sort, _limit(values[TunnelQueryParam.LIMIT][0]))
    if peer_param in values:
        result = TunnelQuery(result.sort, result.limit, values[peer_param][0])
    return result


class TopN(Generic[T]):
    """The ``limit`` items with the largest keys among those offered, kept in a heap of
    at most ``limit`` entries; ``items()`` gives them largest first, and among equal keys
    the first offered first. For a pass that does other work per item (the programs'
    scans), so no second pass is needed. ``floor``: an offer with a key at or
    below it would be refused, so a hot loop can skip the call (``-inf`` until full)."""

    __slots__ = ("_count", "_heap", "_limit", "floor")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._heap: list[tuple[float, int, T]] = []
        self._count = 0  # offers so far; its negation breaks ties toward the first
        self.floor = -math.inf if limit > 0 else math.inf

    def offer(self, key: float, item: T) -> None:
        heap = self._heap
        self._count += 1
        if len(heap) < self._limit:
            heapq.heappush(heap, (key, -self._count, item))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, -self._count, item))
        else:
            return
        if len(heap) == self._limit:
            self.floor = heap[0][0]

    def items(self) -> list[T]:
        return [item for _, _, item in sorted(self._heap, key=_rank, reverse=True)]


def _rank(entry: tuple[float, int, Any]) -> tuple[float, int]:
    return entry[0], entry[1]


def top_peers(peers: Iterable[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The peer summaries with the most tunnels, at most ``limit``."""
    return heapq.nlargest(limit, peers, key=lambda peer: int(peer["tunnels"]))


def destination(address: str) -> str:
    """A dial address as listed: whole, or cut to ``MAX_DESTINATION_CHARS`` with ``...``."""
    if len(address) <= MAX_DESTINATION_CHARS:
        return address
    return address[: MAX_DESTINATION_CHARS - 3] + "..."


def age(now: float, start: float) -> float:
    """Seconds since ``start``, to the millisecond (never negative)."""
    return round(max(0.0, now - start), 3)


def encode_listing(document: Mapping[str, Any]) -> bytes:
    """The answer's body: compact JSON, keys in the order built, a final newline."""
    import json  # only when asked: the agent keeps no module it may never use

    return json.dumps(document, separators=(",", ":")).encode() + b"\n"
