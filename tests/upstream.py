"""The upstream Go peers (apiserver-network-proxy v0.36.0 proxy-server, proxy-agent and
test-client, and our goclient dialer on konnectivity-client v0.36.0), built on demand by
scripts/build-upstream.sh into .cache/upstream/, and helpers to run them.

The ``upstream`` fixture builds once per session (the script is idempotent and skips when
nothing changed). In CI (``CI=true``) a missing Go toolchain fails the tests that need
the peers; elsewhere they are skipped. A failed build always fails.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build-upstream.sh"
# A cold build downloads every module (client-go and friends) and compiles them: minutes
# on two cores. Bounded so that a wedged download fails instead of hanging the suite.
BUILD_TIMEOUT_SECONDS = 1500
LOOPBACK = "127.0.0.1"
# Validation of both programs limits ports to 1024-49151: pick below the ephemeral range.
PORT_RANGE = (20000, 32000)
WAIT_SECONDS = 30.0
# Polling step while waiting for a port or an endpoint: short, bounded by WAIT_SECONDS.
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Upstream:
    """Paths of the built binaries."""

    bin: Path
    proxy_server: Path
    proxy_agent: Path
    test_client: Path
    goclient: Path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def build() -> Upstream:
    """Run the build script (a no-op when up to date) and return the binaries."""
    if shutil.which("go") is None and "GO" not in os.environ:
        message = "no Go toolchain (go) on PATH: the upstream peers cannot be built"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_SECONDS,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/build-upstream.sh failed:\n{done.stderr[-6000:]}", pytrace=False)
    bin_dir = Path(done.stdout.strip().splitlines()[-1])
    return Upstream(
        bin_dir,
        bin_dir / "proxy-server",
        bin_dir / "proxy-agent",
        bin_dir / "test-client",
        bin_dir / "goclient",
    )


@pytest.fixture(scope="session")
def upstream() -> Upstream:
    return build()


def free_ports(count: int) -> list[int]:
    """Ports free on the loopback address now (a race with other processes is possible
    but unlikely in the range used)."""
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


def wait_until(predicate: object, what: str) -> None:
    """Poll a zero-argument callable until it returns true, for at most WAIT_SECONDS."""
    assert callable(predicate)
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
        for _, proc, _ in reversed(self.started):
            stop(proc)

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


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
