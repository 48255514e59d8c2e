"""Server endpoints (konnectivity_fast/wire/endpoints.py): the ``kf-server-endpoints``
header's format and parser, and the address syntax of flags and Lease annotations.

The parser reads what a peer sent, so besides the round trip it is checked never to raise
and never to return more than its bounds, on garbage and on the header whole or split
across several values."""

from __future__ import annotations

import contextlib
import random
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from konnectivity_fast.wire.endpoints import (
    MAX_SERVER_ENDPOINTS,
    MAX_SERVER_ENDPOINTS_LENGTH,
    MAX_SERVER_ID_LENGTH,
    Address,
    format_server_endpoints,
    parse_address,
    parse_address_list,
    parse_server_endpoints,
)

# --- addresses ---------------------------------------------------------------------------

GOOD_ADDRESSES = {
    "10.0.0.5:8091": Address("10.0.0.5", 8091),
    "konnectivity.example:443": Address("konnectivity.example", 443),
    "lb_1-a.internal:1": Address("lb_1-a.internal", 1),
    "host:65535": Address("host", 65535),
    "[::1]:8091": Address("::1", 8091),
    "[2001:db8::7]:8132": Address("2001:db8::7", 8132),
    "[fe80::1%eth0]:80": Address("fe80::1%eth0", 80),
    "[::ffff:10.0.0.1]:80": Address("::ffff:10.0.0.1", 80),
}

BAD_ADDRESSES = [
    "",
    "host",
    ":8091",
    "host:",
    "host:0",
    "host:65536",
    "host:-1",
    "host:+80",
    "host:080800",
    "host:\uff18\uff10",  # full-width digits: isdigit() but not ASCII
    "host:80 ",
    "::1:80",  # IPv6 without brackets
    "[::1]80",
    "[::1]",
    "[::1:80",
    "[host]:80",  # brackets only for IPv6
    "[::g]:80",
    "[fe80::1%]:80",
    "a b:80",
    "a,b:80",
    "a=b:80",
    "a\tb:80",
    "a\x00b:80",
    "a/b:80",
    "a@b:80",
    "héllo:80",
    "x" * 254 + ":80",
    "host:" + "0" * 5000 + "1",  # never reaches int()'s digit limit
]


@pytest.mark.parametrize("text", GOOD_ADDRESSES)
def test_address_round_trip(text: str) -> None:
    address = parse_address(text)
    assert address == GOOD_ADDRESSES[text]
    assert str(address) == text
    assert parse_address(str(address)) == address


@pytest.mark.parametrize("text", BAD_ADDRESSES, ids=lambda t: repr(t)[:40])
def test_bad_address_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"host|port"):
        parse_address(text)


def test_address_list() -> None:
    assert parse_address_list("a:1, b:2,,a:1,[::1]:3,") == [
        Address("a", 1),
        Address("b", 2),
        Address("::1", 3),
    ]
    assert parse_address_list("") == []
    with pytest.raises(ValueError, match="'b' is not host:port"):
        parse_address_list("a:1,b")


# --- the header --------------------------------------------------------------------------


def test_format_is_sorted_and_parses_back() -> None:
    endpoints = {
        "s2": Address("10.0.0.2", 8091),
        "s1": Address("lb.example", 8141),
        "s3": Address("2001:db8::3", 8091),
    }
    text = format_server_endpoints(endpoints)
    assert text == "s1=lb.example:8141,s2=10.0.0.2:8091,s3=[2001:db8::3]:8091"
    assert parse_server_endpoints([text]) == endpoints
    assert format_server_endpoints({}) == ""
    assert parse_server_endpoints([]) == {}
    assert parse_server_endpoints([""]) == {}


def test_format_leaves_out_what_the_syntax_cannot_carry() -> None:
    good = Address("h", 1)
    endpoints = {
        "ok": good,
        "": good,
        "a,b": good,
        "a=b": good,
        "a b": good,
        "new\nline": good,
        "ünicode": good,
        "x" * (MAX_SERVER_ID_LENGTH + 1): good,
        "bad-host": Address("a,b", 1),
        "bad-port": Address("h", 0),
        "big-port": Address("h", 70000),
    }
    assert format_server_endpoints(endpoints) == "ok=h:1"


def test_format_bounds() -> None:
    many = {f"server-{i:03}": Address(f"10.0.{i // 256}.{i % 256}", 8091) for i in range(200)}
    text = format_server_endpoints(many)
    assert len(text.split(",")) == MAX_SERVER_ENDPOINTS
    assert parse_server_endpoints([text]) == dict(sorted(many.items())[:MAX_SERVER_ENDPOINTS])
    # Long entries: the text stays within the length bound, entries stay whole.
    long_host = "h" * 200
    big = {f"{'i' * 200}-{i:02}": Address(long_host, 8091) for i in range(60)}
    text = format_server_endpoints(big)
    assert len(text) <= MAX_SERVER_ENDPOINTS_LENGTH
    parsed = parse_server_endpoints([text])
    assert parsed and all(big[server_id] == address for server_id, address in parsed.items())
    assert len(parsed) == len(text.split(","))
    # One entry too long to fit leaves room for shorter ones after it.
    huge = {"a": Address("h" * 253, 1), "b": Address("h", 2)}
    filler = {f"{'f' * 240}{i:02}": Address("h" * 253, 1) for i in range(16)}
    text = format_server_endpoints({**filler, **huge})
    assert len(text) <= MAX_SERVER_ENDPOINTS_LENGTH
    assert "b=h:2" in text.split(",")


