"""A highly available control plane for the Kubernetes end-to-end tests (issue 17: agents
reach every server even behind a sticky load balancer)::

    root namespace                                                   worker A (kf-worker)
      kube-apiserver r0 --uds--> proxy-server s0  127.0.0.1:a0 <-+     agent, kubelet A
      kube-apiserver r1 --uds--> proxy-server s1  127.0.0.1:a1 <-+--    ^
      kube-apiserver r2 --uds--> proxy-server s2  127.0.0.1:a2 <-+  |   | veth
      (one etcd, one prefix)                                        |   |
                               HAProxy on DIAL (worker A's ROOT_IP) ----+  worker B
                               rr: roundrobin, sticky: balance source,     (kf-worker-2)
                               s0, s1, s2: one server each         <------ agent, kubelet B

- **Two workers**, each a network namespace of its own with a fake kubelet on its own
  address and one agent (``--agent-identifiers=ipv4=<that kubelet>``); the servers route
  by ``--proxy-strategies=destHost`` alone, so a replica whose server holds no agent of a
  node answers ``No agent available`` (never a dial through the other worker, which could
  not reach that kubelet anyway). Worker B dials worker A's ROOT_IP through its own veth
  (``worker_namespace(via=...)``): one address, one certificate and one HAProxy bind serve
  both, and HAProxy still sees two sources (``balance source`` treats them as two
  clients).
- **Three kube-apiservers** on the session's etcd under one prefix (so one Node list),
  each with an egress selector naming its own proxy-server's Unix socket (gRPC), bound on
  DIAL, so agents in either worker can reach them too (``{kubeconfig}``).
- **Every check** is a request through a real kube-apiserver on each replica, for each
  node: ``GET /api/v1/nodes/<node>/proxy/address``, which the node's kubelet answers with
  its own address.

``ha_plane`` holds what lives for a module (workers, kubelets, apiservers, Nodes, and a
"ghost" Node no agent serves); ``Plane.start`` starts one scenario's servers, HAProxy and
agents (``start_servers`` then ``Run.start_agents``, to act in between), all stopped by the
``harness`` fixture after the test. Flags are templates filled per server and per agent
(``SERVER_FIELDS``, ``AGENT_FIELDS``), so a scenario is a few lines::

    run = plane.start(harness, servers="ours", agents="upstream",
                      server_flags=["--enable-peer-forwarding", "--peer-port={peer_port}"])
    run.wait_all_answer()  # every replica, both nodes, 200 from the right kubelet

Checks: ``Run.answer``/``answers``/``all_answer``/``wait_all_answer``/``watch`` (through
the replicas), ``Run.agent_metric``/``wait_agents``/``agent_log``, ``Run.state`` (for
messages), ``Run.wait`` (any bounded wait that fails with the answers and the state).

``KF_HA=long`` is the long form (longer guard window, every pairing); needs root, iproute2
and HAProxy (scripts/bootstrap.sh), skipped without them except in CI.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.haproxy import Section, haproxy_config, require_haproxy
from tests.support.kubeapi import KubeCluster, running_apiserver
from tests.support.net import free_ports
from tests.support.upstream import stop

from .support import (
    KUBELET_PORT,
    MODES,
    NODE_NAME,
    ROOT,
    Harness,
    ProxyServer,
    Worker,
    admin_ssl,
    egress_config,
    new_namespace,
    register_node,
    worker_namespace,
)

#: The long form (``KF_HA=long``): a longer guard window and every server/agent pairing.
LONG = os.environ.get("KF_HA", "") == "long"
REPLICAS = 3
ETCD_PREFIX = "/registry-ha"
MODE = "grpc-uds"  # each apiserver's egress: its own server's Unix socket
NODE_B = "kf-worker-2"
GHOST = "kf-ghost"
# Agent metrics (upstream's names, then ours: registered only when the feature is on).
OPEN = "konnectivity_network_proxy_agent_open_server_connections"
KNOWN = "konnectivity_network_proxy_agent_known_server_count"
STICKY = "konnectivity_fast_agent_lb_sticky_suspected"
MISSING = "konnectivity_fast_agent_missing_servers"
READY_BACKENDS = "konnectivity_network_proxy_server_ready_backend_connections"
NO_AGENT = "No agent available"
# Bounds: one node-proxy request; agents settling and replicas answering; polling steps.
REQUEST_SECONDS = 10.0
SETTLE_SECONDS = 30.0
POLL_SECONDS = 0.25
WATCH_STEP_SECONDS = 1.0
KUBELET_START_SECONDS = 30.0

#: Fields of ``server_flags`` templates (``str.format``), per server i.
SERVER_FIELDS = (
    "index",  # i
    "id",  # its --server-id, s<i>
    "advertise",  # DIAL:<HAProxy port of server i alone>, what agents may dial for it
    "server_list",  # every server's own HAProxy address, comma-separated
    "peer_port",  # a free port reserved for server i (e.g. --peer-port)
    "peer_endpoints",  # <id>=127.0.0.1:<peer_port> of every other server, comma-separated
    "kubeconfig",  # admin kubeconfig of the kube-apiserver beside it
    "namespace",  # a namespace made for this scenario (e.g. --lease-namespace)
    "cert",  # the servers' certificate (127.0.0.1 and DIAL), key and CA: e.g. --peer-cert
    "key",
    "ca",
)
#: Fields of ``agent_flags`` templates, per agent (one per node).
AGENT_FIELDS = (
    "node",  # the Node's name
    "host",  # DIAL
    "server_list",
    "rr_port",
    "sticky_port",
    "kubeconfig",  # admin kubeconfig of replica 0 (reachable from the workers)
    "namespace",
)


@dataclass(frozen=True)
class Node:
    name: str
    worker: Worker
    # The kubelet's address: what its node proxy answers, its agent's identifier.
    address: str


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no HTTP answer at all (the body says why)
    body: str

    def ok(self, node: Node) -> bool:
        return self.status == 200 and self.body == node.address

    def no_agent(self) -> bool:
        return self.status != 200 and NO_AGENT in self.body


Pair = tuple[int, str]  # (replica, node name)


@dataclass(frozen=True)
class Ports:
    """HAProxy's frontends on DIAL (reserved before anything starts, so that flags can
    name them) and one spare port per server."""

    rr: int
    sticky: int
    direct: tuple[int, ...]  # server i alone
    peer: tuple[int, ...]


@dataclass
class Plane:
    """The module-lifetime part: nodes, kube-apiserver replicas (``replicas[i]`` egresses
    through ``uds[i]``, served by server i)."""

    k8s: Harness
    nodes: tuple[Node, ...]
    ghost: Node  # a registered Node that no agent serves (its address is nowhere)
    replicas: tuple[KubeCluster, ...]
    uds: tuple[str, ...]
    context: ssl.SSLContext  # system:masters, trusted by every replica

    @property
    def dial(self) -> str:
        return self.k8s.worker.root_ip

    def start(
        self,
        harness: Harness,
        *,
        servers: str = "ours",
        agents: str = "ours",
        server_flags: Sequence[str] = (),
        agent_flags: Sequence[str] = (),
        via: str = "sticky",
        server_count: int | None = REPLICAS,
    ) -> Run:
        """One scenario: ``start_servers`` then ``Run.start_agents``."""
        run = self.start_servers(harness, servers, server_flags, server_count=server_count)
        run.start_agents(agents, agent_flags, via=via)
        return run

    def start_servers(
        self,
        harness: Harness,
        servers: str = "ours",
        server_flags: Sequence[str] = (),
        *,
        server_count: int | None = REPLICAS,
    ) -> Run:
        """``servers`` ("ours" | "upstream") beside each replica with ``server_flags``,
        then HAProxy. ``server_count`` None leaves ``--server-count`` out (e.g. with the
        lease controller)."""
        haproxy = require_haproxy()
        rr, sticky, *direct = free_ports(2 + REPLICAS, self.dial)
        ports = Ports(rr, sticky, tuple(direct), tuple(free_ports(REPLICAS)))
        run = Run(self, harness, ports, new_namespace(self.replicas[0], "ha"))
        for i in range(REPLICAS):
            fields = {
                "index": i,
                "id": f"s{i}",
                "advertise": f"{self.dial}:{ports.direct[i]}",
                "server_list": run.server_list,
                "peer_port": ports.peer[i],
                "peer_endpoints": ",".join(
                    f"s{j}=127.0.0.1:{ports.peer[j]}" for j in range(REPLICAS) if j != i
                ),
                "kubeconfig": self.replicas[i].kubeconfig,
                "namespace": run.namespace,
                "cert": harness.pki.proxy_cert,
                "key": harness.pki.proxy_key,
                "ca": harness.pki.ca_file,
            }
            count = [f"--server-count={server_count}"] if server_count is not None else []
            run.servers.append(
                harness.start_server(
                    servers,
                    MODE,
                    f"s{i}",
                    f"--cluster-ca-cert={harness.pki.ca_file}",  # agents: mTLS
                    "--proxy-strategies=destHost",
                    *count,
                    *(flag.format(**fields) for flag in server_flags),
                    agent_bind="127.0.0.1",
                    uds=self.uds[i],
                )
            )
        config = harness.folder / "haproxy.cfg"
        sections = haproxy_sections(self.dial, ports, [s.agent_port for s in run.servers])
        config.write_text(haproxy_config(sections))
        run.haproxy = harness.procs.start("haproxy", [haproxy, "-f", str(config), "-db"])
        return run


def haproxy_sections(dial: str, ports: Ports, backends: list[int]) -> list[Section]:
    """TCP frontends on ``dial``: round robin, ``balance source`` and one per server."""
    servers = [f"    server s{i} 127.0.0.1:{p} check inter 1s" for i, p in enumerate(backends)]
    sections: list[Section] = [
        ("rr", f"{dial}:{ports.rr}", "roundrobin", servers),
        ("sticky", f"{dial}:{ports.sticky}", "source", servers),
    ]
    sections += [
        (f"s{i}", f"{dial}:{p}", "first", [servers[i]]) for i, p in enumerate(ports.direct)
    ]
    return sections


@dataclass
class Run:
    """One scenario's programs, and the checks: every one a request through a replica."""

    plane: Plane
    harness: Harness
    ports: Ports
    namespace: str  # made for this scenario
    servers: list[ProxyServer] = field(default_factory=list)
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    haproxy: subprocess.Popen[bytes] | None = None

    @property
    def server_list(self) -> str:
        """Every server's own HAProxy address, comma-separated."""
        return ",".join(f"{self.plane.dial}:{p}" for p in self.ports.direct)

    def start_agents(
        self, agents: str = "ours", agent_flags: Sequence[str] = (), *, via: str = "sticky"
    ) -> None:
        """One ``agents`` ("ours" | "upstream") per node with ``agent_flags``, dialing
        HAProxy's ``via`` port: "sticky", "rr", or "s<i>" (server i alone: a balancer
        whose pool lacks the others)."""
        ports = {"sticky": self.ports.sticky, "rr": self.ports.rr}
        ports.update({f"s{i}": p for i, p in enumerate(self.ports.direct)})
        for node in self.plane.nodes:
            fields = {
                "node": node.name,
                "host": self.plane.dial,
                "server_list": self.server_list,
                "rr_port": self.ports.rr,
                "sticky_port": self.ports.sticky,
                "kubeconfig": self.plane.replicas[0].kubeconfig,
                "namespace": self.namespace,
            }
            self.agents[node.name] = self.harness.start_agent(
                agents,
                node.name,
                ports[via],
                *self.harness.mtls_agent_args(),
                f"--agent-identifiers=ipv4={node.address}",
                *(flag.format(**fields) for flag in agent_flags),
                worker=node.worker,
            )

    # -- through the kube-apiservers ------------------------------------------------------

    def answer(self, replica: int, node: Node) -> Answer:
        """``GET /api/v1/nodes/<node>/proxy/address`` on ``replica``."""
        server = self.plane.replicas[replica].server.removeprefix("https://")
        host, port = server.rsplit(":", 1)
        conn = http.client.HTTPSConnection(
            host, int(port), context=self.plane.context, timeout=REQUEST_SECONDS
        )
        try:
            conn.request("GET", f"/api/v1/nodes/{node.name}/proxy/address")
            resp = conn.getresponse()
            return Answer(resp.status, resp.read().decode(errors="replace"))
        except OSError as exc:
            return Answer(0, repr(exc))
        finally:
            conn.close()

    def answers(self) -> dict[Pair, Answer]:
        return {
            (r, node.name): self.answer(r, node)
            for r in range(REPLICAS)
            for node in self.plane.nodes
        }

    def all_answer(self) -> bool:
        """Every replica answers 200 for every node, each from that node's kubelet."""
        nodes = {node.name: node for node in self.plane.nodes}
        return all(a.ok(nodes[name]) for (_, name), a in self.answers().items())

    def wait_all_answer(self, timeout: float = SETTLE_SECONDS) -> float:
        """Bounded wait for ``all_answer``; the seconds it took."""
        return self.wait(self.all_answer, "every replica answering for every node", timeout)

    def watch(self, seconds: float) -> dict[Pair, list[Answer]]:
        """Every replica asked for every node each WATCH_STEP_SECONDS for ``seconds``."""
        history: dict[Pair, list[Answer]] = {}
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / WATCH_STEP_SECONDS) + 1):
            for pair, answer in self.answers().items():
                history.setdefault(pair, []).append(answer)
            if time.monotonic() >= deadline:
                break
            time.sleep(max(0.0, min(WATCH_STEP_SECONDS, deadline - time.monotonic())))
        return history

    # -- agents and servers ---------------------------------------------------------------

    def agent_metric(self, node: str, name: str) -> float | None:
        return self.harness.agent_metrics(self.agents[node]).get(name)

    def wait_agents(self, name: str, value: float, timeout: float = SETTLE_SECONDS) -> float:
        """Bounded wait until every agent's metric ``name`` is ``value``."""
        return self.wait(
            lambda: all(self.agent_metric(n, name) == value for n in self.agents),
            f"{name} = {value} on every agent",
            timeout,
        )

    def agent_log(self, node: str) -> str:
        return self.harness.procs.log(f"agent-{node}")

    def state(self) -> str:
        """What the servers and agents say (for failure messages)."""
        parts = [f"{s.name}: {s.metrics().get(READY_BACKENDS)} agents" for s in self.servers]
        for node in self.agents:
            m = self.harness.agent_metrics(self.agents[node])
            parts.append(
                f"{node}: known {m.get(KNOWN)} open {m.get(OPEN)} sticky {m.get(STICKY)}"
                f" missing {m.get(MISSING)}"
            )
        return "; ".join(parts)

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float) -> float:
        """Bounded wait, failing with the answers and the programs' state; the seconds it
        took. The programs must stay up meanwhile."""
        start = time.monotonic()
        deadline = start + timeout
        while True:
            for proc in [*self.agents.values(), *(s.proc for s in self.servers), self.haproxy]:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"{what}: {proc.args!r} exited {proc.returncode}")
            if predicate():
                return time.monotonic() - start
            if time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        answers = {pair: (a.status, a.body[:120]) for pair, a in self.answers().items()}
        raise AssertionError(
            f"timed out ({timeout} s) waiting for {what}: {answers}; {self.state()}"
        )


