"""Processes of the tunnel benchmark: the proxy-server + proxy-agent pairs (ours,
upstream's v0.36.0, our server with upstream's agent, or ours with per-tunnel flow control
``flow.v1``), the Go backend and load generator (bench/loadgen), the certificates of the
mTLS agent link, and the builds they need.

Invariants: every child runs in its own session with ``PR_SET_PDEATHSIG`` = SIGKILL (it
never outlives the orchestrator) and is tracked by ``Children``, which kills what is left
by pid. Every wait has a deadline. Our programs and upstream's get the same command line
(the flags are upstream's): frontend on a Unix socket, agent link over TLS with client
certificates on 127.0.0.1, health and admin ports on 127.0.0.1, the same verbosity; a
pairing adds only the extension flags it is named for (``FLAGS``).
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import trustme

from bench._echo_proc import CLK_TCK, REPO_ROOT, TERM_GRACE, Child, ChildError, _die_with_parent

LOADGEN_SRC = REPO_ROOT / "bench" / "loadgen"
# One binary per source digest (loadgen-<digest>): worktrees that share .cache and build
# different sources never run each other's load generator, nor replace it mid-run.
LOADGEN_DIR = REPO_ROOT / ".cache" / "bench"
BUILD_UPSTREAM = REPO_ROOT / "scripts" / "build-upstream.sh"
LOOPBACK = "127.0.0.1"
# Both programs validate ports to 1024-49151: pick below the ephemeral range.
PORT_RANGE = (20000, 32000)
# Seconds for a server or agent to answer its health endpoint after start.
READY_TIMEOUT = 30.0
POLL = 0.05
# A cold upstream build downloads and compiles client-go: minutes on 2 cores.
UPSTREAM_BUILD_TIMEOUT = 1500
LOADGEN_BUILD_TIMEOUT = 600
# A pairing names its server and agent: ours, upstream's, our server with upstream's agent
# (which tells whether a head-of-line defect is the server's or the agent's), or ours with
# per-tunnel flow control (docs/flow-control.md) offered by both, so negotiated.
MIXED = "ours-upstream-agent"
FLOW = "ours-flow"
IMPLS = ("ours", "upstream", MIXED, FLOW)
# impl -> (server, agent)
SIDES = {
    "ours": ("ours", "ours"),
    "upstream": ("upstream", "upstream"),
    MIXED: ("ours", "upstream"),
    FLOW: ("ours", "ours"),
}
# impl -> flags given to both its server and its agent, beyond the common command line.
FLAGS: dict[str, tuple[str, ...]] = {FLOW: ("--enable-tunnel-flow-control=true",)}
# The server's counter of flow.v1 credit (konnectivity_fast/metrics/flow.py), on /metrics
# only when the flag is on: "granted" is what the server let the agent send (downloads),
# "received" what the agent let the server send (uploads).
FLOW_CREDIT_METRIC = "konnectivity_fast_flow_credit_bytes_total"


class Proc(Child):
    """A child running any program (``Child`` runs the Python interpreter)."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 (no threads in the orchestrator)
        )
        self.pid = self.proc.pid
        self._buf = b""


class Procs:
    """Every child of one benchmark run, so that all can be ended at once."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._all: list[Proc] = []
        self._count = 0

    def start(self, name: str, argv: list[str]) -> Proc:
        self._count += 1
        child = Proc(name, argv, self.log_dir / f"{self._count:03d}-{name}.log")
        self._all.append(child)
        return child

    def stop(self, child: Proc) -> None:
        """SIGKILL: nothing measured depends on a graceful exit, and upstream's agent
        only drains on the first SIGTERM."""
        if child.alive():
            child.proc.kill()
        child.proc.wait(TERM_GRACE)
        child.close()
        if child in self._all:
            self._all.remove(child)

    def finish(self, child: Proc, timeout: float) -> int:
        """Wait (bounded) for ``child`` to exit by itself and forget it; its exit code."""
        try:
            return child.wait(timeout)
        finally:
            child.close()
            if child in self._all:
                self._all.remove(child)

    def kill_all(self) -> None:
        while self._all:
            self.stop(self._all[-1])


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the whole process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants alive now (a proxy-server with ``--workers`` runs its
    workers as child processes), from the parent pids of /proc (the kernel here has no
    /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                raw = f.read()
        except OSError:  # exited meanwhile
            continue
        ppid = int(raw[raw.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) of ``root`` and its descendants: those alive, and those
    that exited and were waited for (the cutime and cstime of their parents)."""
    total = 0.0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        rest = raw[raw.rindex(b")") + 2 :].split()
        total += sum(int(x) for x in rest[11:15]) / CLK_TCK
    return total


