"""What the demo runs where: two proxy-servers (one per frontend mode, the same agent
port behind one load-balanced address, ``--server-count=2``), two proxy-agents that each
hold both servers, a backend per worker, and the command line of each program.

- local: everything on 127.0.0.1 (free ports in 1024-49151, the programs' valid range);
  the demo's own balancer process stands in for the load balancer;
- remote: the namespaces of ``netns``: servers in ``cp``, HAProxy in ``lb``, one agent
  and one backend in each worker; servers route by destination
  (``--proxy-strategies=destHost,default``, each agent announcing its worker's address).

A ``Place`` is where a program runs; it also reads that program's HTTP endpoints (from
inside the namespace for a remote one: the root namespace never sends to its addresses).
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from konnectivity_fast.cli.demo.netns import PREFIX, Network
from konnectivity_fast.cli.demo.pki import Pki
from konnectivity_fast.cli.promtext import HTTP_TIMEOUT, HttpAnswer, http_get
from konnectivity_fast.wire.contract import FrontendMode, ProxyStrategy

__all__ = [
    "AgentSpec",
    "BackendSpec",
    "Layout",
    "Place",
    "ServerSpec",
    "local_layout",
    "remote_layout",
]

LOOPBACK = "127.0.0.1"
# Both programs accept ports 1024-49151; below the usual ephemeral range, a port found
# free here is unlikely to be taken by an outgoing connection before the program binds it.
PORT_RANGE = (20000, 32000)
# The programs' log verbosity: connections and dials, not every packet.
VERBOSITY = 2
# Agents look for the second server this often; different per agent, so that two agents
# retrying in step behind a round-robin balancer do not keep drawing the same server.
SYNC_INTERVALS_MS = (100, 170)
# Ports inside the namespaces (remote topology): upstream's defaults where they exist.
REMOTE_SERVER_PORTS = ((8091, 8092, 8095), (8191, 8192, 8195))  # agent, health, admin
REMOTE_AGENT_PORTS = (8093, 8094)  # health, admin
REMOTE_BACKEND_PORT = 8080
REMOTE_LB_PORT = 8091
# A probe run inside a namespace: GET each (port, path) on 127.0.0.1, print JSON answers.
_PROBE = r"""
import http.client, json, sys
out = []
for item in json.loads(sys.argv[1]):
    conn = http.client.HTTPConnection("127.0.0.1", item[0], timeout=float(sys.argv[2]))
    try:
        conn.request("GET", item[1])
        resp = conn.getresponse()
        out.append([resp.status, resp.read().decode("utf-8", "replace"), ""])
    except Exception as exc:
        out.append([0, "", str(exc) or type(exc).__name__])
    finally:
        conn.close()
print(json.dumps(out))
"""


def free_ports(count: int) -> list[int]:
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


@dataclass(frozen=True)
class Place:
    """This machine's own network namespace (``netns`` empty) or one of the demo's."""

    netns: str = ""

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def shell(self, command: str) -> str:
        """``command`` as a person would type it to run it here."""
        return f"ip netns exec {self.netns} {command}" if self.netns else command

    def get_many(self, requests: Sequence[tuple[int, str]]) -> list[HttpAnswer]:
        """GET http://127.0.0.1:port/path for each, from this place."""
        if not self.netns:
            return [http_get(LOOPBACK, port, path) for port, path in requests]
        done = subprocess.run(
            self.argv(
                [sys.executable, "-I", "-c", _PROBE, json.dumps(requests), str(HTTP_TIMEOUT)]
            ),
            capture_output=True,
            text=True,
            timeout=HTTP_TIMEOUT * (len(requests) + 1),
            check=False,
        )
        if done.returncode != 0:
            return [HttpAnswer(0, "", done.stderr.strip()[-200:])] * len(requests)
        return [HttpAnswer(s, b, e) for s, b, e in json.loads(done.stdout)]


@dataclass(frozen=True)
class ServerSpec:
    mode: str  # FrontendMode
    server_id: str
    place: Place
    uds: str
    agent_host: str
    agent_port: int
    health_port: int
    admin_port: int


@dataclass(frozen=True)
class AgentSpec:
    agent_id: str
    place: Place
    proxy_host: str  # the load-balanced address
    proxy_port: int
    health_port: int
    admin_port: int
    identifiers: str
    sync_interval_ms: int


