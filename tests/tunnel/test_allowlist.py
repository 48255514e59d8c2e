"""The allow-list of agent-initiated destinations (``tunnel.allowlist``): parsing of
``--allowed-destination`` (a bad entry is a ``ValueError`` naming it), normalisation, and
matching (exact ``host:port``, IP prefixes for IP literals only); random input never makes
the matcher raise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.tunnel.allowlist import (
    AllowList,
    normalise_destination,
    parse_allowed_destinations,
)


def allow(*entries: str) -> AllowList:
    return parse_allowed_destinations(entries)


@pytest.mark.parametrize(
    ("entries", "address", "allowed"),
    [
        (["localhost:6443"], "localhost:6443", True),
        (["localhost:6443"], "LOCALHOST.:6443", True),  # lowercase, trailing dot dropped
        (["localhost:6443"], "localhost:6444", False),
        (["localhost:6443"], "127.0.0.1:6443", False),  # a name is not its address
        (["127.0.0.1:6443"], "127.0.0.1:6443", True),
        (["127.0.0.1:6443"], "127.0.0.2:6443", False),
        (["[fd00::1]:6443"], "[FD00:0::1]:6443", True),  # IPv6 in canonical form
        (["[fd00::1]:6443"], "fd00::1:6443", False),  # IPv6 needs its brackets
        (["10.0.0.0/8:6443"], "10.1.2.3:6443", True),
        (["10.0.0.0/8:6443"], "11.1.2.3:6443", False),
        (["10.0.0.0/8:6443"], "10.1.2.3:2379", False),
        (["10.0.0.0/8:6443"], "ten.example:6443", False),  # prefixes match literals only
        (["10.0.0.0/8:6443"], "[::ffff:10.0.0.1]:6443", False),  # another family
        (["[fd00::/64]:6443"], "[fd00::5]:6443", True),
        (["[fd00::/64]:6443"], "[fd01::5]:6443", False),
        (["a:1,b:2", "c:3"], "b:2", True),  # comma lists and repeats
        (["a:1"], "a:01", True),  # the port is a number
        (["a:1"], "a:+1", False),
        (["a:1"], "a:1:1", False),
        (["a:1"], "", False),
        (["a:1"], "[a]:1", True),
        (["a:1"], "a%eth0:1", False),
    ],
)
def test_matching(entries: list[str], address: str, allowed: bool) -> None:
    assert allow(*entries).allows(address) is allowed


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("*:6443", "wildcards are not allowed"),
        ("*", "wildcards are not allowed"),
        ("localhost:*", "wildcards are not allowed"),
        (":6443", "empty host"),
        ("localhost:0", "port must be 1-65535"),
        ("localhost:65536", "port must be 1-65535"),
        ("localhost", "want host:port"),
        ("fd00::1:80", "want host:port"),
        ("10.0.0.1/8:80", "has host bits set"),
        ("fd00::/64:80", "want host:port"),
        ("bad_name:80", "not an IP address or DNS name"),
        ("-x:80", "not an IP address or DNS name"),
    ],
)
def test_bad_entries_fail_with_a_clear_message(entry: str, message: str) -> None:
    with pytest.raises(ValueError, match="--allowed-destination") as info:
        allow(entry)
    assert message in str(info.value)


def test_empty_means_off() -> None:
    assert not allow()
    assert not allow("", " , ")
    assert not allow().allows("localhost:6443")
    assert allow("localhost:6443")


def test_str_lists_normalised_entries() -> None:
    text = str(allow("LocalHost.:6443", "[FD00::/64]:1", "10.0.0.0/8:2"))
    assert text == "localhost:6443,[fd00::/64]:1,10.0.0.0/8:2"


def test_normalise_destination() -> None:
    dest = normalise_destination("[FD00::0001]:443")
    assert dest is not None and str(dest) == "[fd00::1]:443" and dest.ip is not None
    assert normalise_destination("x" * 400 + ":1") is None


@given(st.text(max_size=80))
def test_matching_never_raises(address: str) -> None:
    table = allow("localhost:6443", "10.0.0.0/8:6443", "[fd00::/64]:6443")
    table.allows(address)
    normalise_destination(address)


@given(st.text(alphabet="0123456789abcdef.:[]/*%-, ", max_size=40))
def test_parsing_raises_only_value_error(entry: str) -> None:
    try:
        parse_allowed_destinations([entry])
    except ValueError as exc:
        assert "--allowed-destination" in str(exc)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_every_literal_matches_itself(ip: object, port: int) -> None:
    text = f"[{ip}]:{port}" if ":" in str(ip) else f"{ip}:{port}"
    assert allow(text).allows(text)
