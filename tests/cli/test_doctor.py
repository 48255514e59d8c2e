"""``konnectivity-fast doctor`` against real programs: HAProxy (on loopback) in front of
three proxy-servers, ours and upstream v0.36.0's, in three configurations, and ``doctor
server``/``doctor agent`` against running programs, healthy and not.

HAProxy needs to be installed (scripts/bootstrap.sh test does it): the balancer tests
are skipped without it, except in CI (``CI=true``), where that fails.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from konnectivity_fast.cli.demo.tunnels import GrpcTunnel
from tests.support.net import Certs, free_ports
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    scrape,
    server_args,
    server_command,
    server_ports,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)  # the first use builds the upstream binaries

SERVER_IDS = ("a", "b", "c")
TRIES = 12
DOCTOR_SECONDS = 120
READY = "konnectivity_network_proxy_server_ready_backends"
AGENT_KNOWN = "konnectivity_network_proxy_agent_known_server_count"
# HAProxy's frontends: each a pool configuration of the three servers.
CONFIGS = {
    "roundrobin": ("balance roundrobin", SERVER_IDS),
    "source": ("balance source\n    hash-type consistent", SERVER_IDS),
    "short": ("balance roundrobin", SERVER_IDS[:2]),  # replica c missing from the pool
}
EXPECTED = {"roundrobin": ("OK", 0), "source": ("STICKY", 1), "short": ("SHORT", 1)}


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "konnectivity_fast.cli.main", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=DOCTOR_SECONDS,
        check=False,
    )


def tls_args(certs: Certs) -> list[str]:
    return [
        f"--ca-cert={certs.ca}",
        f"--agent-cert={certs.client_cert}",
        f"--agent-key={certs.client_key}",
    ]


@dataclass
class Servers:
    agent_ports: dict[str, int]
    health_ports: dict[str, int]
    socks: dict[str, str]


def start_servers(
    which: str, *, processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str, count: int
) -> Servers:
    servers = Servers({}, {}, {})
    for sid in SERVER_IDS[:count]:
        ports = server_ports()
        sock = os.path.join(sock_dir, f"{sid}.sock")
        argv = [
            *server_command(which, upstream),
            *server_args(sock, certs, ports),
            f"--server-id={sid}",
            f"--server-count={count}",
        ]
        proc = processes.start(f"server-{sid}", argv)
        wait_for(proc, ports.health, "/healthz", what=f"server {sid}")
        servers.agent_ports[sid] = ports.agent
        servers.health_ports[sid] = ports.health
        servers.socks[sid] = sock
    return servers


def haproxy_config(frontends: dict[str, int], servers: Servers) -> str:
    parts = [
        "global\n    maxconn 1000\n",
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 30s\n"
        "    timeout server 30s\n",
    ]
    for name, (balance, members) in CONFIGS.items():
        pool = "".join(
            f"    server {sid} {LOOPBACK}:{servers.agent_ports[sid]}\n" for sid in members
        )
        parts.append(f"frontend {name}\n    bind {LOOPBACK}:{frontends[name]}\n")
        parts.append(f"    default_backend pool_{name}\n")
        parts.append(f"backend pool_{name}\n    {balance}\n{pool}")
    return "".join(parts)


def known(port: int) -> float | None:
    family = scrape(port).get(AGENT_KNOWN)
    return None if family is None else family.samples.get(AGENT_KNOWN)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((LOOPBACK, port)) == 0


@pytest.fixture
def haproxy_bin() -> str:
    found = shutil.which("haproxy")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("haproxy is not installed (scripts/bootstrap.sh test installs it)")
        pytest.skip("haproxy is not installed (scripts/bootstrap.sh test installs it)")
    return found


@pytest.fixture(params=["ours", "upstream"])
def balanced(
    request: pytest.FixtureRequest,
    *,
    haproxy_bin: str,
    processes: Processes,
    upstream: Upstream,
    certs: Certs,
    sock_dir: str,
    tmp_path: Path,
) -> Iterator[tuple[dict[str, int], Servers]]:
    """Three servers (ours or upstream's) behind HAProxy's three frontends."""
    servers = start_servers(
        str(request.param),
        processes=processes,
        upstream=upstream,
        certs=certs,
        sock_dir=sock_dir,
        count=3,
    )
    frontends = dict(zip(CONFIGS, free_ports(len(CONFIGS)), strict=True))
    config = tmp_path / "haproxy.cfg"
    config.write_text(haproxy_config(frontends, servers))
    proc = processes.start("haproxy", [haproxy_bin, "-db", "-f", str(config)])
    wait_until(
        lambda: all(listening(p) for p in frontends.values()) or proc.poll() is not None, "haproxy"
    )
    assert proc.poll() is None, processes.log("haproxy")
    yield frontends, servers


@pytest.mark.parametrize("config", list(CONFIGS))
def test_doctor_lb_verdicts(
    balanced: tuple[dict[str, int], Servers], certs: Certs, config: str
) -> None:
    """Round robin: ok, exit 0; ``balance source``: sticky, exit 1; a replica missing
    from the pool: short, exit 1. And the doctor left no agent behind."""
    frontends, servers = balanced
    done = doctor(
        "lb", f"--address={LOOPBACK}:{frontends[config]}", f"--tries={TRIES}", *tls_args(certs)
    )
    word, code = EXPECTED[config]
    assert f"Verdict: {word}:" in done.stdout, done.stdout + done.stderr
    assert done.returncode == code, done.stdout
    assert "chain   ok" in done.stdout and "names   ok" in done.stdout
    # Each try read a server ID: the tally names the servers it reached.
    reached = [sid for sid in SERVER_IDS if f"\n  {sid} " in done.stdout]
    assert len(reached) == {"roundrobin": 3, "source": 1, "short": 2}[config], done.stdout
    # Never registered for good: every server is back to no agent.
    for sid, port in servers.health_ports.items():
        wait_until(
            lambda p=port: (
                scrape(p)[READY].samples.get(f'{READY}{{proxy_strategy="default"}}') == 0
            ),
            f"server {sid} without the doctor's stream",
        )


def test_doctor_lb_refuses_a_name_the_certificate_lacks(
    balanced: tuple[dict[str, int], Servers], certs: Certs
) -> None:
    frontends, _ = balanced
    done = doctor(
        "lb",
        f"--address={LOOPBACK}:{frontends['roundrobin']}",
        "--proxy-server-host=konnectivity.example",
        "--tries=3",
        *tls_args(certs),
    )
    assert done.returncode == 1
    assert "MISMATCH" in done.stdout and "konnectivity.example" in done.stdout


def test_doctor_lb_wrong_ca_and_nothing_listening(certs: Certs, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    done = doctor("lb", f"--address={LOOPBACK}:{port}", "--tries=2", *tls_args(certs))
    assert done.returncode == 1 and "UNREACHABLE" in done.stdout, done.stdout
    done = doctor("lb", "--address=nonsense", *tls_args(certs))
    assert done.returncode == 2, done.stdout


async def dial_repeatedly(sock: str, address: str, count: int) -> list[str]:
    """``count`` gRPC tunnels, one after another, each carrying a request: the errors."""
    errors = []
    for _ in range(count):
        try:
            tunnel = await GrpcTunnel.open(sock, address)
            await tunnel.send(b"ping")
            if await tunnel.recv() != b"ping":
                errors.append("echo differs")
            await tunnel.close()
        except Exception as exc:
            errors.append(repr(exc))
    return errors


def test_doctor_takes_no_dial(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    """While the doctor connects and leaves 40 times, a client dials through the same
    server (ours) 60 times: every dial is carried by the real agent, none fails."""
    servers = start_servers(
        "ours", processes=processes, upstream=upstream, certs=certs, sock_dir=sock_dir, count=1
    )
    with echo_server() as echo:
        ports = agent_ports()
        agent = processes.start(
            "agent",
            [*agent_command("ours", upstream), *agent_args(certs, servers.agent_ports["a"], ports)],
        )
        wait_for(agent, ports.health, "/readyz", what="agent")
        doctor_run = subprocess.Popen(
            [sys.executable, "-m", "konnectivity_fast.cli.main", "doctor", "lb",
             f"--address={LOOPBACK}:{servers.agent_ports['a']}", "--tries=40", *tls_args(certs)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        errors = asyncio.run(dial_repeatedly(servers.socks["a"], f"{LOOPBACK}:{echo}", 60))
        out, _ = doctor_run.communicate(timeout=DOCTOR_SECONDS)
    assert errors == []
    assert doctor_run.returncode == 0 and "Verdict: OK" in out, out
    failures = scrape(servers.health_ports["a"]).get(
        "konnectivity_network_proxy_server_dial_failure_count"
    )
    assert failures is None or not any(failures.samples.values())


def test_doctor_server_and_agent(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    """Healthy: a server with its agent. Unhealthy: a server without agents, an agent
    holding 1 of the 2 servers it was told of, an address nobody answers on."""
    healthy = start_servers(
        "ours", processes=processes, upstream=upstream, certs=certs, sock_dir=sock_dir, count=1
    )
    ports = agent_ports()
    agent = processes.start(
        "agent",
        [*agent_command("upstream", upstream), *agent_args(certs, healthy.agent_ports["a"], ports)],
    )
    wait_for(agent, ports.health, "/readyz", what="agent")
    health = healthy.health_ports["a"]
    wait_until(
        lambda: scrape(health)[READY].samples.get(f'{READY}{{proxy_strategy="default"}}') == 1,
        "agent on the server",
    )
    done = doctor("server", f"--health={LOOPBACK}:{health}")
    assert done.returncode == 0 and "agents    1 connected" in done.stdout, done.stdout
    done = doctor(
        "agent", f"--health={LOOPBACK}:{ports.health}", f"--admin={LOOPBACK}:{ports.admin}"
    )
    assert done.returncode == 0 and "holds 1 of the 1" in done.stdout, done.stdout

    # A second server, alone, told there are two: not ready, no agent; an agent of it
    # holds 1 of 2 (upstream's server, to read upstream's metrics too).
    lonely = server_ports()
    sock = os.path.join(sock_dir, "lonely.sock")
    proc = processes.start(
        "lonely",
        [
            *server_command("upstream", upstream),
            *server_args(sock, certs, lonely),
            "--server-count=2",
        ],
    )
    wait_for(proc, lonely.health, "/healthz", what="lonely server")
    done = doctor("server", f"--health={LOOPBACK}:{lonely.health}", f"--health={LOOPBACK}:{health}")
    assert done.returncode == 1, done.stdout
    assert "not ready" in done.stdout and "no agent connected" in done.stdout
    assert "while another server holds 1" in done.stdout
    partial = agent_ports()
    agent2 = processes.start(
        "agent2", [*agent_command("ours", upstream), *agent_args(certs, lonely.agent, partial)]
    )
    wait_for(agent2, partial.health, "/readyz", what="agent2")
    # The agent takes the server's count at its next sync (--sync-interval).
    wait_until(lambda: known(partial.health) == 2, "agent2 learning the count of 2")
    done = doctor("agent", f"--health={LOOPBACK}:{partial.health}")
    assert done.returncode == 1 and "holds 1 of 2 servers" in done.stdout, done.stdout
    (nobody,) = free_ports(1)
    done = doctor("agent", f"--health={LOOPBACK}:{nobody}")
    assert done.returncode == 1 and "no answer" in done.stdout, done.stdout
