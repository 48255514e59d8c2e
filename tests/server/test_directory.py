"""``ServerDirectory`` (konnectivity_fast/server/directory.py): server ID -> endpoints from
this server's configuration and the server Leases it lists, judged valid against an
injected clock; and the ``kf-server-endpoints`` header the proxy builds from it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from konnectivity_fast.kube.leases import Lease
from konnectivity_fast.server.directory import (
    MAX_DIRECTORY_SERVERS,
    ServerDirectory,
)
from konnectivity_fast.server.leases import format_micro_time
from konnectivity_fast.wire.endpoints import (
    AGENT_ENDPOINT_ANNOTATION,
    MAX_SERVER_ENDPOINTS,
    PEER_ENDPOINT_ANNOTATION,
    Address,
    format_server_endpoints,
    parse_server_endpoints,
)

T0 = datetime(2026, 12, 6, 12, 0, 0, tzinfo=UTC)
SELF = Address("10.0.0.1", 8091)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def lease(
    holder: Any,
    *,
    agent: Any = None,
    peer: Any = None,
    renewed: datetime = T0,
    duration: Any = 30,
    extra: dict[str, str] | None = None,
) -> Lease:
    annotations = dict(extra or {})
    if agent is not None:
        annotations[AGENT_ENDPOINT_ANNOTATION] = agent
    if peer is not None:
        annotations[PEER_ENDPOINT_ANNOTATION] = peer
    return {
        "metadata": {"name": f"konnectivity-proxy-server-{holder}", "annotations": annotations},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration,
            "renewTime": format_micro_time(renewed),
        },
    }


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_self_only(clock: Clock) -> None:
    directory = ServerDirectory("s1", agent_endpoint=SELF, clock=clock)
    assert directory.agent_endpoints() == {"s1": SELF}
    assert directory.peer_endpoints() == {}
    assert directory.own_annotations() == {AGENT_ENDPOINT_ANNOTATION: "10.0.0.1:8091"}
    silent = ServerDirectory("s1", clock=clock)
    assert silent.agent_endpoints() == {} and silent.own_annotations() == {}
    both = ServerDirectory(
        "s1", agent_endpoint=SELF, peer_endpoint=Address("::1", 8095), clock=clock
    )
    assert both.own_annotations() == {
        AGENT_ENDPOINT_ANNOTATION: "10.0.0.1:8091",
        PEER_ENDPOINT_ANNOTATION: "[::1]:8095",
    }
    assert both.peer_endpoints() == {}  # never this server


def test_peers_from_valid_leases(clock: Clock) -> None:
    directory = ServerDirectory("s1", agent_endpoint=SELF, clock=clock)
    changed = directory.update(
        [
            lease("s1", agent="10.9.9.9:1"),  # ours: configuration wins
            lease("s2", agent="10.0.0.2:8091", peer="10.0.0.2:8095"),
            lease("s3", agent="[2001:db8::3]:8091"),
            lease("s4", peer="10.0.0.4:8095"),
            lease("s5"),  # no annotation: known, no endpoint
            lease("old", agent="10.0.0.6:8091", renewed=T0 - timedelta(seconds=31)),
            lease("", agent="10.0.0.7:8091"),  # no holder
            lease(None, agent="10.0.0.8:8091"),
        ]
    )
    assert changed
    assert directory.agent_endpoints() == {
        "s1": SELF,
        "s2": Address("10.0.0.2", 8091),
        "s3": Address("2001:db8::3", 8091),
    }
    assert directory.peer_endpoints() == {
        "s2": Address("10.0.0.2", 8095),
        "s4": Address("10.0.0.4", 8095),
    }
    # A list of s2 alone changes the set; a later renewal of it changes nothing.
    only = lease("s2", agent="10.0.0.2:8091", peer="10.0.0.2:8095")
    assert directory.update([only])
    clock.now = T0 + timedelta(seconds=10)
    renewed = lease("s2", agent="10.0.0.2:8091", peer="10.0.0.2:8095", renewed=clock.now)
    assert not directory.update([renewed])
    assert directory.agent_endpoints() == {"s1": SELF, "s2": Address("10.0.0.2", 8091)}


def test_expiry_between_lists(clock: Clock) -> None:
    """No list after the last one (the API server unreachable): a Lease that is not
    renewed drops out ``staleness`` after its expiry; a list that shows it expired, or
    without it (deleted), drops it at once."""
    grace = timedelta(seconds=10)
    directory = ServerDirectory("s1", agent_endpoint=SELF, clock=clock, staleness=grace)
    s2 = lease("s2", agent="h2:1", peer="h2:2", duration=30)
    s3 = lease("s3", agent="h3:1", peer="h3:2", duration=60)
    directory.update([s2, s3])
    clock.now = T0 + timedelta(seconds=30) + grace - timedelta(microseconds=1)
    assert set(directory.agent_endpoints()) == {"s1", "s2", "s3"}
    clock.now = T0 + timedelta(seconds=30) + grace
    assert set(directory.agent_endpoints()) == {"s1", "s3"}
    assert set(directory.peer_endpoints()) == {"s3"}
    # A list showing s3 expired drops it with no grace; so does one without it.
    clock.now = T0 + timedelta(seconds=60)
    assert directory.update([s2, s3])
    assert directory.agent_endpoints() == {"s1": SELF}
    directory.update([lease("s3", agent="h3:1", renewed=clock.now)])
    assert set(directory.agent_endpoints()) == {"s1", "s3"}
    directory.update([])
    assert directory.agent_endpoints() == {"s1": SELF}


def test_live_server_never_flickers_out_between_lists(clock: Clock) -> None:
    """Upstream's periods: a holder renews every 15 s (plus jitter) a Lease of 30 s, and
    the list comes every 15 s (plus jitter). A list made just before a renewal shows a
    Lease that expires before the next list; the server must stay listed meanwhile."""
    directory = ServerDirectory("s1", agent_endpoint=SELF, clock=clock)
    renewed = T0 - timedelta(seconds=15.5)  # the holder renews again at T0 + 0.1
    directory.update([lease("s2", agent="h2:1", renewed=renewed)])
    next_list = T0 + timedelta(seconds=15.6)
    for seconds in range(16):
        clock.now = min(T0 + timedelta(seconds=seconds), next_list)
        assert "s2" in directory.agent_endpoints(), clock.now
    # A server that died then goes with the list after its expiry.
    clock.now = next_list
    assert directory.update([lease("s2", agent="h2:1", renewed=renewed)])
    assert directory.agent_endpoints() == {"s1": SELF}


def test_freshest_lease_of_a_holder_wins(clock: Clock) -> None:
    directory = ServerDirectory("s1", clock=clock)
    directory.update(
        [
            lease("s2", agent="new:1", renewed=T0),
            lease("s2", agent="older:1", renewed=T0 - timedelta(seconds=10)),
        ]
    )
    assert directory.agent_endpoints() == {"s2": Address("new", 1)}
    directory.update(
        [
            lease("s2", agent="older:1", renewed=T0 - timedelta(seconds=10)),
            lease("s2", agent="new:1", renewed=T0),
        ]
    )
    assert directory.agent_endpoints() == {"s2": Address("new", 1)}


def test_malformed_leases_and_annotations_are_skipped(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    directory = ServerDirectory("s1", agent_endpoint=SELF, clock=clock)
    garbage: list[Any] = [
        "not a lease",
        {},
        {"spec": None},
        {"spec": {"holderIdentity": "x"}},  # no time: expired
        {"spec": {"holderIdentity": "y", "renewTime": "yesterday", "leaseDurationSeconds": 30}},
        {"metadata": "m", "spec": lease("z", agent="h:1")["spec"]},  # no annotations
        lease("bad1", agent="no-port", peer="h:1"),
        lease("bad2", agent=12, peer="[::1]"),
        lease("bad3", agent="a b:1"),
        lease("far", agent="far:1", renewed=datetime(9999, 12, 31, tzinfo=UTC)),
        lease("huge", agent="huge:1", duration=10**15),
        lease("neg", agent="neg:1", duration=-5),
        lease("str", agent="str:1", duration="30"),
    ]
    with caplog.at_level(logging.WARNING, "konnectivity_fast.server.directory"):
        directory.update(garbage)
        directory.update(garbage)
    assert directory.agent_endpoints() == {
        "s1": SELF,
        "far": Address("far", 1),
        "huge": Address("huge", 1),
    }
    assert directory.peer_endpoints() == {"bad1": Address("h", 1)}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4, warnings  # each bad value once, not once per list
    assert any("bad1" in w and AGENT_ENDPOINT_ANNOTATION in w for w in warnings)


def test_bounded_lowest_ids_first(clock: Clock) -> None:
    directory = ServerDirectory("s-self", agent_endpoint=SELF, clock=clock)
    many = [lease(f"s{i:03}", agent=f"10.1.{i // 250}.{i % 250}:8091") for i in range(300)]
    directory.update(reversed(many))
    endpoints = directory.agent_endpoints()
    assert len(endpoints) == MAX_DIRECTORY_SERVERS + 1 == MAX_SERVER_ENDPOINTS
    assert sorted(endpoints) == ["s-self"] + [f"s{i:03}" for i in range(MAX_DIRECTORY_SERVERS)]
    # The header carries all of them, this server included.
    header = format_server_endpoints(endpoints)
    assert parse_server_endpoints([header]) == endpoints


def test_peer_endpoints_is_a_source_callable(clock: Clock) -> None:
    """Peering holds ``directory.peer_endpoints`` and calls it when it needs peers."""
    directory = ServerDirectory("s1", clock=clock)
    source = directory.peer_endpoints
    assert source() == {}
    directory.update([lease("s2", peer="10.0.0.2:8095")])
    assert source() == {"s2": Address("10.0.0.2", 8095)}
