"""Highly available control planes behind a sticky load balancer, with real kube-apiservers
(issue 17, "Prove it"): three kube-apiservers on one etcd, each with its own proxy-server
(``--server-count=3``), HAProxy in front of the servers' agent ports (round robin,
``balance source``, one port per server), two workers with an agent and a kubelet each
(topology: ha.py). Every check is ``/api/v1/nodes/<node>/proxy/...`` through each of the
three replicas, for both nodes.

1. The problem, reproduced (the guard): upstream v0.36.0's servers and agents through the
   sticky port: each agent holds one server of three, and replicas whose server holds no
   agent of a node answer ``No agent available`` for the whole window.
2. Our agents with ``--proxy-server-list`` (each server's own HAProxy port) against
   upstream's servers, through the sticky port: every agent holds 3/3, every replica
   answers for both nodes.
3. Detection: our agents through the sticky port with no new flag say so
   (``konnectivity_fast_agent_lb_sticky_suspected`` 1, "looks sticky" in the log).
4. ``--server-discovery=headers``, our servers with ``--agent-advertise-address=<their own
   HAProxy port>`` and the lease controller: once the servers know each other, agents
   through the sticky port hold 3/3 within 10 s. Agents that joined while their server
   knew only itself suspect the balancer (gauge 1), learn the others from a later answer,
   hold 3/3 and clear the gauge (0); with no server count to say more exist, they learn
   them when they re-read the list.
5. ``--server-discovery=leases`` against the same servers: 3/3, every replica answers;
   in the long form a 4th server joins (every agent within 30 s) and is killed (missing
   count back at 0 once its Lease expired).
6. Server peering with upstream's agents through the sticky port: every replica answers
   for both nodes though a server holds no agent; a Node no agent serves gets
   ``No agent available`` from each replica in under a second.

``KF_HA=long`` (``make ha``): a minute-long guard window, scenarios 2 and 3 with both
server implementations, and the 4th server of scenario 5.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from tests.support.net import free_ports

from .ha import (
    KNOWN,
    LONG,
    MISSING,
    MODE,
    OPEN,
    READY_BACKENDS,
    REPLICAS,
    STICKY,
    Plane,
    Run,
    ha_plane,
)
from .support import Harness

# The first test also starts the module's three kube-apiservers.
pytestmark = pytest.mark.timeout(900 if LONG else 300)

GUARD_SECONDS = 60.0 if LONG else 15.0
# The bound for header discovery: every agent holds 3/3 within 10 s.
HEADERS_SECONDS = 10.0
# A server lists the Leases every 15 s (+10 % jitter); an agent that met it before re-reads
# its list 15 s later (clientset.HEADER_REFRESH_FIRST), then 30 s later: the third server
# is known to every agent within these two periods, plus the dials.
LATER_HEADERS_SECONDS = 50.0
# A server started later is held by every agent within this (the bound); a killed
# one's Lease expires 30 s after its last renewal (every 15 s), then agents list again.
FOURTH_SERVER_SECONDS = 30.0
LEASE_EXPIRY_SECONDS = 75.0
# What our server logs when its directory of the other servers changes.
KNOWN_FROM_LEASES = "servers known from Leases: "
# The bound for "No agent available" with peering and no agent anywhere.
NO_AGENT_SECONDS = 1.0
# Server implementations of scenarios 2 and 3: the short form takes the one that proves
# most (upstream's servers for the static list, ours for detection), the long both.
LONG_ONLY = pytest.mark.slow


def _impls(short: str) -> list[object]:
    other = "ours" if short == "upstream" else "upstream"
    return [short, pytest.param(other, marks=LONG_ONLY)] if LONG else [short]


@pytest.fixture(scope="module")
def plane(k8s: Harness, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    with ha_plane(k8s, tmp_path_factory.mktemp("ha")) as p:
        yield p


def test_guard_upstream_behind_sticky_balancer(plane: Plane, harness: Harness) -> None:
    run = plane.start(harness, servers="upstream", agents="upstream")
    run.wait_agents(KNOWN, REPLICAS)
    run.wait_agents(OPEN, 1)
    nodes = plane.nodes

    def each_node_served() -> bool:
        answers = run.answers()
        return all(any(answers[(r, n.name)].ok(n) for r in range(REPLICAS)) for n in nodes)

    run.wait(each_node_served, "each node answered by some replica", 30.0)
    history = run.watch(GUARD_SECONDS)
    summary = {pair: [a.status for a in answers] for pair, answers in history.items()}
    by_name = {n.name: n for n in nodes}
    # Only two outcomes: the node's kubelet, or upstream's error.
    for (_, name), answers in history.items():
        for a in answers:
            assert a.ok(by_name[name]) or a.no_agent(), (a, summary)
    # The problem: a replica answers "No agent available" for a node all window long.
    stuck = [pair for pair, answers in history.items() if all(a.no_agent() for a in answers)]
    assert stuck, summary
    # ... while the harness reaches both kubelets (through the server each agent holds).
    for n in nodes:
        assert any(all(a.ok(n) for a in history[(r, n.name)]) for r in range(REPLICAS)), summary
    for node in run.agents:
        assert run.agent_metric(node, OPEN) == 1, run.state()
    print(f"guard: {len(stuck)} of {len(history)} (replica, node) pairs stuck: {summary}")


@pytest.mark.parametrize("servers", _impls("upstream"))
def test_static_list_reaches_every_server(plane: Plane, harness: Harness, servers: str) -> None:
    run = plane.start(
        harness, servers=servers, agents="ours", agent_flags=["--proxy-server-list={server_list}"]
    )
    held = run.wait_agents(OPEN, REPLICAS)
    answered = run.wait_all_answer()
    for node in run.agents:
        assert run.agent_metric(node, MISSING) == 0, run.state()
        assert run.agent_metric(node, STICKY) in (None, 0), run.state()
    for server in run.servers:
        assert server.metrics().get(READY_BACKENDS) == len(plane.nodes), run.state()
    print(f"3/3 held after {held:.1f} s, every replica answering {answered:.1f} s later")


@pytest.mark.parametrize("servers", _impls("ours"))
def test_sticky_balancer_detected(plane: Plane, harness: Harness, servers: str) -> None:
    run = plane.start(harness, servers=servers, agents="ours")
    run.wait_agents(STICKY, 1)
    for node in run.agents:
        assert run.agent_metric(node, OPEN) == 1, run.state()
        assert run.agent_metric(node, KNOWN) == REPLICAS, run.state()
        assert "looks sticky" in run.agent_log(node)
    # Detected, not yet fixed: some replica still has no agent for some node.
    assert any(a.no_agent() for a in run.answers().values())


# Our servers advertising each replica's own HAProxy port, shared through their Leases
# (the lease controller beside each kube-apiserver, one namespace per scenario).
ADVERTISING = [
    "--agent-advertise-address={advertise}",
    "--enable-lease-controller",
    "--kubeconfig={kubeconfig}",
    "--lease-namespace={namespace}",
]


def _directories_complete(run: Run) -> bool:
    """Every server's last "servers known from Leases" line names the two others."""
    for i in range(REPLICAS):
        lines = [
            line
            for line in run.harness.procs.log(f"server-s{i}").splitlines()
            if KNOWN_FROM_LEASES in line
        ]
        others = [f"s{j}" for j in range(REPLICAS) if j != i]
        if not lines or not all(re.search(rf"\b{o} \(agents ", lines[-1]) for o in others):
            return False
    return True


