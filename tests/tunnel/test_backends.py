"""Port stripping, the three backend managers, the strategy chain and readiness
(pkg/server/backend_manager.go and its siblings; the agent identifiers they read are
tested in tests/wire/test_contract.py)."""

from __future__ import annotations

from collections import Counter
from random import Random

import pytest

from konnectivity_fast.tunnel import (
    AgentIdentifiers,
    Backend,
    BackendManagers,
    DefaultBackendManager,
    DefaultRouteBackendManager,
    DestHostBackendManager,
    remove_port_from_host,
)

_ids = iter(range(1, 1_000_000))


def backend(
    agent_id: str, identifiers: AgentIdentifiers | None = None, *, draining: bool = False
) -> Backend:
    made = Backend(next(_ids), agent_id, identifiers or AgentIdentifiers())
    made.draining = draining
    return made


# --- port stripping -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("node1:10250", "node1"),
        ("10.0.0.5:443", "10.0.0.5"),
        ("node1", "node1"),
        ("", ""),
        ("[fe80::1]:443", "fe80::1"),
        ("fe80::1", "fe80::1"),
        ("::1", "::1"),
        ("[fe80::1]", "fe80:"),  # upstream's quirk, kept
    ],
)
def test_remove_port_from_host(address: str, host: str) -> None:
    assert remove_port_from_host(address) == host


# --- default ----------------------------------------------------------------------------------


def test_default_picks_every_agent_at_random() -> None:
    manager = DefaultBackendManager(Random(7))
    streams = [backend(f"agent{i}") for i in range(4)]
    for stream in streams:
        manager.add_backend(stream)
    picks = Counter(manager.backend("x:1") for _ in range(400))
    assert set(picks) == set(streams)
    assert manager.num_backends() == 4


def test_default_prefers_the_first_stream_of_an_agent() -> None:
    manager = DefaultBackendManager(Random(1))
    first, second = backend("a"), backend("a")
    assert manager.add_backend(first)
    assert not manager.add_backend(second)  # no new key
    assert not manager.add_backend(first)  # already there
    assert {manager.backend("x:1") for _ in range(20)} == {first}
    assert manager.num_backends() == 1
    assert manager.remove_backend(first)
    assert manager.backend("x:1") is second
    assert manager.remove_backend(second)
    assert not manager.remove_backend(second)
    assert manager.backend("x:1") is None
    assert manager.num_backends() == 0


def test_default_avoids_draining_agents() -> None:
    manager = DefaultBackendManager(Random(3))
    drained = [backend(f"d{i}", draining=True) for i in range(3)]
    fresh = backend("fresh")
    for stream in [*drained, fresh]:
        manager.add_backend(stream)
    assert {manager.backend("x:1") for _ in range(50)} == {fresh}


def test_default_falls_back_to_a_draining_agent() -> None:
    manager = DefaultBackendManager(Random(3))
    drained = [backend(f"d{i}", draining=True) for i in range(3)]
    for stream in drained:
        manager.add_backend(stream)
    picks = {manager.backend("x:1") for _ in range(100)}
    assert picks <= set(drained)
    assert len(picks) > 1  # the first draining one seen from a random start


def test_default_only_looks_at_the_first_stream_of_each_agent() -> None:
    # A draining first stream hides its agent's other streams (upstream reads index 0).
    manager = DefaultBackendManager(Random(3))
    hidden_first = backend("a", draining=True)
    manager.add_backend(hidden_first)
    manager.add_backend(backend("a"))
    assert manager.backend("x:1") is hidden_first


def test_default_removal_keeps_keys_consistent() -> None:
    manager = DefaultBackendManager(Random(5))
    streams = {name: backend(name) for name in "abcde"}
    for stream in streams.values():
        manager.add_backend(stream)
    manager.remove_backend(streams["b"])
    manager.remove_backend(streams["a"])
    picks = {manager.backend("x:1") for _ in range(200)}
    assert picks == {streams["c"], streams["d"], streams["e"]}


# --- destHost ---------------------------------------------------------------------------------


def test_dest_host_matches_identifiers_exactly() -> None:
    manager = DestHostBackendManager(Random(1))
    node = backend(
        "a",
        AgentIdentifiers(
            ipv4=("10.0.0.1",), ipv6=("fe80::1",), host=("node1",), cidr=("10.0.0.0/8",)
        ),
    )
    manager.add_backend(node)
    assert manager.num_backends() == 3  # cidr is not a key
    assert manager.backend("10.0.0.1:10250") is node
    assert manager.backend("[fe80::1]:443") is node
    assert manager.backend("fe80::1") is node
    assert manager.backend("node1:22") is node
    assert manager.backend("node1") is node
    assert manager.backend("NODE1:22") is None  # case-sensitive
    assert manager.backend("10.0.0.2:80") is None  # no CIDR matching
    assert manager.backend("node1.example:22") is None
    assert manager.backend("") is None