@dataclass(frozen=True)
class BackendSpec:
    name: str
    place: Place
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass
class Layout:
    kind: str  # "local" or "remote"
    folder: Path
    servers: list[ServerSpec]
    agents: list[AgentSpec]
    backends: list[BackendSpec]
    strategies: str
    lb_place: Place
    lb_listen: list[tuple[str, int]]  # where agents find "the" proxy-server
    server_names: list[str]  # the server certificate's SANs
    network: Network | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def server_argv(self, spec: ServerSpec, pki: Pki) -> list[str]:
        return spec.place.argv([
            sys.executable, "-m", "konnectivity_fast.server",
            f"--mode={spec.mode}", f"--uds-name={spec.uds}", "--server-port=0",
            f"--cluster-cert={pki.server_cert}", f"--cluster-key={pki.server_key}",
            f"--cluster-ca-cert={pki.ca}",
            f"--agent-bind-address={spec.agent_host}", f"--agent-port={spec.agent_port}",
            f"--health-bind-address={LOOPBACK}", f"--health-port={spec.health_port}",
            f"--admin-bind-address={LOOPBACK}", f"--admin-port={spec.admin_port}",
            f"--server-id={spec.server_id}", f"--server-count={len(self.servers)}",
            f"--proxy-strategies={self.strategies}", f"--v={VERBOSITY}",
        ])  # fmt: skip

    def agent_argv(self, spec: AgentSpec, pki: Pki) -> list[str]:
        return spec.place.argv([
            sys.executable, "-m", "konnectivity_fast.agent",
            f"--ca-cert={pki.ca}", f"--agent-cert={pki.agent_cert}",
            f"--agent-key={pki.agent_key}",
            f"--proxy-server-host={spec.proxy_host}", f"--proxy-server-port={spec.proxy_port}",
            f"--agent-id={spec.agent_id}", f"--agent-identifiers={spec.identifiers}",
            f"--health-server-host={LOOPBACK}", f"--health-server-port={spec.health_port}",
            f"--admin-bind-address={LOOPBACK}", f"--admin-server-port={spec.admin_port}",
            f"--sync-interval={spec.sync_interval_ms}ms", "--sync-interval-cap=1s",
            "--probe-interval=200ms", f"--v={VERBOSITY}",
        ])  # fmt: skip

    def backend_argv(self, spec: BackendSpec) -> list[str]:
        return spec.place.argv([
            sys.executable, "-m", "konnectivity_fast.cli.demo.backend",
            f"--host={spec.host}", f"--port={spec.port}", f"--name={spec.name}",
        ])  # fmt: skip

    def balancer_argv(self) -> list[str]:
        """The local topology's balancer (remote: HAProxy, see ``netns``)."""
        host, port = self.lb_listen[0]
        backends = [f"--backend={s.agent_host}:{s.agent_port}" for s in self.servers]
        return [
            sys.executable, "-m", "konnectivity_fast.cli.demo.balancer",
            f"--listen={host}:{port}", *backends,
        ]  # fmt: skip


MODES = (FrontendMode.GRPC, FrontendMode.HTTP_CONNECT)


def _server_id(mode: str) -> str:
    return f"server-{mode}"


def local_layout(folder: Path) -> Layout:
    here = Place()
    ports = iter(free_ports(3 * len(MODES) + 2 * 2 + 2))
    servers = [
        ServerSpec(
            mode=str(mode),
            server_id=_server_id(mode),
            place=here,
            uds=str(folder / f"{mode}.sock"),
            agent_host=LOOPBACK,
            agent_port=next(ports),
            health_port=next(ports),
            admin_port=next(ports),
        )
        for mode in MODES
    ]
    lb = (LOOPBACK, next(ports))
    agents = [
        AgentSpec(
            agent_id=f"agent-{i + 1}",
            place=here,
            proxy_host=lb[0],
            proxy_port=lb[1],
            health_port=next(ports),
            admin_port=next(ports),
            identifiers="",
            sync_interval_ms=SYNC_INTERVALS_MS[i],
        )
        for i in range(2)
    ]
    backend = BackendSpec("kubelet", here, LOOPBACK, next(ports))
    return Layout(
        kind="local",
        folder=folder,
        servers=servers,
        agents=agents,
        backends=[backend],
        strategies=str(ProxyStrategy.DEFAULT),
        lb_place=here,
        lb_listen=[lb],
        server_names=["localhost", LOOPBACK],
    )


def remote_layout(folder: Path, net: Network) -> Layout:
    cp = Place(net.cp)
    servers = []
    for (agent_port, health_port, admin_port), mode in zip(REMOTE_SERVER_PORTS, MODES, strict=True):
        servers.append(
            ServerSpec(
                mode=str(mode),
                server_id=_server_id(mode),
                place=cp,
                uds=str(folder / f"{mode}.sock"),
                agent_host=net.cp_address,
                agent_port=agent_port,
                health_port=health_port,
                admin_port=admin_port,
            )
        )
    agents = []
    backends = []
    for i, (name, address, lb_address) in enumerate(net.worker_addresses):
        worker = name.removeprefix(PREFIX)
        agents.append(
            AgentSpec(
                agent_id=f"agent-{worker}",
                place=Place(name),
                proxy_host=lb_address,
                proxy_port=REMOTE_LB_PORT,
                health_port=REMOTE_AGENT_PORTS[0],
                admin_port=REMOTE_AGENT_PORTS[1],
                identifiers=f"host={address}",
                sync_interval_ms=SYNC_INTERVALS_MS[i],
            )
        )
        backends.append(BackendSpec(f"kubelet-{worker}", Place(name), address, REMOTE_BACKEND_PORT))
    lb_addresses = [lb for _, _, lb in net.worker_addresses]
    return Layout(
        kind="remote",
        folder=folder,
        servers=servers,
        agents=agents,
        backends=backends,
        strategies=f"{ProxyStrategy.DEST_HOST},{ProxyStrategy.DEFAULT}",
        lb_place=Place(net.lb),
        lb_listen=[(lb, REMOTE_LB_PORT) for lb in lb_addresses],
        server_names=["localhost", LOOPBACK, net.cp_address, *lb_addresses],
        network=net,
    )
