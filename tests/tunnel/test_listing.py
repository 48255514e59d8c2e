"""The tunnel listing's sans-IO part (``tunnel.listing``): the query (its validation, the
limit's clamp), the top-N choice and the JSON encoding."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from konnectivity_fast.tunnel.listing import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    ListingError,
    TunnelQuery,
    age,
    encode_listing,
    parse_tunnel_query,
    top,
    top_peers,
)
from konnectivity_fast.wire.contract import TunnelQueryParam, TunnelSort

AGENT = TunnelQueryParam.AGENT
SERVER = TunnelQueryParam.SERVER


def test_defaults() -> None:
    assert parse_tunnel_query("", AGENT) == TunnelQuery(TunnelSort.BYTES, DEFAULT_LIMIT, None)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sort=age", TunnelQuery(TunnelSort.AGE)),
        ("sort=bytes&limit=7", TunnelQuery(TunnelSort.BYTES, 7)),
        ("limit=0", TunnelQuery(limit=0)),
        (f"limit={MAX_LIMIT}", TunnelQuery(limit=MAX_LIMIT)),
        (f"limit={MAX_LIMIT + 1}", TunnelQuery(limit=MAX_LIMIT)),
        ("limit=" + "9" * 5000, TunnelQuery(limit=MAX_LIMIT)),
        ("agent=node%201&limit=3", TunnelQuery(limit=3, peer="node 1")),
        ("agent=", TunnelQuery(peer="")),
        ("&&sort=age&", TunnelQuery(TunnelSort.AGE)),
    ],
)
def test_valid_queries(query: str, expected: TunnelQuery) -> None:
    assert parse_tunnel_query(query, AGENT) == expected


@pytest.mark.parametrize(
    ("query", "peer", "message"),
    [
        ("sort=size", AGENT, "invalid sort 'size': want bytes or age"),
        ("sort=Bytes", AGENT, "invalid sort 'Bytes'"),
        ("limit=-1", AGENT, "invalid limit '-1'"),
        ("limit=1.5", AGENT, "invalid limit '1.5'"),
        ("limit=", AGENT, "invalid limit ''"),
        ("limit=%D9%A3", AGENT, "invalid limit"),  # a non-ASCII digit
        ("server=s1", AGENT, "unknown parameter 'server': want sort, limit, agent"),
        ("agent=a", SERVER, "unknown parameter 'agent': want sort, limit, server"),
        ("limit=1&limit=2", AGENT, "parameter 'limit' given 2 times"),
        ("sort=age;limit=2", AGENT, "invalid query"),
        ("agent=%zz", AGENT, "invalid query"),
    ],
)
def test_invalid_queries(query: str, peer: TunnelQueryParam, message: str) -> None:
    with pytest.raises(ListingError) as exc:
        parse_tunnel_query(query, peer)
    assert str(exc.value).startswith(message)


@dataclass(frozen=True)
class Item:
    name: str
    moved: int
    start: float


ITEMS = [Item("a", 5, 3.0), Item("b", 50, 2.0), Item("c", 0, 1.0), Item("d", 20, 4.0)]


def test_top_by_bytes_and_by_age() -> None:
    def moved(item: Item) -> int:
        return item.moved

    def start(item: Item) -> float:
        return item.start

    by_bytes = top(iter(ITEMS), TunnelQuery(TunnelSort.BYTES, 2), moved, start)
    assert [i.name for i in by_bytes] == ["b", "d"]
    by_age = top(iter(ITEMS), TunnelQuery(TunnelSort.AGE, 3), moved, start)
    assert [i.name for i in by_age] == ["c", "b", "a"]
    assert top(iter(ITEMS), TunnelQuery(limit=0), moved, start) == []
    assert len(top(iter(ITEMS), TunnelQuery(limit=MAX_LIMIT), moved, start)) == 4


def test_top_peers_and_age() -> None:
    peers = [{"id": i, "tunnels": n} for i, n in enumerate([3, 9, 1])]
    assert [p["id"] for p in top_peers(peers, 2)] == [1, 0]
    assert age(10.0, 7.5004) == 2.5
    assert age(1.0, 2.0) == 0.0  # a clock never reads a start in the future


def test_encoding_is_compact_json_in_build_order() -> None:
    body = encode_listing({"program": "proxy-server", "tunnels": [], "window": None})
    assert body == b'{"program":"proxy-server","tunnels":[],"window":null}\n'
    assert json.loads(body) == {"program": "proxy-server", "tunnels": [], "window": None}
