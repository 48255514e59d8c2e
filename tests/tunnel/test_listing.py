"""The tunnel listing's sans-IO part (``tunnel.listing``): the query (its validation, the
limit's clamp), the top-N choice (against a full sort) and the JSON encoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.tunnel.listing import (
    DEFAULT_LIMIT,
    MAX_DESTINATION_CHARS,
    MAX_LIMIT,
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


@given(
    keys=st.lists(st.integers(0, 5), max_size=40),
    limit=st.integers(0, 12),
)
def test_top_n_keeps_the_largest_keys_first_offered_first(keys: list[int], limit: int) -> None:
    chosen: TopN[int] = TopN(limit)
    for index, key in enumerate(keys):
        if key > chosen.floor:  # how the scans call it: skipping must change nothing
            chosen.offer(key, index)
    # sorted() is stable: equal keys keep their offering order.
    expected = sorted(range(len(keys)), key=lambda i: -keys[i])[:limit]
    assert chosen.items() == expected


def test_top_n_offers_without_the_floor_check_too() -> None:
    chosen: TopN[str] = TopN(2)
    for key, item in ((1.0, "a"), (3.0, "b"), (2.0, "c"), (3.0, "d"), (0.5, "e")):
        chosen.offer(key, item)
    assert chosen.items() == ["b", "d"]
    assert chosen.floor == 3.0
    assert TopN[str](0).items() == []


def test_long_destinations_are_cut() -> None:
    assert destination("node-1.example:10250") == "node-1.example:10250"
    edge = "h" * MAX_DESTINATION_CHARS
    assert destination(edge) == edge
    cut = destination("h" * (4 << 20))
    assert len(cut) == MAX_DESTINATION_CHARS and cut.endswith("...")


def test_top_peers_and_age() -> None:
    peers = [{"id": i, "tunnels": n} for i, n in enumerate([3, 9, 1])]
    assert [p["id"] for p in top_peers(peers, 2)] == [1, 0]
    assert age(10.0, 7.5004) == 2.5
    assert age(1.0, 2.0) == 0.0  # a clock never reads a start in the future


def test_encoding_is_compact_json_in_build_order() -> None:
    body = encode_listing({"program": "proxy-server", "tunnels": [], "window": None})
    assert body == b'{"program":"proxy-server","tunnels":[],"window":null}\n'
    assert json.loads(body) == {"program": "proxy-server", "tunnels": [], "window": None}