# -- the module-lifetime part -----------------------------------------------------------------


@contextlib.contextmanager
def ha_plane(k8s: Harness, folder: Path) -> Iterator[Plane]:
    """Worker B with its kubelet, three kube-apiservers on the session's etcd, both Nodes
    registered; the single apiserver of the other tests is stopped first (two cores)."""
    require_haproxy()
    k8s.apiservers.stop_current()
    sock_dir = os.path.dirname(k8s.uds)
    uds = tuple(f"{sock_dir}/ha-{i}.sock" for i in range(REPLICAS))
    with worker_namespace("b", via=k8s.worker.root_ip) as worker_b, contextlib.ExitStack() as stack:
        stack.enter_context(_kubelet(k8s, worker_b, folder))
        replicas = _replicas(k8s, folder, uds, stack)
        nodes = (
            Node(NODE_NAME, k8s.worker, k8s.worker.kubelet_ip),
            Node(NODE_B, worker_b, worker_b.kubelet_ip),
        )
        # In worker A's guarded /24, on no interface: only a tunnel could ever dial it.
        ghost_ip = k8s.worker.kubelet_ip.rsplit(".", 1)[0] + ".99"
        ghost = Node(GHOST, k8s.worker, ghost_ip)
        for node in (*nodes, ghost):
            register_node(
                replicas[0], dataclasses.replace(node.worker, kubelet_ip=node.address), node.name
            )
        yield Plane(k8s, nodes, ghost, replicas, uds, admin_ssl(replicas[0]))