def test_parse_skips_malformed_entries() -> None:
    value = ",".join(
        [
            "s1=10.0.0.1:8091",
            "garbage",
            "=10.0.0.9:1",
            "s2=",
            "s3=host",
            "s4=host:99999",
            "s5=[::1]:80",
            " s6 =10.0.0.6:1",  # space inside the entry
            "\ts7=10.0.0.7:1 ",  # optional whitespace around it
            "s8=a=b:1",
            "s1=10.0.0.99:1",  # a repeated ID: the first one counts
            "",
        ]
    )
    assert parse_server_endpoints([value]) == {
        "s1": Address("10.0.0.1", 8091),
        "s5": Address("::1", 80),
        "s7": Address("10.0.0.7", 1),
    }


def test_parse_header_split_across_values() -> None:
    endpoints = {f"s{i}": Address(f"10.0.0.{i}", 8000 + i) for i in range(10)}
    whole = format_server_endpoints(endpoints)
    parts = whole.split(",")
    for cut in (1, 3, 9):
        values = [",".join(parts[:cut]), ",".join(parts[cut:])]
        assert parse_server_endpoints(values) == endpoints
    assert parse_server_endpoints(parts) == endpoints
    assert parse_server_endpoints(["", *parts, ""]) == endpoints
    # The first value to name an ID wins, in value order.
    assert parse_server_endpoints(["a=h:1", "a=h:2,b=h:3"]) == {
        "a": Address("h", 1),
        "b": Address("h", 3),
    }


def test_parse_count_bound() -> None:
    value = ",".join(f"s{i}=h:{i + 1}" for i in range(MAX_SERVER_ENDPOINTS * 3))
    parsed = parse_server_endpoints([value])
    assert len(parsed) == MAX_SERVER_ENDPOINTS
    assert list(parsed) == [f"s{i}" for i in range(MAX_SERVER_ENDPOINTS)]
    split = parse_server_endpoints(value.split(","))
    assert split == parsed


def test_parse_length_bound_cuts_between_entries() -> None:
    entry = "s{:04}=host.example:8091"  # 24 characters
    entries = [entry.format(i) for i in range(MAX_SERVER_ENDPOINTS_LENGTH // 10)]
    value = ",".join(entries)
    assert len(value) > MAX_SERVER_ENDPOINTS_LENGTH
    parsed = parse_server_endpoints([value])
    # Every entry wholly within the bound is read (up to the count bound), none past it.
    assert len(parsed) == MAX_SERVER_ENDPOINTS
    # With the count bound out of the way: an entry that ends exactly at the bound is
    # kept, the one the bound cuts through is dropped.
    for width in (0, 1):
        head = "x" * (MAX_SERVER_ENDPOINTS_LENGTH - len("a=h:1") - 1 + width)
        text = f"{head},a=h:1,b=h:2"
        assert parse_server_endpoints([text]) == ({} if width else {"a": Address("h", 1)})
    # The bound covers all values together: nothing after it is read.
    filler = "x" * MAX_SERVER_ENDPOINTS_LENGTH
    assert parse_server_endpoints([filler, "a=h:1"]) == {}
    assert parse_server_endpoints(["a=h:1", filler, "b=h:2"]) == {"a": Address("h", 1)}


# --- never raises ------------------------------------------------------------------------

_ALPHABET = string.ascii_letters[:6] + string.digits + ",=:[]%. \t\x00é-_"


@settings(max_examples=400, deadline=None)
@given(st.lists(st.text(alphabet=_ALPHABET, max_size=120), max_size=6))
def test_parse_never_raises_and_stays_bounded(values: list[str]) -> None:
    parsed = parse_server_endpoints(values)
    assert len(parsed) <= MAX_SERVER_ENDPOINTS
    # What comes out formats back into the same mapping.
    assert parse_server_endpoints([format_server_endpoints(parsed)]) == parsed


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet=string.ascii_letters + string.digits + "-._", min_size=1, max_size=40),
        st.builds(
            Address,
            st.sampled_from(["10.0.0.1", "lb.example", "::1", "2001:db8::1", "h"]),
            st.integers(1, 65535),
        ),
        max_size=80,
    ),
    st.integers(1, 5),
)
def test_round_trip_whole_and_split(endpoints: dict[str, Address], pieces: int) -> None:
    text = format_server_endpoints(endpoints)
    expected = dict(sorted(endpoints.items())[:MAX_SERVER_ENDPOINTS])
    assert parse_server_endpoints([text]) == expected
    parts = text.split(",") if text else []
    step = max(1, len(parts) // pieces)
    values = [",".join(parts[i : i + step]) for i in range(0, len(parts), step)]
    assert parse_server_endpoints(values) == expected


def test_random_garbage_never_raises() -> None:
    """Plain random bytes decoded as text, whole and cut into random values: a seeded
    fuzz loop beside the hypothesis tests, with long inputs that reach the bounds."""
    rng = random.Random(17)
    for _ in range(300):
        size = rng.choice([0, 10, 200, MAX_SERVER_ENDPOINTS_LENGTH + 100, 30000])
        raw = rng.randbytes(size).decode("latin-1")
        if rng.random() < 0.5:  # make it look more like a header
            raw = raw.replace(raw[:1] or "x", ",").replace(raw[1:2] or "y", "=")
        cuts = sorted(rng.randrange(len(raw) + 1) for _ in range(rng.randrange(4)))
        values = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        parsed = parse_server_endpoints(values)
        assert len(parsed) <= MAX_SERVER_ENDPOINTS
        assert all(isinstance(address, Address) for address in parsed.values())
        assert len(format_server_endpoints(parsed)) <= MAX_SERVER_ENDPOINTS_LENGTH
        for text in (raw[:300], raw[-40:]):
            with contextlib.suppress(ValueError):
                parse_address(text)