def tree_rss_kib(root: int) -> int:
    """VmRSS of ``root`` and its descendants, summed, KiB (pages shared between them, as
    after a fork, are counted in each)."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total


# -- builds -----------------------------------------------------------------------------


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def build_loadgen() -> Path:
    """Build bench/loadgen into .cache/bench/loadgen-<digest> unless already built."""
    sources = [*sorted(LOADGEN_SRC.glob("*.go")), LOADGEN_SRC / "go.mod", LOADGEN_SRC / "go.sum"]
    binary = LOADGEN_DIR / f"loadgen-{_digest(sources)[:16]}"
    if binary.exists():
        return binary
    go = os.environ.get("GO") or _which("go")
    if go is None:
        raise ChildError("no Go toolchain (go on PATH or GO=): the load generator cannot be built")
    LOADGEN_DIR.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GOTOOLCHAIN": os.environ.get("GOTOOLCHAIN", "auto"),
        "GOFLAGS": "-mod=readonly -buildvcs=false -modcacherw",
    }
    tmp = binary.with_suffix(f".tmp{os.getpid()}")
    done = subprocess.run(
        [go, "build", "-trimpath", "-o", str(tmp), "."],
        cwd=LOADGEN_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=LOADGEN_BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise ChildError(f"building bench/loadgen failed:\n{done.stderr[-4000:]}")
    tmp.replace(binary)
    return binary


def build_upstream() -> Path:
    """scripts/build-upstream.sh (a no-op when up to date); the folder of the binaries."""
    done = subprocess.run(
        ["bash", str(BUILD_UPSTREAM)],
        capture_output=True,
        text=True,
        timeout=UPSTREAM_BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise ChildError(f"scripts/build-upstream.sh failed:\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def _which(name: str) -> str | None:
    for d in os.environ.get("PATH", "").split(os.pathsep):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


# -- certificates and ports ---------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and an agent (client) certificate."""
    ca = trustme.CA()
    server = ca.issue_cert("localhost", LOOPBACK)
    agent = ca.issue_cert("agent.example")
    blobs = {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
        "agent.pem": agent.cert_chain_pems[0].bytes(),
        "agent.key": agent.private_key_pem.bytes(),
    }
    for name, blob in blobs.items():
        (directory / name).write_bytes(blob)
    d = str(directory)
    return Certs(
        f"{d}/ca.pem", f"{d}/server.pem", f"{d}/server.key", f"{d}/agent.pem", f"{d}/agent.key"
    )


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (a race with other processes is possible, unlikely)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}{path}", timeout=2.0) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def wait_ready(child: Proc, port: int, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not child.alive():
            raise ChildError(f"{child.name} exited before {path} answered{child._tail()}")
        if _status(port, path) == 200:
            return
        time.sleep(POLL)
    raise ChildError(f"{child.name}: {path} on port {port} never answered 200{child._tail()}")


# -- a proxy-server + proxy-agent pair -----------------------------------------------------


@dataclass
class Pair:
    impl: str  # one of IMPLS
    mode: str  # "grpc" or "http-connect"
    uds: str
    server: Proc
    agent: Proc
    health: int = 0  # the server's health port (/metrics)


