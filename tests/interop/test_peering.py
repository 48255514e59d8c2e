"""Server peering (docs/high-availability.md, "Server peering") with real programs on
loopback: two of our proxy-servers as processes, each with a peer listener (mTLS) and the
other in ``--peer-endpoints``; an agent (ours or upstream's) connected to the second only;
upstream's konnectivity-client (goclient) dialling through the first, in both frontend
modes. Also: no agent anywhere (upstream's error at once, no loop, the gauges back to 0), a
peer whose certificate comes from another CA (refused), and the metrics only with the flag.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.support.net import Certs
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    ServerPorts,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    free_ports,
    run_goclient,
    scrape,
    server_args,
    server_ports,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries

CONNECTIONS = 2
ROUNDS = 3
# Several DATA packets each way per round, reassembled in order through both servers.
SIZE = 100_000
# "at once": the proposal's bound for the error when no server has an agent.
NO_AGENT_WITHIN_MS = 1000
PEER = "konnectivity_fast_server_peer_"
OUR_SERVER = [sys.executable, "-m", "konnectivity_fast.server"]


@dataclass(frozen=True)
class Server:
    server_id: str
    uds: str
    ports: ServerPorts
    peer_port: int


@pytest.fixture
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


@pytest.fixture(scope="module")
def foreign_certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A certificate for localhost from another CA: (cert, key, that CA)."""
    d: Path = tmp_path_factory.mktemp("foreign")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = []
    for name, blob in (
        ("cert.pem", leaf.cert_chain_pems[0].bytes()),
        ("key.pem", leaf.private_key_pem.bytes()),
        ("ca.pem", ca.cert_pem.bytes()),
    ):
        (d / name).write_bytes(blob)
        paths.append(str(d / name))
    return paths[0], paths[1], paths[2]


def start_servers(
    processes: Processes,
    certs: Certs,
    sock_dir: str,
    mode: str,
    *,
    tls: list[tuple[str, str, str]] | None = None,
) -> list[Server]:
    """Two peered servers, s1 and s2, each listing both (its own ID is skipped).
    ``tls``: each server's (peer cert, key, CA), default the common CA's."""
    servers = []
    peer_ports = free_ports(2)
    endpoints = ",".join(f"s{i + 1}={LOOPBACK}:{port}" for i, port in enumerate(peer_ports))
    for i, peer_port in enumerate(peer_ports):
        server = Server(
            f"s{i + 1}", os.path.join(sock_dir, f"s{i + 1}.sock"), server_ports(), peer_port
        )
        cert, key, ca = (tls or [(certs.server_cert, certs.server_key, certs.ca)] * 2)[i]
        args = [
            *server_args(server.uds, certs, server.ports, mode=mode),
            f"--server-id={server.server_id}",
            "--enable-peer-forwarding",
            f"--peer-port={peer_port}",
            f"--peer-bind-address={LOOPBACK}",
            f"--peer-endpoints={endpoints}",
            f"--peer-cert={cert}",
            f"--peer-key={key}",
            f"--peer-ca-cert={ca}",
            "-v=3",
        ]
        proc = processes.start(server.server_id, [*OUR_SERVER, *args])
        wait_for(proc, server.ports.health, "/healthz", what=server.server_id)
        servers.append(server)
    return servers


def start_agent(
    processes: Processes, upstream: Upstream, certs: Certs, which: str, server: Server
) -> None:
    ports = agent_ports()
    args = agent_args(certs, server.ports.agent, ports)
    agent = processes.start("agent", [*agent_command(which, upstream), *args])
    wait_for(agent, ports.health, "/readyz", what=f"{which} proxy-agent")


def peer_metrics(server: Server) -> dict[str, float]:
    found: dict[str, float] = {}
    for name, family in scrape(server.ports.admin).items():
        if name.startswith(PEER):
            found.update(family.samples)
    return found


def dials(server: Server, result: str) -> float:
    return peer_metrics(server).get(f'{PEER}dials_total{{result="{result}"}}', 0.0)


def streams_closed(servers: list[Server]) -> None:
    """Every peer stream of both servers ends (the gauges back to 0)."""

    def closed() -> bool:
        values = [peer_metrics(s) for s in servers]
        return all(
            v.get(f'{PEER}streams{{role="{role}"}}') == 0.0
            for v in values
            for role in ("forwarding", "forwarded")
        )

    wait_until(closed, "every peer stream to close")


