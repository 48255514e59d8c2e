"""The upstream Go peers (apiserver-network-proxy v0.36.0 proxy-server, proxy-agent,
test-client and test-server, and our goclient dialer on konnectivity-client v0.36.0),
built on demand by scripts/build-upstream.sh into .cache/upstream/, and helpers to run
them: their command lines, a TCP echo backend, process handling and a parser of the
Prometheus text format.

The ``upstream`` fixture builds once per session (the script is idempotent and skips when
nothing changed). In CI (``CI=true``) a missing Go toolchain fails the tests that need
the peers; elsewhere they are skipped. A failed build always fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socketserver
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.net import Certs, free_ports

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-upstream.sh"
# A cold build downloads every module (client-go and friends) and compiles them: minutes
# on two cores. Bounded so that a wedged download fails instead of hanging the suite.
BUILD_TIMEOUT_SECONDS = 1500
# What the script says when it would need Go and has none.
NO_GO = "error: no Go toolchain"
LOOPBACK = "127.0.0.1"
WAIT_SECONDS = 30.0
# Polling step while waiting for a port or an endpoint: short, bounded by WAIT_SECONDS.
POLL_SECONDS = 0.05
# Stopping: how long a program may take after the first SIGTERM (a graceful drain), then
# after the second, before it is killed.
DRAIN_SECONDS = 2.0
STOP_SECONDS = 10.0
# One goclient run: its own -timeout (30 s by default) plus start-up.
GOCLIENT_SECONDS = 60


@dataclass(frozen=True)
class Upstream:
    """Paths of the built binaries and of the sources they were built from."""

    bin: Path
    proxy_server: Path
    proxy_agent: Path
    test_client: Path
    test_server: Path  # upstream's HTTP backend for test-client
    goclient: Path
    source: Path  # apiserver-network-proxy v0.36.0
    client_source: Path  # konnectivity-client v0.36.0


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def build() -> Upstream:
    """Run the build script (a no-op when up to date) and return the binaries."""
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0 and NO_GO in done.stderr and not in_ci():
        pytest.skip("no Go toolchain (go on PATH or GO): the upstream peers cannot be built")
    if done.returncode != 0:
        pytest.fail(f"scripts/build-upstream.sh failed:\n{done.stderr[-6000:]}", pytrace=False)
    bin_dir = Path(done.stdout.strip().splitlines()[-1])
    return Upstream(
        bin_dir,
        bin_dir / "proxy-server",
        bin_dir / "proxy-agent",
        bin_dir / "test-client",
        bin_dir / "test-server",
        bin_dir / "goclient",
        bin_dir.parent / "src",
        bin_dir.parent / "konnectivity-client",
    )


@pytest.fixture(scope="session")
def upstream() -> Upstream:
    return build()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # Echo until the peer half-closes or resets: the backend of the round trips.
        with contextlib.suppress(OSError):
            while data := self.request.recv(ECHO_CHUNK):
                self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


# Read size of the echo backend: any size works, the client reads until it has it all.
ECHO_CHUNK = 65536


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo backend on 127.0.0.1 (a thread of this process); yields its port."""
    server = _EchoServer((LOOPBACK, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, name="echo", daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def http_get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; an HTTP error status is returned, not raised."""
    url = f"http://{LOOPBACK}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait_for(
    proc: subprocess.Popen[bytes], port: int, path: str, want: int = 200, what: str = ""
) -> None:
    """Poll until GET path on port answers ``want``; fail if the process exits first."""
    deadline = time.monotonic() + WAIT_SECONDS
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what or proc.args} exited {proc.returncode} before {path} answered")
        try:
            status, body = http_get(port, path, timeout=2.0)
            if status == want:
                return
            last = f"{status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(POLL_SECONDS)
    pytest.fail(f"{what or proc.args}: {path} on port {port} never answered {want} ({last})")


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll until ``predicate()`` is true, for at most WAIT_SECONDS."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(POLL_SECONDS)
    pytest.fail(f"timed out waiting for {what}")


class Processes:
    """Processes a test starts. Their output goes to log files (a pipe nobody reads
    would block a chatty klog), shown when a test fails; each is terminated (then
    killed) at teardown, in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        self.started.append((name, proc, log))
        return proc

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop_all(self) -> None:
        stop([proc for _, proc, _ in reversed(self.started)])

    def report(self) -> str:
        parts = []
        for name, proc, log in self.started:
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            parts.append(f"--- {name} (exit {proc.poll()}) ---\n{tail}")
        return "\n".join(parts)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
    # pytest shows captured output only for a failed test: the logs explain the failure.
    print(procs.report())


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each; a second SIGTERM for those still running after DRAIN_SECONDS
    (upstream's agent only drains on the first signal and stops on the second); SIGKILL
    for those still running after STOP_SECONDS more."""
    for grace in (DRAIN_SECONDS, STOP_SECONDS):
        running = [p for p in procs if p.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + grace
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_SECONDS)


# -- the programs' command lines ----------------------------------------------------------


def server_command(which: str, upstream: Upstream) -> list[str]:
    """The proxy-server program: "ours" or "upstream"."""
    if which == "upstream":
        return [str(upstream.proxy_server)]
    return [sys.executable, "-m", "konnectivity_fast.server"]


def agent_command(which: str, upstream: Upstream) -> list[str]:
    """The proxy-agent program: "ours" or "upstream"."""
    if which == "upstream":
        return [str(upstream.proxy_agent)]
    return [sys.executable, "-m", "konnectivity_fast.agent"]


@dataclass(frozen=True)
class ServerPorts:
    agent: int
    health: int
    admin: int


def server_ports() -> ServerPorts:
    return ServerPorts(*free_ports(3))


def server_args(uds: str, certs: Certs, ports: ServerPorts, mode: str = "grpc") -> list[str]:
    """A proxy-server command line (ours and upstream's take the same): the frontend on a
    Unix socket, agents over mTLS on loopback, health and admin on loopback."""
    return [
        f"--mode={mode}",
        f"--uds-name={uds}",
        "--server-port=0",
        f"--cluster-cert={certs.server_cert}",
        f"--cluster-key={certs.server_key}",
        f"--cluster-ca-cert={certs.ca}",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={ports.agent}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={ports.health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-port={ports.admin}",
    ]


@dataclass(frozen=True)
class AgentPorts:
    health: int
    admin: int


def agent_ports() -> AgentPorts:
    return AgentPorts(*free_ports(2))


def agent_args(certs: Certs, server_agent_port: int, ports: AgentPorts) -> list[str]:
    """An upstream proxy-agent command line connecting to a proxy-server on loopback with
    the client certificate."""
    return [
        f"--ca-cert={certs.ca}",
        f"--agent-cert={certs.client_cert}",
        f"--agent-key={certs.client_key}",
        f"--proxy-server-host={LOOPBACK}",
        f"--proxy-server-port={server_agent_port}",
        f"--health-server-host={LOOPBACK}",
        f"--health-server-port={ports.health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-server-port={ports.admin}",
    ]


def run_goclient(upstream: Upstream, *args: str) -> tuple[int, dict[str, Any]]:
    """Run goclient; returns its exit status and its JSON result."""
    done = subprocess.run(
        [str(upstream.goclient), *args],
        capture_output=True,
        text=True,
        timeout=GOCLIENT_SECONDS,
        check=False,
    )
    assert done.stdout.strip(), f"goclient printed no result: {done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, result


# -- the Prometheus text format ------------------------------------------------------------


@dataclass
class Family:
    """One metric family as scraped: TYPE, HELP (unescaped), the label names of its
    samples (without a histogram's ``le``), its bucket bounds and its samples."""

    name: str
    type: str = ""
    help: str = ""
    labels: set[str] = field(default_factory=set)
    buckets: list[str] = field(default_factory=list)
    samples: dict[str, float] = field(default_factory=dict)  # "name{labels}" -> value


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def unescape_help(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), text)


def parse_exposition(body: str) -> dict[str, Family]:
    families: dict[str, Family] = {}
    for line in body.splitlines():
        if line.startswith("# HELP "):
            name, _, text = line[7:].partition(" ")
            families.setdefault(name, Family(name)).help = unescape_help(text)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            families.setdefault(name, Family(name)).type = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            sample, labels, value = match.groups()
            family = families.get(sample) or families[re.sub("_(bucket|sum|count)$", "", sample)]
            pairs = LABEL.findall(labels or "")
            family.labels |= {k for k, _ in pairs if k != "le"}
            family.buckets += [v for k, v in pairs if k == "le" and v not in family.buckets]
            family.samples[sample + (labels or "")] = float(value)
    return families


def scrape(port: int) -> dict[str, Family]:
    status, body = http_get(port, "/metrics")
    assert status == 200, body[:500]
    return parse_exposition(body.decode())