def program_command(side: str, program: str, upstream_bin: Path | None) -> list[str]:
    """The command of one side ("ours" or "upstream") of ``program`` (server or agent)."""
    if side == "upstream":
        assert upstream_bin is not None
        return [str(upstream_bin / f"proxy-{program}")]
    return [sys.executable, "-m", f"konnectivity_fast.{program}"]


def server_flags(
    mode: str, uds: str, certs: Certs, *, agent_port: int, health: int, admin: int
) -> list[str]:
    """A proxy-server's flags for benchmarks, the same for ours and upstream's: frontend
    ``mode`` on the Unix socket ``uds``, mTLS agent port, health and admin on loopback."""
    return [
        f"--mode={mode}",
        f"--uds-name={uds}",
        "--server-port=0",
        f"--cluster-cert={certs.server_cert}",
        f"--cluster-key={certs.server_key}",
        f"--cluster-ca-cert={certs.ca}",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={agent_port}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-port={admin}",
    ]


def agent_flags(
    certs: Certs, server_port: int, *, health: int, admin: int, host: str = LOOPBACK
) -> list[str]:
    """A proxy-agent's flags for benchmarks, the same for ours and upstream's: mTLS to the
    proxy-server (or balancer) at ``host:server_port``, health and admin on loopback."""
    return [
        f"--ca-cert={certs.ca}",
        f"--agent-cert={certs.client_cert}",
        f"--agent-key={certs.client_key}",
        f"--proxy-server-host={host}",
        f"--proxy-server-port={server_port}",
        f"--health-server-host={LOOPBACK}",
        f"--health-server-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-server-port={admin}",
    ]


def start_pair(
    procs: Procs,
    *,
    impl: str,
    mode: str,
    certs: Certs,
    sock_dir: Path,
    upstream_bin: Path | None,
    verbosity: int,
) -> Pair:
    """Start a proxy-server (frontend ``mode`` on a Unix socket) and one proxy-agent
    connected to it over mTLS; return once both say ready."""
    server_side, agent_side = SIDES[impl]
    server_cmd = [*program_command(server_side, "server", upstream_bin), *FLAGS.get(impl, ())]
    agent_cmd = [*program_command(agent_side, "agent", upstream_bin), *FLAGS.get(impl, ())]
    agent_port, health, admin, a_health, a_admin = free_ports(5)
    uds = str(sock_dir / f"{impl}-{mode}-{agent_port}.sock")
    server = procs.start(
        f"{impl}-{mode}-server",
        [
            *server_cmd,
            *server_flags(mode, uds, certs, agent_port=agent_port, health=health, admin=admin),
            f"--v={verbosity}",
        ],
    )
    wait_ready(server, health, "/healthz")
    agent = procs.start(
        f"{impl}-{mode}-agent",
        [
            *agent_cmd,
            *agent_flags(certs, agent_port, health=a_health, admin=a_admin),
            f"--v={verbosity}",
        ],
    )
    wait_ready(agent, a_health, "/readyz")
    wait_ready(server, health, "/readyz")
    pair = Pair(impl, mode, uds, server, agent, health)
    if FLAGS.get(impl) and flow_credit(pair) is None:
        raise ChildError(f"{server.name}: no {FLOW_CREDIT_METRIC} on /metrics: flow.v1 is off")
    return pair


def flow_credit(pair: Pair) -> dict[str, float] | None:
    """The server's flow.v1 credit counters by direction ("granted", "received"), from its
    /metrics; None where the metric is absent (flow control not offered)."""
    try:
        url = f"http://{LOOPBACK}:{pair.health}/metrics"
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(FLOW_CREDIT_METRIC + "{"):
            labels, _, value = line.rpartition(" ")
            direction = labels.split('direction="', 1)[1].split('"', 1)[0]
            found[direction] = float(value)
    return found if found or f"# TYPE {FLOW_CREDIT_METRIC}" in text else None


def stop_pair(procs: Procs, pair: Pair) -> None:
    # The agent first: a server stopped first makes the agent log reconnect attempts.
    procs.stop(pair.agent)
    procs.stop(pair.server)
