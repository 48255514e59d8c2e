"""Server Leases against a real kube-apiserver, upstream's e2e scenario: proxy-servers
with ``--enable-lease-controller`` (and no ``--server-count``) behind one round-robin
address; proxy-agents in the worker namespace with ``--count-server-leases`` connect to
every server as the servers go 2 -> 4 -> 2. Along the way the servers renew their
Leases and garbage-collect an expired one that matches their label. Ours and upstream's
v0.36.0 pair alike, and our servers with upstream's agents (our servers' Leases as
upstream counts them)."""

from __future__ import annotations

import datetime
import os
import subprocess
import time
from dataclasses import dataclass, field

import pytest

from tests.support.kubeapi import KubeCluster

from .support import (
    IMPLS,
    Balancer,
    Harness,
    ProxyServer,
    apply,
    balancer,
    get_json,
    kubectl,
    new_namespace,
    wait,
)

pytestmark = pytest.mark.timeout(240)

AGENTS = 2
# Upstream's lease controller: renew every 15 s, GC every 15 s, Leases of 30 s; a bound
# that covers a renewal and a GC pass with room for a slow machine.
LEASE_EVENT_SECONDS = 60.0
# Scaling steps: servers starting, agents seeing the Lease change and dialing until they
# hold one stream per server.
STEP_SECONDS = 60.0
READY_BACKENDS = "konnectivity_network_proxy_server_ready_backend_connections"
KNOWN_COUNT = "konnectivity_network_proxy_agent_known_server_count"
OPEN_SERVERS = "konnectivity_network_proxy_agent_open_server_connections"


def _micro_time(seconds_ago: float) -> str:
    when = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _leases(cluster: KubeCluster, ns: str, label: str) -> dict[str, dict[str, object]]:
    items = get_json(cluster, "leases", "-n", ns, "-l", label)["items"]
    return {item["metadata"]["name"]: item for item in items}


@dataclass
class Pool:
    """Lease-publishing proxy-servers of one implementation behind the balancer."""

    harness: Harness
    impl: str  # the servers'
    agent_impl: str
    cluster: KubeCluster
    namespace: str
    label: str
    lb: Balancer
    servers: dict[int, ProxyServer] = field(default_factory=dict)
    agents: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def lease_name(self, i: int) -> str:
        return f"konnectivity-proxy-server-{self.impl}-lease-{i}"

    def start(self, i: int) -> None:
        sock_dir = os.path.dirname(self.harness.uds)
        server = self.harness.start_server(
            self.impl,
            self.harness.apiservers.mode,
            f"{self.impl}-lease-{i}",
            "--enable-lease-controller",
            f"--lease-namespace={self.namespace}",
            f"--lease-label={self.label}",
            f"--kubeconfig={self.cluster.kubeconfig}",
            f"--cluster-ca-cert={self.harness.pki.ca_file}",
            agent_bind="127.0.0.1",
            uds=f"{sock_dir}/lease-{self.impl}-{i}.sock",
        )
        self.servers[i] = server
        self.lb.backends.append(("127.0.0.1", server.agent_port))

    def stop(self, i: int) -> None:
        server = self.servers.pop(i)
        self.lb.backends.remove(("127.0.0.1", server.agent_port))
        server.proc.terminate()
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()

    def start_agents(self) -> None:
        for a in range(AGENTS):
            self.agents.append(
                self.harness.start_agent(
                    self.agent_impl,
                    f"lease-agent-{self.agent_impl}-{a}",
                    self.lb.server_address[1],
                    *self.harness.mtls_agent_args(),
                    "--count-server-leases",
                    f"--lease-namespace={self.namespace}",
                    f"--lease-label={self.label}",
                    f"--kubeconfig={self.cluster.kubeconfig}",
                )
            )

    def settled(self, count: int) -> bool:
        """``count`` servers run, each with every agent, and every agent counts ``count``
        servers and holds that many streams."""
        for agent in self.agents:
            if agent.poll() is not None:
                raise AssertionError(f"an agent exited {agent.returncode}")
        if len(self.servers) != count:
            return False
        if any(s.metrics().get(READY_BACKENDS) != AGENTS for s in self.servers.values()):
            return False
        for agent in self.agents:
            m = self.harness.agent_metrics(agent)
            if m.get(KNOWN_COUNT) != count or m.get(OPEN_SERVERS) != count:
                return False
        return True

    def state(self) -> str:
        lines = [
            f"server {i}: {s.metrics().get(READY_BACKENDS)} agents" for i, s in self.servers.items()
        ]
        for agent in self.agents:
            m = self.harness.agent_metrics(agent)
            lines.append(f"agent: known {m.get(KNOWN_COUNT)} open {m.get(OPEN_SERVERS)}")
        return "; ".join(lines)

    def wait_settled(self, count: int) -> None:
        try:
            wait(
                lambda: self.settled(count),
                f"{count} servers, each with {AGENTS} agents",
                timeout=STEP_SECONDS,
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc} ({self.state()})") from None


# (servers, agents): each pair, and our servers' Leases counted by upstream's agents.
PAIRS = [(impl, impl) for impl in IMPLS] + [("ours", "upstream")]


@pytest.mark.parametrize(("impl", "agent_impl"), PAIRS, ids=["ours", "upstream", "ours-server"])
def test_agents_follow_the_server_leases(harness: Harness, impl: str, agent_impl: str) -> None:
    cluster = harness.apiservers.get()
    ns = new_namespace(cluster, "leases")
    label_value = f"kf-{impl}-servers"
    # An expired Lease with the servers' label: GC deletes it, agents never count it.
    apply(
        cluster,
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": "konnectivity-proxy-server-gone",
                "namespace": ns,
                "labels": {"k8s-app": label_value},
            },
            "spec": {
                "holderIdentity": "gone",
                "leaseDurationSeconds": 30,
                "renewTime": _micro_time(3600),
            },
        },
    )
    with balancer(harness.worker.root_ip) as lb:
        pool = Pool(harness, impl, agent_impl, cluster, ns, f"k8s-app={label_value}", lb)
        pool.start(1)
        pool.start(2)
        wait(lambda: pool.lease_name(2) in _leases(cluster, ns, pool.label), "the servers' Leases")
        first = _leases(cluster, ns, pool.label)[pool.lease_name(1)]["spec"]
        pool.start_agents()
        pool.wait_settled(2)
        pool.start(3)
        pool.start(4)
        pool.wait_settled(4)
        pool.stop(4)
        pool.stop(3)
        pool.wait_settled(2)

    # The stopped servers deleted their Leases, the expired one was culled, the running
    # ones renewed theirs.
    def leases_settled() -> bool:
        leases = _leases(cluster, ns, pool.label)
        return set(leases) == {pool.lease_name(1), pool.lease_name(2)} and (
            leases[pool.lease_name(1)]["spec"] != first
        )

    deadline = time.monotonic() + LEASE_EVENT_SECONDS
    while not leases_settled() and time.monotonic() < deadline:
        time.sleep(0.5)
    leases = _leases(cluster, ns, pool.label)
    assert leases_settled(), {name: item["spec"] for name, item in leases.items()}
    for i in (1, 2):
        spec = leases[pool.lease_name(i)]["spec"]
        assert isinstance(spec, dict)
        assert spec["holderIdentity"] == f"{impl}-lease-{i}"
        assert spec["leaseDurationSeconds"] == 30
    kubectl(cluster, "delete", "namespace", ns, "--wait=false", check=False)
