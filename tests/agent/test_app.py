"""The ``proxy-agent`` program end to end: ``python -m konnectivity_fast.agent`` in a
subprocess against ``python -m konnectivity_fast.server`` subprocesses on loopback ports;
health/readiness/metrics/admin endpoints, a tunnel through it, drain on the first SIGTERM
and exit 0 on the second, and three servers behind HAProxy (when installed)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import free_ports

from .conftest import Certs
from .support import LOOPBACK, EchoServer, Tunnel

pytestmark = pytest.mark.timeout(120)

WAIT = 30.0


def get(
    port: int, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_for(
    predicate: object,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text() if log is not None else ""
            pytest.fail(f"process exited {proc.returncode} while waiting for {what}: {text}")
        with contextlib.suppress(OSError):
            if predicate():
                return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)


@contextlib.contextmanager
def spawn(args: list[str], log: Path) -> Iterator[Proc]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    running = Proc(proc, log)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class ServerPorts:
    agent: int
    health: int
    admin: int
    uds: str


@contextlib.contextmanager
def server_process(
    certs: Certs, sock_dir: str, tmp: Path, server_id: str, count: int = 1
) -> Iterator[ServerPorts]:
    agent_port, health, admin = free_ports(3)
    uds = os.path.join(sock_dir, f"{server_id}.sock")
    args = [
        sys.executable,
        "-m",
        "konnectivity_fast.server",
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
        f"--server-id={server_id}",
        f"--server-count={count}",
    ]
    with spawn(args, tmp / f"{server_id}.log") as proc:
        wait_for(lambda: get(health, "/healthz")[0] == 200, "server health", proc.proc, proc.log)
        yield ServerPorts(agent_port, health, admin, uds)


@dataclass
class AgentPorts:
    health: int
    admin: int
    proc: Proc


@contextlib.contextmanager
def agent_process(certs: Certs, tmp: Path, port: int, *extra: str) -> Iterator[AgentPorts]:
    health, admin = free_ports(2)
    args = [
        sys.executable,
        "-m",
        "konnectivity_fast.agent",
        f"--ca-cert={certs.ca}",
        f"--agent-cert={certs.client_cert}",
        f"--agent-key={certs.client_key}",
        f"--proxy-server-host={LOOPBACK}",
        f"--proxy-server-port={port}",
        f"--health-server-host={LOOPBACK}",
        f"--health-server-port={health}",
        f"--admin-server-port={admin}",
        "--agent-id=agent-e2e",
        "--logtostderr=true",
        "--v=2",
        *extra,
    ]
    with spawn(args, tmp / "agent.log") as proc:
        wait_for(lambda: get(health, "/healthz")[0] == 200, "agent health", proc.proc, proc.log)
        yield AgentPorts(health, admin, proc)


def metric(port: int, name: str) -> float | None:
    text = get(port, "/metrics")[2].decode()
    match = re.search(rf"^konnectivity_network_proxy_agent_{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


def test_endpoints_before_any_server(certs: Certs, tmp_path: Path) -> None:
    (closed,) = free_ports(1)
    with agent_process(certs, tmp_path, closed, "--sync-interval=100ms") as agent:
        assert get(agent.health, "/healthz")[0::2] == (200, b"ok")
        for path in ("/readyz", "/ready"):
            status, _, body = get(agent.health, path)
            assert (status, body) == (
                503,
                b"[+]ping ok\n[-]server-connected failed: no servers connected\n",
            )
        assert metric(agent.health, "open_server_connections") == 0
        status, headers, _ = get(agent.admin, "/metrics?x=1")
        assert status == 301
        assert headers["location"] == f"//{LOOPBACK}:{agent.health}/metrics?x=1"
        assert get(agent.health, "/nope")[0] == 404


def test_agent_serves_and_drains(certs: Certs, sock_dir: str, tmp_path: Path) -> None:
    with (
        server_process(certs, sock_dir, tmp_path, "srv-a") as server,
        agent_process(certs, tmp_path, server.agent) as agent,
    ):
        wait_for(
            lambda: get(agent.health, "/readyz")[0] == 200, "ready", agent.proc.proc, agent.proc.log
        )
        assert get(agent.health, "/readyz")[2] == b"ok"
        assert get(agent.health, "/readyz?verbose")[2] == (
            b"[+]ping ok\n[+]server-connected ok\ncheck passed\n"
        )
        assert metric(agent.health, "open_server_connections") == 1
        assert metric(agent.health, "known_server_count") == 1
        wait_for(lambda: get(server.health, "/readyz")[0] == 200, "server has the agent")

        async def echo_once(payload: bytes) -> None:
            echo = EchoServer()
            port = await echo.start()
            tunnel = await Tunnel.open(server.uds)
            rsp = await tunnel.dial(f"{LOOPBACK}:{port}")
            assert rsp.error == ""
            tunnel.write(payload)
            assert await tunnel.read_exactly(len(payload)) == payload
            await tunnel.close_and_wait()
            await tunnel.aclose()
            await echo.close()

        asyncio.run(asyncio.wait_for(echo_once(os.urandom(1 << 20)), WAIT))
        # First SIGTERM: DRAIN, keep serving; second: exit 0.
        agent.proc.proc.send_signal(signal.SIGTERM)
        wait_for(
            lambda: "sending DRAIN" in agent.proc.log.read_text(),
            "drain",
            agent.proc.proc,
            agent.proc.log,
        )
        asyncio.run(asyncio.wait_for(echo_once(b"still here"), WAIT))
        assert get(agent.health, "/readyz")[0] == 200
        agent.proc.proc.send_signal(signal.SIGTERM)
        assert agent.proc.proc.wait(timeout=WAIT) == 0


HAPROXY = shutil.which("haproxy")


@pytest.mark.skipif(HAPROXY is None, reason="HAProxy is not installed")
@pytest.mark.parametrize("balance", ["roundrobin", "source"])
def test_three_servers_behind_haproxy(
    certs: Certs, sock_dir: str, tmp_path: Path, balance: str
) -> None:
    assert HAPROXY is not None
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(server_process(certs, sock_dir, tmp_path, f"srv-{i}", 3))
            for i in range(3)
        ]
        (lb_port,) = free_ports(1)
        config = tmp_path / "haproxy.cfg"
        backends = "\n".join(
            f"    server s{i} {LOOPBACK}:{s.agent} check inter 200ms" for i, s in enumerate(servers)
        )
        config.write_text(
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
            "    timeout server 1h\n"
            f"frontend agents\n    bind {LOOPBACK}:{lb_port}\n    default_backend servers\n"
            f"backend servers\n    balance {balance}\n{backends}\n"
        )
        stack.enter_context(spawn([HAPROXY, "-f", str(config), "-db"], tmp_path / "ha.log"))
        agent = stack.enter_context(
            agent_process(
                certs, tmp_path, lb_port, "--sync-interval=100ms", "--sync-interval-cap=500ms"
            )
        )
        if balance == "roundrobin":
            wait_for(
                lambda: metric(agent.health, "open_server_connections") == 3,
                "3 connections",
                agent.proc.proc,
                agent.proc.log,
            )
            for server in servers:  # every server can route to the agent
                wait_for(
                    lambda s=server: get(s.health, "/readyz")[0] == 200,  # type: ignore[misc]
                    "server ready",
                )
        else:
            # Sticky: every connection reaches one server; the agent says so.
            wait_for(
                lambda: "looks sticky" in agent.proc.log.read_text(),
                "sticky warning",
                agent.proc.proc,
                agent.proc.log,
            )
            assert metric(agent.health, "open_server_connections") == 1
            assert metric(agent.health, "known_server_count") == 3


def tunnels_command(admin: int) -> str:
    """``konnectivity-fast tunnels --admin=...``, as a person runs it: its output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "konnectivity_fast.cli.main",
            "tunnels",
            f"--admin={LOOPBACK}:{admin}",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tunnels_command_reads_both_programs(certs: Certs, sock_dir: str, tmp_path: Path) -> None:
    """With one tunnel open through the two programs, ``konnectivity-fast tunnels`` shows
    it from each admin port, each from its side; the health ports do not serve the
    listing."""
    with (
        server_process(certs, sock_dir, tmp_path, "srv-a") as server,
        agent_process(certs, tmp_path, server.agent) as agent,
    ):
        wait_for(lambda: get(server.health, "/readyz")[0] == 200, "server has the agent")
        outputs: dict[str, str] = {}

        async def with_a_tunnel() -> str:
            echo = EchoServer()
            port = await echo.start()
            tunnel = await Tunnel.open(server.uds)
            assert (await tunnel.dial(f"{LOOPBACK}:{port}")).error == ""
            tunnel.write(b"t" * 3000)
            assert await tunnel.read_exactly(3000) == b"t" * 3000
            for name, admin in (("server", server.admin), ("agent", agent.admin)):
                outputs[name] = await asyncio.to_thread(tunnels_command, admin)
            await tunnel.close_and_wait()
            await tunnel.aclose()
            await echo.close()
            return f"{LOOPBACK}:{port}"

        destination = asyncio.run(asyncio.wait_for(with_a_tunnel(), WAIT))
        head, peers, _, title, row = outputs["server"].splitlines()
        assert head.startswith("proxy-server srv-a: 1 tunnel on 1 agent, 0 pending dials; ")
        assert peers == "agents: agent-e2e 1"
        assert title.split()[:4] == ["CONN", "AGENT", "DESTINATION", "FRONTEND"]
        assert row.split()[1:6] == ["agent-e2e", destination, "grpc", "2.9KiB", "2.9KiB"]
        head, peers, _, title, row = outputs["agent"].splitlines()
        assert head.startswith("proxy-agent agent-e2e: 1 tunnel via 1 server, 0 pending dials; ")
        assert peers == "servers: srv-a 1"
        assert title.split()[:3] == ["CONN", "SERVER", "DESTINATION"]
        assert row.split()[1:5] == ["srv-a", destination, "2.9KiB", "2.9KiB"]
        for health in (server.health, agent.health):
            assert get(health, "/debug/tunnels")[0] == 404
