"""Shared pieces of the interop tests: the Go tools built by tests/interop/build.sh
(goclient on konnectivity-client v0.36.0 and v0.37.0, h2spec, wiregen, upstream's compiled
integration suite), loopback backends run as threads of the test process (echo, an endless
source, a black hole whose dials never complete), a running topology (one proxy-server and
two proxy-agents, ours or upstream's), and the per-cell summary printed at the end of the
session.

Invariants: every wait is bounded (tests/support/upstream.py's WAIT_SECONDS or an explicit
timeout); every process started goes through ``Processes`` so that it is stopped at
teardown and its log shown on failure; nothing listens beyond 127.0.0.1 or the test's
temporary socket folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import Certs
from tests.support.upstream import (
    LABEL,
    LOOPBACK,
    ROOT,
    Family,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    free_ports,
    in_ci,
    scrape,
    server_args,
    server_command,
    server_ports,
    wait_for,
)

BUILD = ROOT / "tests" / "interop" / "build.sh"
# A cold build compiles upstream's suite with client-go and the Kubernetes API packages:
# many minutes on two shared cores at -p 1.
BUILD_TIMEOUT_SECONDS = 2400
NO_GO = "error: no Go toolchain"
# Bound on the polls for a metric value or a process's exit.
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Tools:
    goclient: Path
    goclient_reusable: Path
    h2spec: Path
    wiregen: Path
    upstream_tests: Path


def build_tools() -> Tools:
    done = subprocess.run(
        ["bash", str(BUILD)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0 and NO_GO in done.stderr and not in_ci():
        pytest.skip("no Go toolchain: the interop tools cannot be built")
    if done.returncode != 0:
        pytest.fail(f"tests/interop/build.sh failed:\n{done.stderr[-6000:]}", pytrace=False)
    bin_dir = Path(done.stdout.strip().splitlines()[-1])
    return Tools(
        bin_dir / "goclient",
        bin_dir / "goclient-reusable",
        bin_dir / "h2spec",
        bin_dir / "wiregen",
        bin_dir / "upstream-tests.test",
    )


@pytest.fixture(scope="session")
def tools(upstream: Upstream) -> Tools:
    # The upstream fixture first: it skips without Go, and the suite compiles in its tree.
    return build_tools()


# -- backends -------------------------------------------------------------------------------


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 overflows under 50 simultaneous dials.
    request_queue_size = 256


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(CHUNK):
                self.request.sendall(data)


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo backend on 127.0.0.1 (threads of this process); yields its port."""
    server = _Server((LOOPBACK, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, name="echo", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# Read and write size of the backends: any size works.
CHUNK = 65536


class Source:
    """A backend that writes a fixed pattern to every connection until the peer goes
    away; ``counts[i]`` is what it wrote so far to its i-th connection."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                block = bytes(range(256)) * (CHUNK // 256)
                with outer._lock:
                    index = len(outer.counts)
                    outer.counts.append(0)
                with contextlib.suppress(OSError):
                    while True:
                        self.request.sendall(block)
                        outer.counts[index] += len(block)

        self.server = _Server((LOOPBACK, 0), Handler)
        self.port = int(self.server.server_address[1])

    def sent(self, index: int) -> int:
        """Bytes written to the index-th connection (0 before it exists)."""
        with self._lock:
            return self.counts[index] if index < len(self.counts) else 0


@contextlib.contextmanager
def source_server() -> Iterator[Source]:
    source = Source()
    thread = threading.Thread(target=source.server.serve_forever, name="source", daemon=True)
    thread.start()
    try:
        yield source
    finally:
        source.server.shutdown()
        source.server.server_close()
        thread.join(timeout=10)


# Connections left hanging on the black hole beyond the one its accept queue holds.
BLACKHOLE_EXTRA = 2


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A listening port whose accept queue is full and never drained: Linux drops further
    SYNs, so a dial to it neither succeeds nor fails until the dialer gives up."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)  # the queue holds one connection
        port = int(listener.getsockname()[1])
        first = socket.create_connection((LOOPBACK, port), timeout=WAIT_SECONDS)
        fillers.append(first)  # completed: the queue is now full
        for _ in range(BLACKHOLE_EXTRA):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect_ex((LOOPBACK, port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# -- a running topology ---------------------------------------------------------------------

AGENT_IDS = ("agent-a", "agent-b")


@dataclass
class Agent:
    name: str
    proc: subprocess.Popen[bytes]
    admin: int
    health: int


@dataclass
class Topology:
    server: subprocess.Popen[bytes]
    server_admin: int
    frontend: list[str]  # goclient's flags to reach the frontend
    agents: list[Agent]
    uds: str


#: Node-to-control-plane tunneling on (issue 18): what the matrix's "ours+n2cp" cells add.
#: No step dials the destination; the feature is on so that every step runs on streams
#: that negotiated it (even forward connectIDs) or that an upstream peer declined.
N2CP = f"{LOOPBACK}:6443"
N2CP_SERVER_FLAGS = [f"--allowed-destination={N2CP}"]
N2CP_AGENT_FLAGS = ["--feature-gates=NodeToMasterTraffic=true"]


def start_topology(
    *,
    server: str,
    agent: str,
    mode: str,
    transport: str,
    upstream: Upstream,
    certs: Certs,
    processes: Processes,
    sock_dir: str,
    agent_count: int = 2,
) -> Topology:
    """One proxy-server (``server`` = ours or upstream) in ``mode`` with its frontend on a
    Unix socket or TCP+mTLS, and ``agent_count`` proxy-agents connected over mTLS.
    ``ours+n2cp``: ours with node-to-control-plane tunneling on (N2CP_SERVER_FLAGS, or
    each agent with N2CP_AGENT_FLAGS and a local port of its own)."""
    server, _, server_feature = server.partition("+")
    agent, _, agent_feature = agent.partition("+")
    ports = server_ports()
    uds = os.path.join(sock_dir, "konnectivity.sock")
    args = server_args(uds, certs, ports, mode=mode)
    if server_feature == "n2cp":
        args += N2CP_SERVER_FLAGS
    if transport == "mtls":
        (frontend_port,) = free_ports(1)
        args = [a for a in args if not a.startswith(("--uds-name=", "--server-port="))]
        args += [
            f"--server-port={frontend_port}",
            f"--server-bind-address={LOOPBACK}",
            f"--server-cert={certs.server_cert}",
            f"--server-key={certs.server_key}",
            f"--server-ca-cert={certs.ca}",
        ]
        frontend = [
            f"-proxy-host={LOOPBACK}",
            f"-proxy-port={frontend_port}",
            f"-ca-cert={certs.ca}",
            f"-client-cert={certs.client_cert}",
            f"-client-key={certs.client_key}",
        ]
    else:
        frontend = [f"-uds={uds}"]
    server_proc = processes.start("server", [*server_command(server, upstream), *args])
    wait_for(server_proc, ports.health, "/healthz", what=f"{server} proxy-server")
    agents = []
    for agent_id in AGENT_IDS[:agent_count]:
        aports = agent_ports()
        command = [
            *agent_command(agent, upstream),
            *agent_args(certs, ports.agent, aports),
            f"--agent-id={agent_id}",
        ]
        if agent_feature == "n2cp":
            command += [*N2CP_AGENT_FLAGS, f"--apiserver-port-mapping={free_ports(1)[0]}:{N2CP}"]
        proc = processes.start(agent_id, command)
        agents.append(Agent(agent_id, proc, aports.admin, aports.health))
    for a in agents:
        wait_for(a.proc, a.health, "/readyz", what=f"{agent} proxy-agent {a.name}")
    top = Topology(server_proc, ports.admin, frontend, agents, uds)
    wait_metric(
        top.server_admin,
        READY_BACKENDS,
        lambda v: v == agent_count,
        f"{server} proxy-server to count {agent_count} agents",
    )
    return top


# -- metrics --------------------------------------------------------------------------------

SERVER = "konnectivity_network_proxy_server_"
AGENT = "konnectivity_network_proxy_agent_"
READY_BACKENDS = SERVER + 'ready_backends{proxy_strategy="default"}'


def sample(families: dict[str, Family], key: str) -> float | None:
    """The value of one sample, ``name{l1="v1",...}``, whatever the label order of the
    exposition; None when absent."""
    name, _, rest = key.partition("{")
    want = dict(LABEL.findall(rest))
    for family in families.values():
        for exposed, number in family.samples.items():
            sname, _, srest = exposed.partition("{")
            if sname == name and dict(LABEL.findall(srest)) == want:
                return number
    return None


def value(port: int, key: str) -> float | None:
    return sample(scrape(port), key)


def wait_metric(port: int, key: str, ok: Any, what: str, seconds: float = WAIT_SECONDS) -> float:
    """Poll ``key`` on port's /metrics until ``ok(value)``; fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    last: float | None = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = value(port, key)
            if last is not None and ok(last):
                return last
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out waiting for {what}: {key} = {last}")


# -- goclient -------------------------------------------------------------------------------

GOCLIENT_GRACE_SECONDS = 15  # beyond goclient's own -timeout: start-up and the JSON print


def goclient(binary: Path, *args: str, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [str(binary), f"-timeout={timeout}s", *args],
        capture_output=True,
        text=True,
        timeout=timeout + GOCLIENT_GRACE_SECONDS,
        check=False,
    )
    assert done.stdout.strip(), f"goclient printed no result: {done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    result["_stderr"] = done.stderr[-2000:]
    return done.returncode, result


def goclient_start(binary: Path, *args: str, timeout: float = 30) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(binary), f"-timeout={timeout}s", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def signal_process(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)


# -- the summary table ----------------------------------------------------------------------


@dataclass
class CellReport:
    """One matrix cell: its name and, per step, "ok" or the failure (first line)."""

    name: str
    steps: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.steps.values())


SUMMARY: list[CellReport] = []


def summary_lines() -> list[str]:
    if not SUMMARY:
        return []
    steps = list(dict.fromkeys(s for cell in SUMMARY for s in cell.steps))
    width = max(len(c.name) for c in SUMMARY)
    lines = [f"{'cell':<{width}}  " + " ".join(f"{s:<8}" for s in steps) + "  notes"]
    for cell in SUMMARY:
        marks = " ".join(
            f"{('ok' if cell.steps.get(s) == 'ok' else ('FAIL' if s in cell.steps else '-')):<8}"
            for s in steps
        )
        notes = "; ".join(f"{k}={v}" for k, v in cell.notes.items())
        lines.append(f"{cell.name:<{width}}  {marks}  {notes}")
    return lines
