"""Remote control plane, end to end, in network namespaces (``topology.py``): the seed use
case of konnectivity. The control plane (``cp``: two proxy-servers with
``--server-count=2``, and the frontend client standing in for kube-apiserver) is reachable
from the workers (``w1``, ``w2``: one proxy-agent and one backend server each) only through
HAProxy in ``lb`` (``mode tcp``, round robin), and nothing in ``cp`` can reach a worker
except through the agents' tunnels.

It runs in each frontend mode (``support.py``): HTTP-CONNECT with a standard-library
client, and gRPC with goclient (upstream's konnectivity-client). One test walks the whole
story, since each step starts from the state the previous one left:

1. both agents hold both servers (the agents' and the servers' metrics);
2. ``--proxy-strategies=destHost,default``: a dial for a worker's address is carried by that
   worker's agent (``--agent-identifiers=host=<address>``); the other agent could not reach
   it, so every answer from the right backend proves the routing;
3. byte-exact transfers through each server to each worker;
4. HAProxy restarted: every tunnel drops, the agents reconnect, transfers work again;
5. a worker's link cut (its veth down): the servers notice within the keepalive bound
   (``--keepalive-time`` plus grpc-go's 20 s ping timeout), its held tunnels end and new
   dials for its address fail fast, while the other worker keeps working;
6. the link restored: the agent is back on both servers and its backend answers.

Every wait is a bounded loop; every process and the namespaces are removed whatever happens.
Needs root, ``ip``, ``nft``, ``haproxy`` (and goclient for gRPC): skipped without them,
except in CI (``CI=true``), where a missing tool fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from . import topology as topo_mod
from .support import (
    BACKEND,
    ECHO_PORT,
    GOCLIENT,
    HTTP_PORT,
    IDENT_PORT,
    Frontend,
    GrpcFrontend,
    HttpConnectFrontend,
    Proc,
    Processes,
    identity,
    metric,
    worker_name,
)
from .topology import Namespace, Topology

# One run takes about 40 s; waiting for another checkout's run is bounded in topology.py.
pytestmark = pytest.mark.timeout(420)

TOOLS = ("ip", "nft", "haproxy")
# Ports in cp: the two servers' agent, health and admin listeners.
SERVERS = {"cp-a": (8091, 8092, 8095), "cp-b": (8191, 8192, 8195)}
LB_PORT = 8091  # where workers find "the" proxy-server: HAProxy in lb
AGENT_HEALTH, AGENT_ADMIN = 8093, 8094
# Short keepalive so that a dead link is noticed quickly. The servers ping after this much
# silence and give up after grpc-go's ping timeout (20 s); the agent's own keepalive has
# grpc-go's client minimum of 10 s.
KEEPALIVE = 2.0
PING_TIMEOUT = 20.0
NOTICE_BOUND = KEEPALIVE + PING_TIMEOUT + 10.0
# The agents' --sync-interval: different on purpose. Two agents retrying in step behind a
# round-robin balancer can each keep drawing the same server (w1 always A, w2 always B)
# until their 10 % jitter drifts them apart, which took 7 s in one run with equal intervals.
SYNC_MS = {"w1": 200, "w2": 270}
# Waits for connections to be (re)established: sync intervals are short (above).
CONNECT_BOUND = 45.0
TRANSFER_BYTES = 8 << 20
# Bound on waiting for a held client to end once the servers noticed the cut.
HELD_END_SECONDS = 30.0
KILL_SECONDS = 10.0
VERBOSITY = int(os.environ.get("KF_E2E_V", "2"))
# Logs, certificates and sockets of the last run (KF_E2E_LOGS overrides).
LOG_DIR = "/tmp/konnectivity-fast-e2e"
# Everything a process lives at most (backends stop by themselves).
TTL_SECONDS = 600
SERVER_READY = "konnectivity_network_proxy_server_ready_backend_connections"
SERVER_ESTABLISHED = "konnectivity_network_proxy_server_established_connections"
AGENT_OPEN = "konnectivity_network_proxy_agent_open_server_connections"
AGENT_KNOWN = "konnectivity_network_proxy_agent_known_server_count"


def ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _require(mode: str) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not topo_mod.is_root():
        missing.append("root")
    if mode == "grpc" and not GOCLIENT.is_file():
        missing.append(f"{GOCLIENT} (scripts/build-upstream.sh)")
    if missing:
        if ci():
            pytest.fail(f"the remote-control-plane test needs {missing}")
        pytest.skip(f"the remote-control-plane test needs {missing}")


@dataclass
class Scene:
    topo: Topology
    procs: Processes
    frontend: Frontend
    haproxy_cfg: Path

    @property
    def workers(self) -> list[Namespace]:
        return [self.topo.w1, self.topo.w2]

    def server_metric(self, server: str, name: str) -> float | None:
        return metric(self.topo.cp, SERVERS[server][2], name)

    def agent_open(self, worker: Namespace) -> float | None:
        return metric(worker, AGENT_HEALTH, AGENT_OPEN)

    def all_connected(self) -> bool:
        return all(self.server_metric(s, SERVER_READY) == 2 for s in SERVERS) and all(
            self.agent_open(w) == 2 for w in self.workers
        )

    def start_haproxy(self) -> Proc:
        return self.procs.start(
            "haproxy", self.topo.lb.argv("haproxy", "-db", "-f", str(self.haproxy_cfg))
        )

    def wait(self, what: str, bound: float, check: Callable[[], bool]) -> float:
        return self.procs.wait_until(what, bound, check)


def _certs(d: Path, topo: Topology) -> dict[str, str]:
    ca = trustme.CA()
    lb_ips = sorted(set(topo.lb_address.values()))
    server = ca.issue_cert("konnectivity-server.kube-system.svc", topo.cp.address, *lb_ips)
    agent = ca.issue_cert("konnectivity-agent.example")
    files = {
        "ca": ca.cert_pem.bytes(),
        "server-cert": server.cert_chain_pems[0].bytes(),
        "server-key": server.private_key_pem.bytes(),
        "agent-cert": agent.cert_chain_pems[0].bytes(),
        "agent-key": agent.private_key_pem.bytes(),
    }
    paths = {}
    for name, blob in files.items():
        (d / f"{name}.pem").write_bytes(blob)
        paths[name] = str(d / f"{name}.pem")
    return paths


def _haproxy_config(topo: Topology) -> str:
    binds = "\n".join(f"    bind {topo.lb_address[w.name]}:{LB_PORT}" for w in (topo.w1, topo.w2))
    servers = "\n".join(
        f"    server {sid} {topo.cp.address}:{ports[0]} check inter 500ms fall 2 rise 1"
        for sid, ports in SERVERS.items()
    )
    return (
        "global\n    maxconn 1000\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n"
        "    timeout server 1h\n    timeout tunnel 1h\n"
        f"frontend agents\n{binds}\n    default_backend proxy_servers\n"
        f"backend proxy_servers\n    balance roundrobin\n{servers}\n"
    )


def _server_argv(
    topo: Topology, sid: str, sock: str, mode: str, certs: dict[str, str]
) -> list[str]:
    agent_port, health, admin = SERVERS[sid]
    return topo.cp.argv(
        sys.executable, "-m", "konnectivity_fast.server",
        f"--mode={mode}", f"--uds-name={sock}", "--server-port=0",
        f"--cluster-cert={certs['server-cert']}", f"--cluster-key={certs['server-key']}",
        f"--cluster-ca-cert={certs['ca']}",
        f"--agent-bind-address={topo.cp.address}", f"--agent-port={agent_port}",
        "--health-bind-address=127.0.0.1", f"--health-port={health}",
        "--admin-bind-address=127.0.0.1", f"--admin-port={admin}",
        f"--server-id={sid}", "--server-count=2", "--proxy-strategies=destHost,default",
        f"--keepalive-time={KEEPALIVE:g}s", "--logtostderr=true", f"--v={VERBOSITY}",
    )  # fmt: skip


def _agent_argv(topo: Topology, worker: Namespace, certs: dict[str, str]) -> list[str]:
    name = worker_name(worker)
    return worker.argv(
        sys.executable, "-m", "konnectivity_fast.agent",
        f"--ca-cert={certs['ca']}", f"--agent-cert={certs['agent-cert']}",
        f"--agent-key={certs['agent-key']}",
        f"--proxy-server-host={topo.lb_address[worker.name]}", f"--proxy-server-port={LB_PORT}",
        "--health-server-host=127.0.0.1", f"--health-server-port={AGENT_HEALTH}",
        f"--admin-server-port={AGENT_ADMIN}",
        f"--agent-id={name}", f"--agent-identifiers=host={worker.address}",
        f"--sync-interval={SYNC_MS[name]}ms", "--sync-interval-cap=1s", "--probe-interval=200ms",
        f"--keepalive-time={KEEPALIVE:g}s", "--logtostderr=true", f"--v={VERBOSITY}",
    )  # fmt: skip


@pytest.fixture(params=["http-connect", "grpc"])
def scene(request: pytest.FixtureRequest) -> Iterator[Scene]:
    mode = str(request.param)
    _require(mode)
    with contextlib.ExitStack() as stack:
        # First the topology, which holds the machine-wide lock: the log folder is shared
        # by every checkout on the machine too.
        topo = stack.enter_context(topo_mod.topology())
        # The logs of the last run stay for a failure's post-mortem (pytest's own tmp_path
        # is pruned by other sessions on a shared machine).
        tmp = Path(os.environ.get("KF_E2E_LOGS", LOG_DIR))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        procs = Processes(tmp)
        stack.callback(procs.stop_all)
        certs = _certs(tmp, topo)
        env = {"KONNECTIVITY_FAST_REQUIRE_COMPILED": "1"}
        socks = {sid: str(tmp / f"{sid}.sock") for sid in SERVERS}
        for sid in SERVERS:
            procs.start(sid, _server_argv(topo, sid, socks[sid], mode, certs), env)
        for worker in (topo.w1, topo.w2):
            name = worker_name(worker)
            procs.start(f"backend-{name}", worker.argv(
                sys.executable, "-I", str(BACKEND), f"--host={worker.address}",
                f"--port={HTTP_PORT}", f"--echo-port={ECHO_PORT}", f"--ident-port={IDENT_PORT}",
                f"--name={name}", f"--ttl={TTL_SECONDS}",
            ))  # fmt: skip
        kind = HttpConnectFrontend if mode == "http-connect" else GrpcFrontend
        frontend = kind(topo.cp, socks, [topo.w1, topo.w2])
        scene = Scene(topo, procs, frontend, tmp / "haproxy.cfg")
        for sid, (_, health, _) in SERVERS.items():
            scene.wait(
                f"{sid} /healthz",
                CONNECT_BOUND,
                lambda h=health: topo.cp.http_get(h, "/healthz")[0] == 200,
            )  # type: ignore[misc]
        # HAProxy after the servers: a failed first health check would mark a server down.
        scene.haproxy_cfg.write_text(_haproxy_config(topo))
        check = subprocess.run(
            topo.lb.argv("haproxy", "-c", "-f", str(scene.haproxy_cfg)),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr
        scene.start_haproxy()
        for worker in (topo.w1, topo.w2):
            procs.start(f"agent-{worker_name(worker)}", _agent_argv(topo, worker, certs), env)
        yield scene


def reach_everywhere(scene: Scene) -> None:
    """Through each server, each worker's address reaches that worker's backend, which saw
    the connection come from its own worker: that worker's agent dialed it."""
    for server in SERVERS:
        for worker in scene.workers:
            assert scene.frontend.reach(server, worker) == identity(worker), server


