"""The programs under attack, as processes: a proxy-server and proxy-agents, ours or
upstream v0.36.0's, with what the kernel says about them (CPU, RSS, descriptors) and what
they logged.

``Program`` is one process: its command line (upstream's flags, which both take), its log
file, ``kill9`` and ``stop``, ``stats()`` from /proc and async ``get`` of its health and
admin endpoints. ``start_server`` and ``start_agent`` start one and wait until it answers
``/healthz``; a server can run under ``prlimit --nofile=N`` (descriptor exhaustion) and on
fixed ports (a restart after kill -9 reuses them). Upstream's binaries are used only if
already built (``UPSTREAM_BIN``); nothing here builds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.net import Certs, free_ports

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_BIN = ROOT / ".cache" / "upstream" / "v0.36.0" / "bin"
LOOPBACK = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Seconds a program has to answer /healthz (ours imports its modules first).
START_TIMEOUT = 30.0
#: Seconds a stopping program gets after SIGTERM before SIGKILL...
STOP_TIMEOUT = 10.0
#: ... after a first SIGTERM, which only makes an agent drain, before the second.
DRAIN_WAIT = 0.5
POLL = 0.05
HTTP_TIMEOUT = 5.0
#: Upstream's test framework's agent sync settings: a lost server is retried quickly.
FAST_SYNC = ("--sync-interval=100ms", "--sync-interval-cap=1s")


def upstream_built() -> bool:
    return (UPSTREAM_BIN / "proxy-server").exists() and (UPSTREAM_BIN / "proxy-agent").exists()


@dataclass(frozen=True)
class Stats:
    cpu: float  # seconds, utime + stime
    rss_kib: int
    fds: int


@dataclass
class Program:
    """One running proxy-server or proxy-agent."""

    name: str
    impl: str  # "ours" or "upstream"
    argv: list[str]
    log_path: Path
    health: int
    admin: int
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stats(self) -> Stats:
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            raw = f.read()
        rest = raw[raw.rindex(b")") + 2 :].split()
        cpu = (int(rest[11]) + int(rest[12])) / CLK_TCK
        rss = 0
        with open(f"/proc/{self.pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
        return Stats(cpu, rss, len(os.listdir(f"/proc/{self.pid}/fd")))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        # Both agents drain on the first SIGTERM and stop on the second.
        for wait in (DRAIN_WAIT, STOP_TIMEOUT):
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
                return
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    async def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        """GET ``path`` on the health port (or ``port``): status and body; (0, b"") if
        the program does not answer."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(LOOPBACK, port or self.health), HTTP_TIMEOUT
            )
        except (OSError, TimeoutError):
            return 0, b""
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            response = await asyncio.wait_for(reader.read(), HTTP_TIMEOUT)
        except (OSError, TimeoutError):
            return 0, b""
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        parts = head.split(b" ")
        return (int(parts[1]), body) if len(parts) > 1 and parts[1].isdigit() else (0, b"")

    async def metric(self, name: str, labels: str = "") -> float | None:
        """One sample of the program's ``/metrics`` (health port), ``name{labels}`` as
        exposed (``labels='result="ok"'``); None if absent or not answered."""
        status, body = await self.get("/metrics")
        key = f"{name}{{{labels}}} " if labels else f"{name} "
        for line in body.decode(errors="replace").splitlines() if status == 200 else ():
            if line.startswith(key):
                return float(line[len(key) :])
        return None

    async def wait_metric(
        self, name: str, value: float, labels: str = "", timeout: float = START_TIMEOUT
    ) -> None:
        """Wait until ``name{labels}`` equals ``value``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (got := await self.metric(name, labels)) != value:
            assert self.alive(), f"{self.name} exited:\n{self.log()[-3000:]}"
            assert loop.time() < deadline, f"{self.name}: {name}{{{labels}}} stayed {got}"
            await asyncio.sleep(POLL)

    async def wait_for(self, path: str, status: int = 200, timeout: float = START_TIMEOUT) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (got := await self.get(path))[0] != status:
            assert self.alive(), f"{self.name} exited:\n{self.log()[-3000:]}"
            assert loop.time() < deadline, f"{self.name}: {path} stayed {got}"
            await asyncio.sleep(POLL)


def _program(impl: str, which: str) -> list[str]:
    if impl == "upstream":
        return [str(UPSTREAM_BIN / f"proxy-{which}")]
    return [sys.executable, "-m", f"konnectivity_fast.{which}"]


@dataclass
class ServerPorts:
    agent: int
    health: int
    admin: int
    frontend: int = 0  # TCP frontend (mTLS) when not 0

    @classmethod
    def pick(cls, tcp_frontend: bool = False) -> ServerPorts:
        ports = free_ports(4)
        return cls(ports[0], ports[1], ports[2], ports[3] if tcp_frontend else 0)


@dataclass
class ServerSpec:
    """What a server is started with; kept so that it can be started again."""

    impl: str
    certs: Certs
    workdir: Path
    mode: str = "grpc"
    ports: ServerPorts = field(default_factory=ServerPorts.pick)
    nofile: int | None = None
    extra: tuple[str, ...] = ()

    @property
    def uds(self) -> str:
        return str(self.workdir / f"{self.impl}-{self.ports.agent}.sock")

    def argv(self) -> list[str]:
        c, p = self.certs, self.ports
        frontend = (
            [
                f"--server-port={p.frontend}",
                f"--server-bind-address={LOOPBACK}",
                f"--server-cert={c.server_cert}",
                f"--server-key={c.server_key}",
                f"--server-ca-cert={c.ca}",
            ]
            if p.frontend
            else [f"--uds-name={self.uds}", "--server-port=0", "--delete-existing-uds-file"]
        )
        argv = [
            *_program(self.impl, "server"),
            f"--mode={self.mode}",
            *frontend,
            f"--cluster-cert={c.server_cert}",
            f"--cluster-key={c.server_key}",
            f"--cluster-ca-cert={c.ca}",
            f"--agent-bind-address={LOOPBACK}",
            f"--agent-port={p.agent}",
            f"--health-bind-address={LOOPBACK}",
            f"--health-port={p.health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-port={p.admin}",
            *self.extra,
        ]
        if self.nofile is not None:
            argv = ["prlimit", f"--nofile={self.nofile}:{self.nofile}", "--", *argv]
        return argv


async def start_server(spec: ServerSpec, name: str = "server") -> Program:
    program = Program(
        f"{spec.impl} {name}",
        spec.impl,
        spec.argv(),
        spec.workdir / f"{spec.impl}-{name}.log",
        spec.ports.health,
        spec.ports.admin,
    )
    program.start()
    await program.wait_for("/healthz")
    return program


async def start_agent(
    impl: str,
    certs: Certs,
    workdir: Path,
    server_port: int,
    agent_id: str,
    *extra: str,
    fast_sync: bool = True,
) -> Program:
    """An agent of ``server_port``'s server, once it answers /healthz. ``fast_sync``:
    upstream's test framework's sync settings (a lost server is retried every 100 ms to
    1 s), else the defaults (1 s, backing off to 10 s)."""
    health, admin = free_ports(2)
    argv = [
        *_program(impl, "agent"),
        f"--agent-id={agent_id}",
        f"--ca-cert={certs.ca}",
        f"--agent-cert={certs.client_cert}",
        f"--agent-key={certs.client_key}",
        f"--proxy-server-host={LOOPBACK}",
        f"--proxy-server-port={server_port}",
        f"--health-server-host={LOOPBACK}",
        f"--health-server-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-server-port={admin}",
        *(FAST_SYNC if fast_sync else ()),
        *extra,
    ]
    program = Program(
        f"{impl} agent {agent_id}",
        impl,
        argv,
        workdir / f"{impl}-agent-{agent_id}.log",
        health,
        admin,
    )
    program.start()
    await program.wait_for("/healthz")
    return program
