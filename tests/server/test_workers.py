"""``proxy-server --workers`` as a process (server/workers.py): real worker processes on
the sockets their supervisor bound, real agents (ours and upstream's) and the Go
konnectivity-client through the frontend socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support.net import Certs
from tests.support.procs import child_pids
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    http_get,
    processes,
    run_goclient,
    scrape,
    server_args,
    server_command,
    server_ports,
    upstream,
    wait_for,
    wait_until,
)

__all__ = ["processes", "upstream"]  # fixtures

WORKERS = 2
SERVER_ID = "host-a"
READY_BACKENDS = "konnectivity_network_proxy_server_ready_backend_connections"
AGENT_SERVERS = "konnectivity_network_proxy_agent_open_server_connections"
# Bound on a process's exit after SIGTERM or after its supervisor died.
EXIT_SECONDS = 30.0


def total(port: int, family: str) -> float:
    families = scrape(port)
    return sum(families[family].samples.values()) if family in families else 0.0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def start_server(
    processes: Processes, upstream: Upstream, certs: Certs, uds: str, mode: str = "grpc"
) -> tuple[subprocess.Popen[bytes], int, int]:
    """Our server with ``WORKERS`` workers: the process, its health and agent ports."""
    ports = server_ports()
    args = [
        *server_args(uds, certs, ports, mode=mode),
        f"--workers={WORKERS}",
        f"--server-id={SERVER_ID}",
    ]
    server = processes.start("server", [*server_command("ours", upstream), *args])
    wait_for(server, ports.health, "/healthz", what="our proxy-server with workers")
    return server, ports.health, ports.agent


def start_agent(
    processes: Processes, upstream: Upstream, certs: Certs, which: str, agent_port: int
) -> int:
    """An agent of ``which`` kind; its health port, once it holds every worker."""
    aports = agent_ports()
    args = [*agent_command(which, upstream), *agent_args(certs, agent_port, aports)]
    agent = processes.start(f"agent-{which}", args)
    wait_for(agent, aports.health, "/readyz", what=f"{which} proxy-agent")
    wait_until(
        lambda: total(aports.health, AGENT_SERVERS) == WORKERS,
        f"the {which} agent to hold all {WORKERS} workers",
    )
    return aports.health


def tunnels_work(upstream: Upstream, uds: str, echo_port: int, mode: str = "grpc") -> None:
    code, result = run_goclient(
        upstream,
        f"-mode={mode}",
        f"-uds={uds}",
        f"-target={LOOPBACK}:{echo_port}",
        "-connections=8",
        "-rounds=3",
        "-size=100000",
    )
    assert (code, result["ok"]) == (0, True), result


@pytest.mark.parametrize("which_mode", ["ours/grpc", "upstream/grpc", "ours/http-connect"])
def test_agents_hold_every_worker_and_any_worker_serves_tunnels(
    which_mode: str, processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    which, mode = which_mode.split("/")
    uds = os.path.join(sock_dir, "k.sock")
    server, health, agent_port = start_server(processes, upstream, certs, uds, mode)
    assert len(child_pids(server.pid)) == WORKERS
    assert http_get(health, "/readyz")[0] == 500  # no agent yet
    start_agent(processes, upstream, certs, which, agent_port)
    wait_for(server, health, "/readyz")
    # Each worker holds the agent: the merged gauge counts one per worker.
    assert total(health, READY_BACKENDS) == WORKERS
    with echo_server() as echo_port:
        tunnels_work(upstream, uds, echo_port, mode)
    log = processes.log("server")
    for index in range(WORKERS):
        assert f"Proxy server {SERVER_ID}-{index} ready" in log


def test_merged_metrics_have_a_single_servers_families(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    """Default /metrics stays upstream's: the supervisor's merged scrape has exactly the
    families of one proxy-server, each with its HELP and TYPE once."""
    _, health, _ = start_server(processes, upstream, certs, os.path.join(sock_dir, "w"))
    single_ports = server_ports()
    single = processes.start(
        "single",
        [
            *server_command("ours", upstream),
            *server_args(os.path.join(sock_dir, "s"), certs, single_ports),
        ],
    )
    wait_for(single, single_ports.health, "/healthz")
    merged, alone = scrape(health), scrape(single_ports.health)
    assert set(merged) == set(alone)
    for name, family in merged.items():
        assert (family.type, family.help) == (alone[name].type, alone[name].help)
    status, body = http_get(health, "/metrics")
    assert status == 200
    headers = [line for line in body.decode().splitlines() if line.startswith("# TYPE ")]
    assert len(headers) == len(set(headers)) == len(merged)
    # The process figures are the host's: more than the lone server's own.
    rss = "process_resident_memory_bytes"
    assert merged[rss].samples[rss] > alone[rss].samples[rss]


def test_a_killed_worker_is_started_again_and_agents_return_to_it(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    uds = os.path.join(sock_dir, "k.sock")
    server, health, agent_port = start_server(processes, upstream, certs, uds)
    agent_health = start_agent(processes, upstream, certs, "ours", agent_port)
    victim, survivor = child_pids(server.pid)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(child_pids(server.pid)) == WORKERS and victim not in child_pids(server.pid),
        "the supervisor to start the killed worker again",
    )
    assert survivor in child_pids(server.pid)
    wait_until(
        lambda: total(agent_health, AGENT_SERVERS) == WORKERS,
        "the agent to connect to the new worker",
    )
    wait_for(server, health, "/readyz")
    with echo_server() as echo_port:
        tunnels_work(upstream, uds, echo_port)
    assert "exited with code -9" in processes.log("server")


def test_sigterm_stops_every_worker_and_exits_0(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    server, _, _ = start_server(processes, upstream, certs, os.path.join(sock_dir, "k"))
    workers = child_pids(server.pid)
    server.send_signal(signal.SIGTERM)
    assert server.wait(EXIT_SECONDS) == 0
    assert not any(alive(pid) for pid in workers)
    log = processes.log("server")
    assert log.count("Proxy server stopped.") == WORKERS
    assert "exited with an error" not in log


def test_workers_exit_when_their_supervisor_is_killed(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    server, _, _ = start_server(processes, upstream, certs, os.path.join(sock_dir, "k"))
    workers = child_pids(server.pid)
    server.kill()
    server.wait(EXIT_SECONDS)
    wait_until(lambda: not any(alive(pid) for pid in workers), "the workers to exit")
    assert processes.log("server").count("the supervisor of this worker is gone") == WORKERS


def test_a_busy_agent_port_fails_start_up_as_one_server_does(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str
) -> None:
    with socket.create_server((LOOPBACK, 0)) as busy:
        port = busy.getsockname()[1]
        outputs = []
        for workers in (1, WORKERS):
            ports = server_ports()
            args = [
                *server_args(os.path.join(sock_dir, f"k{workers}"), certs, ports),
                f"--agent-port={port}",
                f"--workers={workers}",
            ]
            done = subprocess.run(
                [*server_command("ours", upstream), *args],
                capture_output=True,
                text=True,
                timeout=EXIT_SECONDS,
                check=False,
            )
            assert done.returncode == 1
            outputs += [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(outputs) == 2 and outputs[0] == outputs[1]
    assert outputs[0] == (
        f"Error: failed to run the agent server: failed to listen on {LOOPBACK}:{port}: "
        f"listen tcp {LOOPBACK}:{port}: bind: address already in use"
    )


def test_a_worker_that_cannot_start_fails_the_start(
    processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str, tmp_path: Path
) -> None:
    """A start-up error only a worker meets (here a kubeconfig that is not one: the
    workers load it, the supervisor does not) is the whole server's: exit 1 with the
    worker's words, no worker left."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("not: [a kubeconfig\n")
    ports = server_ports()
    args = [
        *server_args(os.path.join(sock_dir, "k"), certs, ports),
        f"--workers={WORKERS}",
        "--enable-lease-controller",
        f"--kubeconfig={kubeconfig}",
    ]
    server = processes.start("server", [*server_command("ours", upstream), *args])
    assert server.wait(EXIT_SECONDS) == 1
    log = processes.log("server")
    assert "Error: failed to load kubernetes client config" in log
    assert "Proxy server with" not in log