def transfer_everywhere(scene: Scene, seed: int) -> None:
    """Byte-exact echo of TRANSFER_BYTES through each server to each worker."""
    for i, server in enumerate(SERVERS):
        for j, worker in enumerate(scene.workers):
            outcome = scene.frontend.echo(server, worker, TRANSFER_BYTES, seed + 2 * i + j)
            assert outcome.ok, (server, worker.name, outcome.detail)


def test_remote_control_plane(scene: Scene) -> None:
    topo = scene.topo
    w1, w2 = topo.w1, topo.w2

    # 0. The isolation the scenario rests on.
    assert "unreachable" in topo_mod.root_route(w2.address)
    assert "unreachable" in topo_mod.root_route(topo.cp.address)
    for probe in (topo.cp.try_connect(w2.address, HTTP_PORT),
                  w1.try_connect(w2.address, HTTP_PORT)):  # fmt: skip
        assert not probe.startswith("connected"), probe
    assert w1.try_connect(topo.cp.address, SERVERS["cp-a"][0]) != "connected"

    # 1. Both agents hold both servers.
    scene.wait("both agents on both servers", CONNECT_BOUND, scene.all_connected)
    assert metric(w1, AGENT_HEALTH, AGENT_KNOWN) == 2

    # 2. destHost: each worker's address reaches that worker, through either server.
    for _ in range(3):
        reach_everywhere(scene)

    # 3. Byte-exact transfers through each server.
    transfer_everywhere(scene, seed=10)

    # 4. HAProxy restarted mid-run: the tunnels drop, the agents come back.
    haproxy = next(p for p in scene.procs.procs if p.name == "haproxy" and p.alive())
    scene.procs.stop(haproxy, signal.SIGTERM)
    haproxy.name = "haproxy-stopped"
    scene.wait(
        "servers lose the agents",
        CONNECT_BOUND,
        lambda: all(scene.server_metric(s, SERVER_READY) == 0 for s in SERVERS),
    )
    assert not scene.frontend.dial("cp-a", w1).ok
    scene.start_haproxy()
    scene.wait("agents back after the HAProxy restart", CONNECT_BOUND, scene.all_connected)
    reach_everywhere(scene)
    transfer_everywhere(scene, seed=20)

    # 5. w1's link cut: noticed within the keepalive bound; its tunnels end, new dials for
    # its address fail fast; w2 keeps working.
    held = {s: scene.frontend.hold(s, w1, NOTICE_BOUND + HELD_END_SECONDS) for s in SERVERS}
    try:
        scene.wait(
            "held tunnels established",
            CONNECT_BOUND,
            lambda: all(scene.server_metric(s, SERVER_ESTABLISHED) == 1 for s in SERVERS),
        )
        topo.set_link(w1, up=False)
        took = scene.wait(
            "servers drop w1's agent",
            NOTICE_BOUND,
            lambda: all(scene.server_metric(s, SERVER_READY) == 1 for s in SERVERS),
        )
        print(f"[{scene.frontend.mode}] link cut noticed by both servers after {took:.1f} s")
        for server, proc in held.items():
            # The tunnel's end reaches the client: it exits by itself.
            try:
                proc.communicate(timeout=HELD_END_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the tunnel to w1 through {server} outlived its agent")
        for server in SERVERS:
            outcome = scene.frontend.dial(server, w1)
            assert not outcome.ok and outcome.refused, (server, outcome.detail)
            assert scene.frontend.reach(server, w2) == identity(w2), server
    finally:
        for proc in held.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=KILL_SECONDS)

    # 6. The link restored: w1's agent is back on both servers.
    topo.set_link(w1, up=True)
    scene.wait("w1's agent back", NOTICE_BOUND + CONNECT_BOUND, scene.all_connected)
    reach_everywhere(scene)
    transfer_everywhere(scene, seed=30)
