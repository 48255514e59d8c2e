"""Remote control plane, end to end, in network namespaces (tests/e2e/topology.py): the seed
use case of konnectivity. The control plane (``cp``: two proxy-servers with
``--server-count=2`` in HTTP-CONNECT mode, and the frontend client, tests/e2e/nsclient.py,
standing in for kube-apiserver) is reachable from the workers (``w1``, ``w2``: one
proxy-agent and one backend HTTP server each) only through HAProxy in ``lb`` (``mode tcp``,
round robin), and nothing in ``cp`` can reach a worker except through the agents' tunnels.

One test walks the whole story, since each step starts from the state the previous one left:

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
Needs root, ``ip``, ``nft`` and ``haproxy``: skipped without them, except in CI (``CI=true``),
where a missing tool fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from . import topology as topo_mod
from .topology import Namespace, Topology

pytestmark = pytest.mark.timeout(300)

HERE = Path(__file__).resolve().parent
NSCLIENT = HERE / "nsclient.py"
BACKEND = HERE / "backend.py"
TOOLS = ("ip", "nft", "haproxy")
# Ports in cp: the two servers' agent, health and admin listeners.
SERVERS = {"cp-a": (8091, 8092, 8095), "cp-b": (8191, 8192, 8195)}
LB_PORT = 8091  # where workers find "the" proxy-server: HAProxy in lb
AGENT_HEALTH, AGENT_ADMIN = 8093, 8094
BACKEND_PORT = 8080
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
# Waits for connections to be (re)established: sync intervals are short (below).
CONNECT_BOUND = 45.0
POLL_SECONDS = 0.25
TRANSFER_BYTES = 8 << 20
# Bound on one frontend client operation (per socket operation, and on the whole run).
CLIENT_TIMEOUT = 30.0
# A program still alive this long after SIGKILL is a failure of the test's teardown.
KILL_SECONDS = 10.0
VERBOSITY = int(os.environ.get("KF_E2E_V", "2"))
# Logs, certificates and sockets of the last run (KF_E2E_LOGS overrides).
LOG_DIR = "/tmp/konnectivity-fast-e2e"
# Everything a process lives at most (backends stop by themselves).
TTL_SECONDS = 600


def _require_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not topo_mod.is_root():
        missing.append("root")
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the e2e test needs {missing}")
        pytest.skip(f"the e2e test needs {missing}")


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Processes:
    """Every process the test starts, killed at the end whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        if proc.alive():
            proc.proc.send_signal(sig)
        proc.proc.wait(timeout=KILL_SECONDS)

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(proc)

    def dump(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.text()[-3000:]}" for p in self.procs)


# Names of the processes that must stay alive while the test waits for something.
_MUST_LIVE: set[str] = set()


def wait_until(what: str, bound: float, check: Callable[[], bool], procs: Processes) -> float:
    """Poll ``check`` until true, for at most ``bound`` seconds; returns the time it took.
    A dead process fails the wait at once (with every log)."""
    started = time.monotonic()
    while True:
        dead = [p.name for p in procs.procs if p.name in _MUST_LIVE and not p.alive()]
        if dead:
            pytest.fail(f"{dead} exited while waiting for {what}\n{procs.dump()}")
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > bound:
            pytest.fail(f"not within {bound:.0f} s: {what}\n{procs.dump()}")
        time.sleep(POLL_SECONDS)


def metric(ns: Namespace, port: int, name: str) -> float | None:
    """Sum of a metric's samples, scraped from inside ``ns`` (None when unreachable)."""
    status, text = ns.http_get(port, "/metrics")
    if status != 200:
        return None
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values) if values else None


SERVER_READY = "konnectivity_network_proxy_server_ready_backend_connections"
AGENT_OPEN = "konnectivity_network_proxy_agent_open_server_connections"


@dataclass
class Scene:
    topo: Topology
    procs: Processes
    socks: dict[str, str]  # server id: its frontend Unix socket
    logs: Path
    haproxy_cfg: Path

    def client(self, server: str, target: str, op: str, *extra: str) -> dict[str, object]:
        proc = self.topo.cp.run(
            sys.executable,
            "-I",
            str(NSCLIENT),
            f"--uds={self.socks[server]}",
            f"--target={target}",
            f"--op={op}",
            f"--timeout={CLIENT_TIMEOUT}",
            *extra,
            timeout=CLIENT_TIMEOUT * 3,
        )
        assert proc.stdout, proc.stderr
        return dict(json.loads(proc.stdout.splitlines()[-1]))

    def backend(self, worker: Namespace) -> str:
        return f"{worker.address}:{BACKEND_PORT}"

    def server_ready(self, server: str) -> float | None:
        return metric(self.topo.cp, SERVERS[server][2], SERVER_READY)

    def agent_open(self, worker: Namespace) -> float | None:
        return metric(worker, AGENT_HEALTH, AGENT_OPEN)

    def all_connected(self) -> bool:
        return all(self.server_ready(s) == 2 for s in SERVERS) and all(
            self.agent_open(w) == 2 for w in (self.topo.w1, self.topo.w2)
        )

    def start_haproxy(self) -> Proc:
        proc = self.procs.start(
            "haproxy", self.topo.lb.argv("haproxy", "-db", "-f", str(self.haproxy_cfg))
        )
        _MUST_LIVE.add("haproxy")
        return proc


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