@contextlib.contextmanager
def _kubelet(k8s: Harness, worker: Worker, folder: Path) -> Iterator[None]:
    """Worker B's fake kubelet, with a certificate for its own address."""
    cert = k8s.pki.ca.issue_cert(worker.kubelet_ip, NODE_B)
    cert_path, key_path = folder / "kubelet-b.pem", folder / "kubelet-b.key"
    cert_path.write_bytes(cert.cert_chain_pems[0].bytes())
    key_path.write_bytes(cert.private_key_pem.bytes())
    argv = [sys.executable, "-m", "tests.apiserver_egress.fake_kubelet", worker.kubelet_ip]
    argv += [str(KUBELET_PORT), str(cert_path), str(key_path)]
    with (folder / "fake-kubelet-b.log").open("wb") as log:
        proc = subprocess.Popen(
            worker.cmd(argv),
            stdin=subprocess.DEVNULL,
            cwd=ROOT,  # the import root of ``-m tests...``
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"https://{worker.kubelet_ip}:{KUBELET_PORT}/healthz"
        probe = worker.cmd(["curl", "-sk", "--max-time", "2", url])
        deadline = time.monotonic() + KUBELET_START_SECONDS
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"worker B's fake kubelet exited {proc.returncode}")
            done = subprocess.run(probe, capture_output=True, timeout=10, check=False)
            if done.stdout == b"ok":
                break
            if time.monotonic() >= deadline:
                raise AssertionError("worker B's fake kubelet did not come up")
            time.sleep(POLL_SECONDS)
        yield
    finally:
        stop([proc])