@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
@pytest.mark.parametrize("agent", ["ours", "upstream"])
def test_dial_through_peer_reaches_agent_of_other_server(
    mode: str,
    agent: str,
    *,
    upstream: Upstream,
    certs: Certs,
    processes: Processes,
    sock_dir: str,
    echo_port: int,
) -> None:
    s1, s2 = start_servers(processes, certs, sock_dir, mode)
    start_agent(processes, upstream, certs, agent, s2)
    code, result = run_goclient(
        upstream,
        f"-mode={mode}",
        f"-uds={s1.uds}",
        f"-target={LOOPBACK}:{echo_port}",
        f"-connections={CONNECTIONS}",
        f"-rounds={ROUNDS}",
        f"-size={SIZE}",
    )
    assert (code, result["ok"]) == (0, True), result
    for conn in result["connections"]:
        assert conn["sent"] == conn["received"] == ROUNDS * SIZE, conn
        assert conn["match"], conn
    assert dials(s1, "ok") == CONNECTIONS
    assert dials(s2, "ok") == 0  # s2 had the agent: it forwarded nothing
    # The client closed its tunnels: both servers' sides are gone.
    streams_closed([s1, s2])


@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
def test_no_agent_anywhere_fails_at_once_without_loop(
    mode: str, *, upstream: Upstream, certs: Certs, processes: Processes, sock_dir: str
) -> None:
    s1, s2 = start_servers(processes, certs, sock_dir, mode)
    (closed_port,) = free_ports(1)
    code, result = run_goclient(
        upstream, f"-mode={mode}", f"-uds={s1.uds}", f"-target={LOOPBACK}:{closed_port}"
    )
    assert code == 1, result
    (conn,) = result["connections"]
    assert not conn["dialed"], conn
    assert conn["dial_ms"] < NO_AGENT_WITHIN_MS, conn
    if mode == "grpc":
        assert "No agent available" in conn["error"], conn
    else:
        assert conn["http_status"] == 500, conn
        assert "No agent available" in conn["http_body"], conn
    assert dials(s1, "no_agent") == 1  # s2 was asked once, and did not ask s1 back
    assert dials(s2, "no_agent") == dials(s2, "ok") == dials(s2, "error") == 0
    streams_closed([s1, s2])


@pytest.mark.parametrize("foreign", ["forwarder", "peer"])
def test_peer_with_foreign_certificate_is_refused(
    foreign: str,
    *,
    upstream: Upstream,
    certs: Certs,
    processes: Processes,
    sock_dir: str,
    echo_port: int,
    foreign_certs: tuple[str, str, str],
) -> None:
    """One server presents a certificate from another CA (both trust only the common CA):
    ``forwarder``, s1's is refused by s2's listener; ``peer``, s2's is refused by s1 as it
    dials. Either way the tunnel is not made, the client gets upstream's error, and s1
    counts a peer error."""
    cert, key, _ = foreign_certs
    ours = (certs.server_cert, certs.server_key, certs.ca)
    theirs = (cert, key, certs.ca)
    tls = [theirs, ours] if foreign == "forwarder" else [ours, theirs]
    s1, s2 = start_servers(processes, certs, sock_dir, "grpc", tls=tls)
    start_agent(processes, upstream, certs, "ours", s2)
    code, result = run_goclient(
        upstream, "-mode=grpc", f"-uds={s1.uds}", f"-target={LOOPBACK}:{echo_port}"
    )
    assert code == 1, result
    (conn,) = result["connections"]
    assert "No agent available" in conn["error"], conn
    assert dials(s1, "error") == 1
    assert dials(s1, "ok") == 0
    assert peer_metrics(s2).get(f'{PEER}streams{{role="forwarded"}}') == 0.0


def test_peer_metrics_only_with_the_flag(
    *, certs: Certs, processes: Processes, sock_dir: str
) -> None:
    ports = server_ports()
    uds = os.path.join(sock_dir, "plain.sock")
    proc = processes.start("plain", [*OUR_SERVER, *server_args(uds, certs, ports)])
    wait_for(proc, ports.health, "/healthz", what="server without peering")
    assert not [name for name in scrape(ports.admin) if name.startswith("konnectivity_fast_")]
    (s1, _) = start_servers(processes, certs, sock_dir, "grpc")
    families = {name for name in scrape(s1.ports.admin) if name.startswith(PEER)}
    assert families == {PEER + "dials_total", PEER + "streams"}