@pytest.fixture
def scene() -> Iterator[Scene]:
    _require_tools()
    _MUST_LIVE.clear()
    with contextlib.ExitStack() as stack:
        # The logs of the last run stay for a failure's post-mortem (pytest's own tmp_path
        # is pruned by other sessions on a shared machine).
        tmp = Path(os.environ.get("KF_E2E_LOGS", LOG_DIR))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        topo = stack.enter_context(topo_mod.topology())
        procs = Processes(tmp)
        stack.callback(procs.stop_all)
        certs = _certs(tmp, topo)
        env = {"KONNECTIVITY_FAST_REQUIRE_COMPILED": "1"}
        socks = {}
        for sid, (agent_port, health, admin) in SERVERS.items():
            socks[sid] = str(tmp / f"{sid}.sock")
            procs.start(
                sid,
                topo.cp.argv(
                    sys.executable,
                    "-m",
                    "konnectivity_fast.server",
                    "--mode=http-connect",
                    f"--uds-name={socks[sid]}",
                    "--server-port=0",
                    f"--cluster-cert={certs['server-cert']}",
                    f"--cluster-key={certs['server-key']}",
                    f"--cluster-ca-cert={certs['ca']}",
                    f"--agent-bind-address={topo.cp.address}",
                    f"--agent-port={agent_port}",
                    "--health-bind-address=127.0.0.1",
                    f"--health-port={health}",
                    "--admin-bind-address=127.0.0.1",
                    f"--admin-port={admin}",
                    f"--server-id={sid}",
                    "--server-count=2",
                    "--proxy-strategies=destHost,default",
                    f"--keepalive-time={KEEPALIVE:g}s",
                    "--logtostderr=true",
                    f"--v={VERBOSITY}",
                ),
                env,
            )
            _MUST_LIVE.add(sid)
        for worker in (topo.w1, topo.w2):
            name = worker.name.removeprefix(topo_mod.PREFIX)
            procs.start(
                f"backend-{name}",
                worker.argv(
                    sys.executable,
                    "-I",
                    str(BACKEND),
                    f"--host={worker.address}",
                    f"--port={BACKEND_PORT}",
                    f"--name={name}",
                    f"--ttl={TTL_SECONDS}",
                ),
            )
            _MUST_LIVE.add(f"backend-{name}")
        scene = Scene(topo, procs, socks, tmp, tmp / "haproxy.cfg")
        for sid, (_, health, _) in SERVERS.items():
            wait_until(
                f"{sid} /healthz",
                CONNECT_BOUND,
                lambda h=health: topo.cp.http_get(h, "/healthz")[0] == 200,
                procs,
            )
        # HAProxy after the servers: a failed first health check would mark a server down.
        scene.haproxy_cfg.write_text(_haproxy_config(topo))
        check = subprocess.run(
            topo.lb.argv("haproxy", "-c", "-f", str(scene.haproxy_cfg)),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        scene.start_haproxy()
        for worker in (topo.w1, topo.w2):
            name = worker.name.removeprefix(topo_mod.PREFIX)
            procs.start(
                f"agent-{name}",
                worker.argv(
                    sys.executable,
                    "-m",
                    "konnectivity_fast.agent",
                    f"--ca-cert={certs['ca']}",
                    f"--agent-cert={certs['agent-cert']}",
                    f"--agent-key={certs['agent-key']}",
                    f"--proxy-server-host={topo.lb_address[worker.name]}",
                    f"--proxy-server-port={LB_PORT}",
                    "--health-server-host=127.0.0.1",
                    f"--health-server-port={AGENT_HEALTH}",
                    f"--admin-server-port={AGENT_ADMIN}",
                    f"--agent-id={name}",
                    f"--agent-identifiers=host={worker.address}",
                    f"--sync-interval={SYNC_MS[name]}ms",
                    "--sync-interval-cap=1s",
                    "--probe-interval=200ms",
                    f"--keepalive-time={KEEPALIVE:g}s",
                    "--logtostderr=true",
                    f"--v={VERBOSITY}",
                ),
                env,
            )
            _MUST_LIVE.add(f"agent-{name}")
        yield scene


def transfer_everywhere(scene: Scene, seed: int) -> None:
    """Byte-exact echo of TRANSFER_BYTES through each server to each worker."""
    for i, server in enumerate(SERVERS):
        for j, worker in enumerate((scene.topo.w1, scene.topo.w2)):
            result = scene.client(
                server,
                scene.backend(worker),
                "echo",
                f"--size={TRANSFER_BYTES}",
                f"--seed={seed + 2 * i + j}",
            )
            assert result["ok"], (server, worker.name, result)
            assert result["received"] == TRANSFER_BYTES and result["match"]


def whoami_everywhere(scene: Scene) -> None:
    for server in SERVERS:
        for worker in (scene.topo.w1, scene.topo.w2):
            result = scene.client(server, scene.backend(worker), "whoami")
            name = worker.name.removeprefix(topo_mod.PREFIX)
            # The backend saw the connection come from its own worker: that worker's agent.
            assert result["body"] == f"{name} {worker.address}", (server, json.dumps(result))


def test_remote_control_plane(scene: Scene) -> None:
    topo, procs = scene.topo, scene.procs
    w1, w2 = topo.w1, topo.w2

    # 0. The isolation the scenario rests on.
    assert "unreachable" in topo_mod.root_route(w2.address)
    assert "unreachable" in topo_mod.root_route(topo.cp.address)
    for probe in (
        topo.cp.try_connect(w2.address, BACKEND_PORT),
        w1.try_connect(w2.address, BACKEND_PORT),
    ):
        assert "connected" not in probe.split("(")[0], probe
    assert w1.try_connect(topo.cp.address, SERVERS["cp-a"][0]) != "connected"

    # 1. Both agents hold both servers.
    wait_until("both agents on both servers", CONNECT_BOUND, scene.all_connected, procs)
    assert metric(w1, AGENT_HEALTH, "konnectivity_network_proxy_agent_known_server_count") == 2

    # 2. destHost: each worker's address reaches that worker, through either server.
    for _ in range(3):
        whoami_everywhere(scene)

    # 3. Byte-exact transfers through each server.
    transfer_everywhere(scene, seed=10)

    # 4. HAProxy restarted mid-run: the tunnels drop, the agents come back.
    haproxy = next(p for p in procs.procs if p.name == "haproxy" and p.alive())
    _MUST_LIVE.discard("haproxy")
    procs.stop(haproxy, signal.SIGTERM)
    haproxy.name = "haproxy-old"
    wait_until(
        "servers lose the agents",
        CONNECT_BOUND,
        lambda: all(scene.server_ready(s) == 0 for s in SERVERS),
        procs,
    )
    failed = scene.client("cp-a", scene.backend(w1), "whoami")
    assert not failed["ok"]
    scene.start_haproxy()
    wait_until("agents back after the HAProxy restart", CONNECT_BOUND, scene.all_connected, procs)
    whoami_everywhere(scene)
    transfer_everywhere(scene, seed=20)

    # 5. w1's link cut: noticed within the keepalive bound; its tunnels end, new dials for
    # its address fail fast; w2 keeps working.
    held = {
        server: subprocess.Popen(
            topo.cp.argv(
                sys.executable,
                "-I",
                str(NSCLIENT),
                f"--uds={scene.socks[server]}",
                f"--target={scene.backend(w1)}",
                "--op=hold",
                f"--timeout={NOTICE_BOUND + 30}",
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        for server in SERVERS
    }
    try:
        for server, proc in held.items():
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "200" in line, (server, line)
        topo.set_link(w1, up=False)
        took = wait_until(
            "servers drop w1's agent",
            NOTICE_BOUND,
            lambda: all(scene.server_ready(s) == 1 for s in SERVERS),
            procs,
        )
        print(f"link cut noticed by both servers after {took:.1f} s")
        for server, proc in held.items():
            out, _ = proc.communicate(timeout=CLIENT_TIMEOUT)
            result = json.loads(out.splitlines()[-1])
            assert not result["ok"] and "tunnel" in str(result["error"]), (server, result)
        for server in SERVERS:
            result = scene.client(server, scene.backend(w1), "whoami")
            assert not result["ok"], result
            # Refused by the proxy, not a client timeout: the dial failed fast.
            assert "CONNECT refused" in str(result["error"]), result
            result = scene.client(server, scene.backend(w2), "whoami")
            assert result["body"] == f"w2 {w2.address}", result
    finally:
        for proc in held.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=KILL_SECONDS)

    # 6. The link restored: w1's agent is back on both servers.
    topo.set_link(w1, up=True)
    wait_until("w1's agent back", NOTICE_BOUND + CONNECT_BOUND, scene.all_connected, procs)
    whoami_everywhere(scene)
    transfer_everywhere(scene, seed=30)
