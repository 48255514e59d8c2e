"""Smoke interop: a proxy-server and a proxy-agent (ours with upstream's, both ways, ours
with ours, and upstream's pair as the control) and a TCP echo backend on loopback; goclient
dials the backend through the server in each frontend mode and transport and the bytes must
come back unchanged.

Each case starts its own server and agent, waits for the agent to be ready, then runs
goclient with several concurrent tunnels, several rounds each. Upstream's own test-client
and test-server are the second client/backend pair.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support.net import Certs
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    free_ports,
    run_goclient,
    server_args,
    server_command,
    server_ports,
    wait_for,
)

CONNECTIONS = 3
ROUNDS = 4
# Larger than one gRPC DATA packet from the agent's 32 KiB reads: the bytes come back
# split across several packets and must be reassembled in order.
SIZE = 100_000

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries


@dataclass(frozen=True)
class Case:
    server: str  # "ours" or "upstream"
    agent: str  # "ours" or "upstream"
    mode: str  # "grpc" or "http-connect"
    transport: str  # "uds" or "mtls"

    def __str__(self) -> str:
        return f"{self.server}-server-{self.agent}-agent-{self.mode}-{self.transport}"


# upstream with upstream is the control: it shows what the peers expect of each other.
PAIRS = [("ours", "upstream"), ("upstream", "ours"), ("ours", "ours"), ("upstream", "upstream")]
CASES = [
    Case(server, agent, mode, transport)
    for server, agent in PAIRS
    for mode in ("grpc", "http-connect")
    for transport in ("uds", "mtls")
]
UDS_CASES = [c for c in CASES if c.transport == "uds"]


@dataclass(frozen=True)
class Running:
    frontend: list[str]  # goclient's flags to reach the frontend


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


def start(
    case: Case, upstream: Upstream, certs: Certs, processes: Processes, sock_dir: str
) -> Running:
    ports = server_ports()
    uds = os.path.join(sock_dir, "konnectivity.sock")
    args = server_args(uds, certs, ports, mode=case.mode)
    if case.transport == "mtls":
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
    server = processes.start("server", [*server_command(case.server, upstream), *args])
    wait_for(server, ports.health, "/healthz", what=f"{case.server} proxy-server")
    aports = agent_ports()
    agent = processes.start(
        "agent", [*agent_command(case.agent, upstream), *agent_args(certs, ports.agent, aports)]
    )
    wait_for(agent, aports.health, "/readyz", what=f"{case.agent} proxy-agent")
    wait_for(server, ports.health, "/readyz", what=f"{case.server} proxy-server")
    return Running(frontend)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bytes_round_trip(
    case: Case,
    *,
    upstream: Upstream,
    certs: Certs,
    processes: Processes,
    sock_dir: str,
    echo_port: int,
) -> None:
    running = start(case, upstream, certs, processes, sock_dir)
    code, result = run_goclient(
        upstream,
        f"-mode={case.mode}",
        *running.frontend,
        f"-target={LOOPBACK}:{echo_port}",
        f"-connections={CONNECTIONS}",
        f"-rounds={ROUNDS}",
        f"-size={SIZE}",
    )
    assert (code, result["ok"]) == (0, True), result
    for conn in result["connections"]:
        assert conn["sent"] == conn["received"] == ROUNDS * SIZE, conn
        assert conn["match"], conn


@pytest.mark.parametrize("case", UDS_CASES, ids=str)
def test_dial_to_a_closed_port_fails(
    case: Case, upstream: Upstream, certs: Certs, processes: Processes, sock_dir: str
) -> None:
    """The control: a backend that refuses the connection is reported as a failed dial,
    not as a round trip."""
    running = start(case, upstream, certs, processes, sock_dir)
    (closed_port,) = free_ports(1)
    code, result = run_goclient(
        upstream, f"-mode={case.mode}", *running.frontend, f"-target={LOOPBACK}:{closed_port}"
    )
    assert code == 1, result
    (conn,) = result["connections"]
    assert not conn["dialed"], conn
    if case.mode == "grpc":
        assert conn["dial_failure_reason"] == "endpoint", conn
    else:
        assert conn["http_status"] == 502, conn  # Bad Gateway, as upstream answers


# The page upstream's test-server answers on /success (test-client logs each body at V(4)).
SUCCESS_PAGE = "The success test page!"
TEST_CLIENT_REQUESTS = 3
TEST_CLIENT_SECONDS = 60


@pytest.mark.parametrize("case", UDS_CASES, ids=str)
def test_upstream_test_client_http_requests(
    case: Case, upstream: Upstream, certs: Certs, processes: Processes, sock_dir: str
) -> None:
    """Upstream's own test-client sends HTTP requests to upstream's test-server through
    the server, in its gRPC (konnectivity-client) or HTTP-CONNECT mode."""
    (backend_port,) = free_ports(1)
    backend = processes.start(
        "test-server", [str(upstream.test_server), f"--server-port={backend_port}"]
    )
    wait_for(backend, backend_port, "/success", what="upstream test-server")
    start(case, upstream, certs, processes, sock_dir)
    uds = os.path.join(sock_dir, "konnectivity.sock")
    done = subprocess.run(
        [
            str(upstream.test_client),
            f"--mode={case.mode}",
            f"--proxy-uds={uds}",
            "--proxy-host=",
            "--proxy-port=0",
            f"--request-host={LOOPBACK}",
            f"--request-port={backend_port}",
            "--request-path=success",
            f"--test-requests={TEST_CLIENT_REQUESTS}",
        ],
        capture_output=True,
        text=True,
        timeout=TEST_CLIENT_SECONDS,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stderr.count(SUCCESS_PAGE) == TEST_CLIENT_REQUESTS, done.stderr[-4000:]