def test_dest_host_prefers_non_draining_in_arrival_order() -> None:
    manager = DestHostBackendManager(Random(1))
    ids = AgentIdentifiers(host=("shared",))
    first, second, third = backend("a", ids), backend("b", ids), backend("c", ids)
    for stream in (first, second, third):
        manager.add_backend(stream)
    assert manager.backend("shared:1") is first
    first.draining = True
    assert manager.backend("shared:1") is second
    second.draining = third.draining = True
    assert manager.backend("shared:1") is first
    manager.remove_backend(first)
    assert manager.backend("shared:1") is second


def test_dest_host_ignores_agents_without_identifiers() -> None:
    manager = DestHostBackendManager(Random(1))
    manager.add_backend(backend("a"))
    assert manager.num_backends() == 0


def test_dest_host_duplicate_identifiers() -> None:
    manager = DestHostBackendManager(Random(1))
    node = backend("a", AgentIdentifiers(ipv4=("1.2.3.4",), host=("1.2.3.4", "n", "n")))
    manager.add_backend(node)
    assert manager.num_backends() == 2
    assert manager.remove_backend(node)
    assert manager.num_backends() == 0


# --- defaultRoute -----------------------------------------------------------------------------


def test_default_route_only_holds_default_route_agents() -> None:
    manager = DefaultRouteBackendManager(Random(2))
    plain = backend("plain")
    router_agent = backend("gw", AgentIdentifiers(default_route=True))
    manager.add_backend(plain)
    assert manager.backend("x:1") is None
    manager.add_backend(router_agent)
    assert {manager.backend("x:1") for _ in range(20)} == {router_agent}
    assert manager.num_backends() == 1


# --- the chain and readiness ------------------------------------------------------------------


def test_chain_dest_host_then_default() -> None:
    chain = BackendManagers(["destHost", "default"], Random(4))
    node = backend("a", AgentIdentifiers(host=("node1",)))
    other = backend("b")
    chain.add_backend(node)
    chain.add_backend(other)
    assert {chain.backend("node1:10250") for _ in range(20)} == {node}
    assert {chain.backend("elsewhere:1") for _ in range(50)} == {node, other}


def test_chain_dest_host_then_default_route() -> None:
    chain = BackendManagers(["destHost", "defaultRoute"], Random(4))
    plain = backend("plain", AgentIdentifiers(host=("n1",)))
    gateway = backend("gw", AgentIdentifiers(default_route=True))
    chain.add_backend(plain)
    chain.add_backend(gateway)
    assert chain.backend("n1:1") is plain
    assert {chain.backend("other:1") for _ in range(20)} == {gateway}
    chain.remove_backend(gateway)
    assert chain.backend("other:1") is None


def test_chain_needs_a_strategy() -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        BackendManagers([], Random(1))


def test_readiness_follows_the_first_manager() -> None:
    chain = BackendManagers(["destHost", "default"], Random(1))
    plain = backend("plain")
    chain.add_backend(plain)
    assert not chain.ready  # no host identifiers: destHost stays empty
    assert chain.ready_backends() == {"destHost": 0, "default": 1}
    node = backend("n", AgentIdentifiers(host=("h1", "h2")))
    chain.add_backend(node)
    assert chain.ready
    assert chain.ready_backends() == {"destHost": 2, "default": 2}
    chain.remove_backend(node)
    assert not chain.ready


def test_readiness_counts_draining_agents() -> None:
    chain = BackendManagers(["default"], Random(1))
    assert not chain.ready
    chain.add_backend(backend("a", draining=True))
    assert chain.ready


def test_ready_backend_connections_follows_the_last_manager_changed() -> None:
    chain = BackendManagers(["default", "destHost"], Random(1))
    assert chain.ready_backend_connections == 0
    chain.add_backend(backend("a"))  # only default gets a key
    assert chain.ready_backend_connections == 1
    chain.add_backend(backend("b", AgentIdentifiers(host=("x", "y", "z"))))
    assert chain.ready_backend_connections == 3  # destHost changed last


def test_duplicate_strategies_are_allowed() -> None:
    chain = BackendManagers(["default", "default"], Random(1))
    assert len(chain.managers) == 2
    stream = backend("a")
    chain.add_backend(stream)
    assert chain.backend("x:1") is stream
    assert chain.ready_backends() == {"default": 1}