def test_header_discovery_reaches_every_server(plane: Plane, harness: Harness) -> None:
    """Servers that know each other (their first Lease lists after start-up), then our
    agents through the sticky port: each learns every replica from the first header."""
    run = plane.start_servers(harness, "ours", ADVERTISING, server_count=None)
    run.wait(lambda: _directories_complete(run), "every server knowing the others", 45.0)
    run.start_agents("ours", ["--server-discovery=headers"])
    held = run.wait_agents(OPEN, REPLICAS, timeout=HEADERS_SECONDS)
    answered = run.wait_all_answer()
    for node in run.agents:
        assert run.agent_metric(node, MISSING) == 0, run.state()
        assert run.agent_metric(node, STICKY) in (None, 0), run.state()
    print(f"headers: 3/3 held after {held:.1f} s, every replica answering {answered:.1f} s later")


def test_header_discovery_learns_servers_known_later(plane: Plane, harness: Harness) -> None:
    """Our agents join at once, through a balancer whose pool holds s0 alone (started first,
    so its first Lease list knew no other server). Short of the 3 servers s0 counts, they
    suspect the balancer (gauge 1), and keep dialling it; once s0 lists the others'
    Leases, the next answer names them, the agents dial them directly, hold 3/3, and the
    gauge goes back to 0."""
    run = plane.start(
        harness,
        servers="ours",
        server_flags=ADVERTISING,
        agent_flags=["--server-discovery=headers"],
        via="s0",
    )
    run.wait_agents(STICKY, 1)
    run.wait_agents(OPEN, REPLICAS, timeout=LATER_HEADERS_SECONDS)
    run.wait_agents(STICKY, 0)
    run.wait_all_answer()
    for node in run.agents:
        assert run.agent_metric(node, MISSING) == 0, run.state()
        assert "looks sticky" in run.agent_log(node)