def _replicas(
    k8s: Harness, folder: Path, uds: tuple[str, ...], stack: contextlib.ExitStack
) -> tuple[KubeCluster, ...]:
    """The kube-apiservers, started at once (each takes seconds of post-start hooks),
    each stopped by ``stack``."""
    apiservers = k8s.apiservers

    def one(i: int) -> tuple[contextlib.ExitStack, KubeCluster]:
        sub = contextlib.ExitStack()
        try:
            replica = folder / f"replica-{i}"
            replica.mkdir()
            config = replica / "egress.yaml"
            config.write_text(egress_config(MODE, uds[i], 0, k8s.pki))
            cluster = sub.enter_context(
                running_apiserver(
                    apiservers.bin_dir,
                    replica,
                    apiservers.etcd_url,
                    ca=k8s.pki.ca,
                    bind=k8s.worker.root_ip,
                    etcd_prefix=ETCD_PREFIX,
                    extra_args=(f"--egress-selector-config-file={config}",),
                )
            )
        except BaseException:
            sub.close()
            raise
        return sub, cluster

    assert MODES[MODE] == ("GRPC", "uds")
    with concurrent.futures.ThreadPoolExecutor(REPLICAS) as pool:
        futures = [pool.submit(one, i) for i in range(REPLICAS)]
    clusters = []
    errors = []
    for future in futures:
        if future.exception() is not None:
            errors.append(future.exception())
        else:
            sub, cluster = future.result()
            stack.enter_context(sub)
            clusters.append(cluster)
    if errors:
        raise AssertionError(f"kube-apiserver replicas failed to start: {errors}")
    return tuple(clusters)
