"""Behind a sticky load balancer (real HAProxy, ``balance source``), three proxy-servers
(upstream v0.36.0's, and ours) and one agent:

1. **The problem, reproduced** (the guard): through the balancer alone, upstream's agent
   and ours hold one server of three, so two servers answer ``No agent available``; ours
   says so (``konnectivity_fast_agent_lb_sticky_suspected`` 1 and a warning naming the
   balancer).
2. **The fix that works with upstream's servers**: our agent with ``--proxy-server-list``
   holds all three, every server carries a tunnel to the agent's backend (the Go
   konnectivity-client through each server's socket), and nothing is missing.

Needs HAProxy (installed by scripts/bootstrap.sh); skipped without it except in CI.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.net import free_ports
from tests.support.upstream import (
    LOOPBACK,
    AgentPorts,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    in_ci,
    run_goclient,
    scrape,
    server_args,
    server_command,
    server_ports,
    wait_until,
)

from .conftest import Certs
from .support import sample

pytestmark = pytest.mark.timeout(240)

HAPROXY = shutil.which("haproxy")
SERVERS = 3
OPEN = "konnectivity_network_proxy_agent_open_server_connections"
KNOWN = "konnectivity_network_proxy_agent_known_server_count"
STICKY = "konnectivity_fast_agent_lb_sticky_suspected"
MISSING = "konnectivity_fast_agent_missing_servers"


def _haproxy(processes: Processes, tmp: Path, agent_ports_: list[int]) -> int:
    if HAPROXY is None:
        if in_ci():
            pytest.fail("haproxy is not installed (scripts/bootstrap.sh installs it)")
        pytest.skip("haproxy is not installed")
    (port,) = free_ports(1)
    backends = "\n".join(
        f"    server s{i} {LOOPBACK}:{p} check inter 200ms" for i, p in enumerate(agent_ports_)
    )
    config = tmp / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n"
        "    timeout server 1h\n"
        f"frontend agents\n    bind {LOOPBACK}:{port}\n    default_backend servers\n"
        f"backend servers\n    balance source\n{backends}\n"
    )
    processes.start("haproxy", [HAPROXY, "-f", str(config), "-db"])
    return port


def _metric(ports: AgentPorts, name: str) -> float | None:
    try:
        return sample(scrape(ports.health), name)
    except OSError:  # not listening yet
        return None


@pytest.mark.parametrize("server_impl", ["upstream", "ours"])
def test_static_list_beats_a_sticky_balancer(  # noqa: PLR0917
    upstream: Upstream,
    processes: Processes,
    certs: Certs,
    sock_dir: str,
    tmp_path: Path,
    server_impl: str,
) -> None:
    uds = [f"{sock_dir}/s{i}.sock" for i in range(SERVERS)]
    ports = [server_ports() for _ in range(SERVERS)]
    for i in range(SERVERS):
        processes.start(
            f"server-{i}",
            [
                *server_command(server_impl, upstream),
                *server_args(uds[i], certs, ports[i]),
                f"--server-id=s{i}",
                f"--server-count={SERVERS}",
            ],
        )
    lb = _haproxy(processes, tmp_path, [p.agent for p in ports])
    sync = ["--sync-interval=100ms", "--sync-interval-cap=500ms"]

    with echo_server() as echo:
        # 1. The guard: upstream's agent and ours, through the balancer alone, hold one
        # server, and only that server can carry a tunnel.
        for impl in ("upstream", "ours"):
            guard = agent_ports()
            agent = processes.start(
                f"guard-{impl}",
                [*agent_command(impl, upstream), *agent_args(certs, lb, guard), *sync],
            )
            wait_until(lambda g=guard: _metric(g, KNOWN) == SERVERS, f"{impl} agent counts 3")
            if impl == "ours":
                wait_until(lambda g=guard: _metric(g, STICKY) == 1, "sticky suspected")
                assert "looks sticky" in processes.log(f"guard-{impl}")
            assert _metric(guard, OPEN) == 1
            assert _tunnels(upstream, uds, echo) == 1
            agent.kill()
            agent.wait(timeout=30)

        # 2. Our agent with every server's own address: all three held.
        _direct(upstream, processes, certs, lb, sync, [p.agent for p in ports])
        assert _tunnels(upstream, uds, echo) == SERVERS


def _tunnels(upstream: Upstream, uds: list[str], echo: int) -> int:
    """How many servers carry a tunnel to the echo backend (the others answer "No agent
    available")."""
    carried = 0
    for path in uds:
        code, result = run_goclient(upstream, f"-uds={path}", f"-target={LOOPBACK}:{echo}")
        if code == 0:
            carried += 1
        else:
            assert "No agent available" in str(result), result
    return carried


def _direct(  # noqa: PLR0917
    upstream: Upstream,
    processes: Processes,
    certs: Certs,
    lb: int,
    sync: list[str],
    server_agent_ports: list[int],
) -> None:
    direct = agent_ports()
    listed = ",".join(f"{LOOPBACK}:{port}" for port in server_agent_ports)
    processes.start(
        "direct",
        [
            *agent_command("ours", upstream),
            *agent_args(certs, lb, direct),
            *sync,
            f"--proxy-server-list={listed}",
        ],
    )
    wait_until(lambda: _metric(direct, OPEN) == SERVERS, "3 of 3 servers held")
    assert _metric(direct, MISSING) == 0
    assert _metric(direct, STICKY) in (None, 0)