def test_header_discovery_refreshes_when_nothing_is_missing(plane: Plane, harness: Harness) -> None:
    """As above, but every server counts only itself (no --server-count): nothing tells
    the agents that more exist until they re-read s0's list (``HEADER_REFRESH_FIRST``
    after they met it)."""
    run = plane.start(
        harness,
        servers="ours",
        server_flags=ADVERTISING,
        server_count=None,
        agent_flags=["--server-discovery=headers"],
        via="s0",
    )
    run.wait_agents(OPEN, REPLICAS, timeout=LATER_HEADERS_SECONDS)
    run.wait_all_answer()


def test_lease_discovery_reaches_every_server(plane: Plane, harness: Harness) -> None:
    run = plane.start(
        harness,
        servers="ours",
        server_flags=ADVERTISING,
        server_count=None,
        agent_flags=[
            "--server-discovery=leases",
            "--count-server-leases",
            "--kubeconfig={kubeconfig}",
            "--lease-namespace={namespace}",
        ],
    )
    held = run.wait_agents(OPEN, REPLICAS)
    answered = run.wait_all_answer()
    for node in run.agents:
        assert run.agent_metric(node, MISSING) == 0, run.state()
    print(f"leases: 3/3 held after {held:.1f} s, every replica answering {answered:.1f} s later")
    if LONG:
        _fourth_server_comes_and_goes(plane, harness, run)


def _fourth_server_comes_and_goes(plane: Plane, harness: Harness, run: Run) -> None:
    """A 4th server (beside no kube-apiserver, in no balancer pool: reachable only at its
    advertised address) gets every agent within 30 s; killed (its Lease left to expire),
    the agents' missing count is back at 0 once the Lease has expired."""
    (port,) = free_ports(1, plane.dial)
    extra = harness.start_server(
        "ours",
        MODE,
        "s3",
        f"--cluster-ca-cert={harness.pki.ca_file}",
        "--proxy-strategies=destHost",
        f"--agent-advertise-address={plane.dial}:{port}",
        "--enable-lease-controller",
        f"--kubeconfig={plane.replicas[0].kubeconfig}",
        f"--lease-namespace={run.namespace}",
        agent_bind=plane.dial,
        agent_port=port,
        uds=os.path.join(os.path.dirname(plane.uds[0]), "ha-extra.sock"),
    )
    joined = run.wait_agents(OPEN, REPLICAS + 1, timeout=FOURTH_SERVER_SECONDS)
    assert extra.metrics().get(READY_BACKENDS) == len(plane.nodes), run.state()
    extra.proc.kill()
    extra.proc.wait(timeout=30)
    run.wait_agents(OPEN, REPLICAS)
    # Its Lease, renewed within the last 15 s, still counts for 15 s at least: missing.
    for node in run.agents:
        assert run.agent_metric(node, MISSING) == 1, run.state()
    gone = run.wait_agents(MISSING, 0, timeout=LEASE_EXPIRY_SECONDS)
    run.wait_all_answer()
    print(f"leases: s3 held by every agent after {joined:.1f} s, forgotten {gone:.1f} s after")


def test_peering_serves_upstream_agents(plane: Plane, harness: Harness) -> None:
    run = plane.start(
        harness,
        servers="ours",
        agents="upstream",
        server_flags=[
            "--enable-peer-forwarding",
            "--peer-port={peer_port}",
            "--peer-bind-address=127.0.0.1",
            "--peer-endpoints={peer_endpoints}",
            "--peer-cert={cert}",
            "--peer-key={key}",
            "--peer-ca-cert={ca}",
        ],
    )
    run.wait_agents(OPEN, 1)
    run.wait_all_answer()
    # Still one server per agent (two agents, three servers): a replica whose server holds
    # no agent at all answered for both nodes, through a peer.
    assert all(run.agent_metric(node, OPEN) == 1 for node in run.agents), run.state()
    assert min(s.metrics().get(READY_BACKENDS, -1) for s in run.servers) == 0, run.state()
    # No agent anywhere: upstream's error, from every replica, at once.
    for r in range(REPLICAS):
        start = time.monotonic()
        answer = run.answer(r, plane.ghost)
        took = time.monotonic() - start
        assert answer.no_agent(), answer
        assert took < NO_AGENT_SECONDS, f"replica {r}: {took:.2f} s"
