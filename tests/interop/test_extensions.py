"""Upstream peers see nothing new (konnectivity_fast/wire/contract.py, "Extension
negotiation"), shown on the wire with the real Go programs of v0.36.0.

A TLS-terminating relay (tlsrelay.py) sits between a proxy-agent and a proxy-server and
records their Connect stream in plain text. One tunnel is dialled through the server's
gRPC frontend with konnectivity-client (goclient) to an echo backend, so the stream
carries DIAL_REQ, DIAL_RSP, DATA both ways, CLOSE_REQ and CLOSE_RSP. Then:

- what our server sends upstream's agent has the same header keys and the same sequence
  of packet types as what upstream's server sends it, also when our server offers an
  extension (no ``kf-capabilities`` goes back to an agent that advertised none), flow.v1
  or server-endpoints.v1 (no ``kf-server-endpoints`` either);
- what our agent sends upstream's server has the same header keys and packet types as
  what upstream's agent sends it; offering an extension adds exactly the
  ``kf-capabilities`` request key (grpc-go passes unknown metadata through, upstream's
  server reads only its own keys), upstream's server answers none, and our agent's stream
  negotiates nothing;
- on the frontend, konnectivity-client's Proxy stream (recorded by capture.py's Unix
  socket relay) gets the same response header keys and packet types from our server,
  offering an extension, as from upstream's.

Programs offering a test token are started through offering.py (no user-visible flag can
make them offer one).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.connect import ClientConfig
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.wire.contract import CONNECT_PATH, MD_CAPABILITIES, PROXY_PATH, Extension
from konnectivity_fast.wire.endpoints import MD_SERVER_ENDPOINTS
from tests.support.net import Certs, free_ports
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    run_goclient,
    server_args,
    server_command,
    server_ports,
    stop,
    wait_for,
)

from .capture import Recorder
from .support import READY_BACKENDS, wait_metric
from .tlsrelay import Exchange, Recording, Stream, poll_exchange, tls_recorder

pytestmark = pytest.mark.timeout(300)

OFFERING = Path(__file__).resolve().parent / "offering.py"
TEST = "test.v1"  # a token no program offers by default
ECHO_SIZE = 32  # one DATA packet each way
WAIT_SECONDS = 30.0


FLOW_FLAG = "--enable-tunnel-flow-control"  # ours: offers flow.v1 (docs/flow-control.md)
# Ours: offers server-endpoints.v1 and tells agents this address (docs/high-availability.md).
ADVERTISE_FLAG = f"--agent-advertise-address={LOOPBACK}:8091"
FLOW_CREDIT = "FLOW_CREDIT"  # ours (PacketType 100), never upstream's
# Ours: node-to-control-plane (docs/node-to-control-plane.md); the agent offers
# node-to-cp.v1 and listens on this port.
(N2CP_PORT,) = free_ports(1)
N2CP_FLAGS = [
    "--feature-gates=NodeToMasterTraffic=true",
    f"--bind-address={LOOPBACK}",
    f"--apiserver-port-mapping={N2CP_PORT}:{LOOPBACK}:6443",
]


def command(program: str, which: str, upstream: Upstream) -> list[str]:
    """``which``: "upstream", "ours", "ours+test" (ours, offering TEST), "ours+flow"
    (ours with flow.v1 enabled by its real flag) or "ours+endpoints" (a server with
    ``--agent-advertise-address``; an agent offering server-endpoints.v1)."""
    if which == "ours+test":
        return [sys.executable, str(OFFERING), program, TEST]
    if which == "ours+endpoints":
        if program == "agent":
            return [sys.executable, str(OFFERING), program, Extension.SERVER_ENDPOINTS]
        return [*server_command("ours", upstream), ADVERTISE_FLAG]
    pick = server_command if program == "server" else agent_command
    if which == "ours+n2cp" and program == "agent":
        return [*pick("ours", upstream), *N2CP_FLAGS]
    if which == "ours+flow":
        return [*pick("ours", upstream), FLOW_FLAG]
    return pick(which, upstream)


@dataclass(frozen=True)
class Seen:
    """What one agent and one server said on their Connect stream."""

    request_keys: list[str]  # the agent's request headers
    response_keys: list[str]  # the server's response headers (serverid, servercount)
    to_server: list[str]  # packet types, agent to server
    to_agent: list[str]  # packet types, server to agent


def relay_contexts(certs: Certs) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """The relay's side towards the agent (the server's certificate) and towards the
    server (the agent's client certificate); h2 on both."""
    toward_agent = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    toward_agent.load_cert_chain(certs.server_cert, certs.server_key)
    toward_agent.set_alpn_protocols(["h2"])
    toward_server = ssl.create_default_context(cafile=certs.ca)
    toward_server.load_cert_chain(certs.client_cert, certs.client_key)
    toward_server.set_alpn_protocols(["h2"])
    return toward_agent, toward_server


def tunnel_closed(exchange: Exchange) -> bool:
    try:
        stream_id = exchange.stream_of(CONNECT_PATH)
    except AssertionError:
        return False
    sent = exchange.requests[stream_id].packet_types()
    answered = exchange.responses.get(stream_id, Stream()).packet_types()
    return "CLOSE_RSP" in sent and "CLOSE_REQ" in answered


def observe(
    server: str,
    agent: str,
    *,
    upstream: Upstream,
    certs: Certs,
    processes: Processes,
    tmp: Path,
    size: int = ECHO_SIZE,
    rounds: int = 1,
    before: Callable[[], None] | None = None,
) -> Seen:
    """Run ``server`` and ``agent`` through the relay, one echo tunnel, and read the wire."""
    uds = str(tmp / f"{server}-{agent}.sock")
    ports = server_ports()
    server_proc = processes.start(
        f"server-{server}-{agent}",
        [*command("server", server, upstream), *server_args(uds, certs, ports)],
    )
    wait_for(server_proc, ports.health, "/healthz", what=f"{server} proxy-server")
    with tls_recorder(ports.agent, *relay_contexts(certs)) as relay:
        aports = agent_ports()
        agent_proc = processes.start(
            f"agent-{server}-{agent}",
            [*command("agent", agent, upstream), *agent_args(certs, relay.port, aports)],
        )
        try:
            wait_for(agent_proc, aports.health, "/readyz", what=f"{agent} proxy-agent")
            wait_metric(ports.admin, READY_BACKENDS, lambda v: v == 1, f"{server} server's agent")
            if before is not None:
                before()
            with echo_server() as echo:
                code, result = run_goclient(
                    upstream,
                    f"-uds={uds}",
                    f"-target={LOOPBACK}:{echo}",
                    f"-size={size}",
                    f"-rounds={rounds}",
                )
            assert code == 0, result
            exchange = relay.wait_for(tunnel_closed, "the tunnel's CLOSE_REQ and CLOSE_RSP")
        finally:
            stop([agent_proc, server_proc])
    stream_id = exchange.stream_of(CONNECT_PATH)
    request, response = exchange.requests[stream_id], exchange.responses[stream_id]
    return Seen(
        request.header_keys(0),
        response.header_keys(0),
        request.packet_types(),
        response.packet_types(),
    )


def test_our_server_shows_upstream_agent_what_upstream_server_does(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    def run(server: str) -> Seen:
        return observe(
            server, "upstream", upstream=upstream, certs=certs, processes=processes, tmp=tmp_path
        )

    theirs = run("upstream")
    assert theirs.to_agent == ["DIAL_REQ", "DATA", "CLOSE_REQ"], theirs
    for ours in (run("ours"), run("ours+test"), run("ours+flow"), run("ours+endpoints")):
        assert ours.response_keys == theirs.response_keys
        assert MD_CAPABILITIES not in ours.response_keys
        assert MD_SERVER_ENDPOINTS not in ours.response_keys
        assert ours.to_agent == theirs.to_agent
        assert ours.to_server == theirs.to_server  # upstream's agent answered the same


def test_our_agent_shows_upstream_server_what_upstream_agent_does(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    def run(agent: str) -> Seen:
        return observe(
            "upstream", agent, upstream=upstream, certs=certs, processes=processes, tmp=tmp_path
        )

    theirs = run("upstream")
    assert theirs.to_server == ["DIAL_RSP", "DATA", "CLOSE_RSP"], theirs
    plain, offering, flow = run("ours"), run("ours+test"), run("ours+flow")
    assert plain.request_keys == theirs.request_keys
    assert sorted([*theirs.request_keys, MD_CAPABILITIES]) == offering.request_keys
    assert sorted([*theirs.request_keys, MD_CAPABILITIES]) == flow.request_keys
    for ours in (plain, offering, flow):
        assert MD_CAPABILITIES not in ours.response_keys  # upstream's server answers none
        assert ours.response_keys == theirs.response_keys
        assert ours.to_server == theirs.to_server
        assert ours.to_agent == theirs.to_agent


def test_nothing_is_negotiated_with_upstream_server(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    """Our agent's client, offering an extension, connects to upstream's server and keeps
    an empty negotiated set."""
    ports = server_ports()
    uds = str(tmp_path / "upstream.sock")
    proc = processes.start("server", [str(upstream.proxy_server), *server_args(uds, certs, ports)])
    wait_for(proc, ports.health, "/healthz", what="upstream proxy-server")
    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.load_cert_chain(certs.client_cert, certs.client_key)
    ctx.set_alpn_protocols(["h2"])
    config = ClientConfig(
        host=LOOPBACK,
        port=ports.agent,
        ssl_context=ctx,
        agent_id="offering-agent",
        extensions=frozenset({TEST}),
    )

    async def connect() -> tuple[frozenset[str], list[tuple[str, str]]]:
        client = AgentClient(config, EndpointPool())
        await client.connect()
        try:
            assert client.call is not None
            return client.extensions, list(client.call.metadata)
        finally:
            client.close()
            assert client.proto is not None
            await asyncio.wait_for(client.proto.lost, WAIT_SECONDS)

    negotiated, response = asyncio.run(connect())
    assert negotiated == frozenset()
    assert "serverid" in dict(response)
    assert MD_CAPABILITIES not in dict(response)


def proxy_stream_done(exchange: Exchange) -> bool:
    """The server's CLOSE_RSP on the Proxy stream was recorded (konnectivity-client then
    drops its connection, so no trailers follow)."""
    try:
        stream_id = exchange.stream_of(PROXY_PATH)
    except AssertionError:
        return False
    return "CLOSE_RSP" in exchange.responses.get(stream_id, Stream()).packet_types()


def observe_frontend(
    server: str, *, upstream: Upstream, certs: Certs, processes: Processes, tmp: Path
) -> tuple[list[str], list[str]]:
    """A Proxy stream from goclient through a Unix socket relay to ``server`` (with
    upstream's agent): the keys of its response headers, and the packet types."""
    uds, relay_uds = str(tmp / f"{server}.sock"), str(tmp / f"{server}-relay.sock")
    ports, aports = server_ports(), agent_ports()
    server_proc = processes.start(
        f"frontend-server-{server}",
        [*command("server", server, upstream), *server_args(uds, certs, ports)],
    )
    agent_proc = processes.start(
        f"frontend-agent-{server}",
        [str(upstream.proxy_agent), *agent_args(certs, ports.agent, aports)],
    )
    recorder = Recorder(relay_uds, uds)
    try:
        wait_for(server_proc, ports.health, "/healthz", what=f"{server} proxy-server")
        wait_metric(ports.admin, READY_BACKENDS, lambda v: v == 1, f"{server} server's agent")
        with echo_server() as echo:
            code, result = run_goclient(
                upstream, f"-uds={relay_uds}", f"-target={LOOPBACK}:{echo}", f"-size={ECHO_SIZE}"
            )
        assert code == 0, result

        def recorded() -> Recording | None:
            return Recording(*recorder.connections[0]) if recorder.connections else None

        exchange = poll_exchange(recorded, proxy_stream_done, "the Proxy stream's end")
    finally:
        recorder.close()
        stop([agent_proc, server_proc])
    response = exchange.responses[exchange.stream_of(PROXY_PATH)]
    return response.header_keys(0), response.packet_types()


def test_our_server_shows_konnectivity_client_what_upstream_server_does(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    theirs = observe_frontend(
        "upstream", upstream=upstream, certs=certs, processes=processes, tmp=tmp_path
    )
    ours = observe_frontend(
        "ours+test", upstream=upstream, certs=certs, processes=processes, tmp=tmp_path
    )
    assert theirs[1] == ["DIAL_RSP", "DATA", "CLOSE_RSP"], theirs
    assert ours == theirs
    assert MD_CAPABILITIES not in ours[0]


def test_flow_credit_is_on_the_wire_between_ours_only(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    """The other side of the tests above, so that they can fail: between our server and
    our agent, both with flow.v1 enabled, a transfer of several windows carries credit
    packets both ways (and the server's answer names the extension); with upstream's
    agent or server in the pair, the same transfer carries none. (1 MiB a round: a
    konnectivity-client write is one DATA packet, and gRPC's default limit is 4 MiB.)"""

    def run(server: str, agent: str) -> Seen:
        return observe(
            server,
            agent,
            upstream=upstream,
            certs=certs,
            processes=processes,
            tmp=tmp_path,
            size=1 << 20,
            rounds=4,
        )

    ours = run("ours+flow", "ours+flow")
    assert MD_CAPABILITIES in ours.response_keys
    assert FLOW_CREDIT in ours.to_agent and FLOW_CREDIT in ours.to_server, ours
    for mixed in (run("ours+flow", "upstream"), run("upstream", "ours+flow")):
        assert MD_CAPABILITIES not in mixed.response_keys
        assert FLOW_CREDIT not in mixed.to_agent and FLOW_CREDIT not in mixed.to_server


def test_server_endpoints_reach_our_agent_only(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    """The other side of the first test: our server with ``--agent-advertise-address``
    answers an agent that offers server-endpoints.v1 with ``kf-server-endpoints``; it is
    the same server that showed upstream's agent upstream's headers above."""
    ours = observe(
        "ours+endpoints",
        "ours+endpoints",
        upstream=upstream,
        certs=certs,
        processes=processes,
        tmp=tmp_path,
    )
    assert MD_CAPABILITIES in ours.response_keys
    assert MD_SERVER_ENDPOINTS in ours.response_keys


def test_our_node_to_cp_agent_sends_upstream_server_no_dial(
    upstream: Upstream, certs: Certs, processes: Processes, tmp_path: Path
) -> None:
    """Our agent with an --apiserver-port-mapping, against upstream's server: it offers
    node-to-cp.v1, nothing is negotiated, a client of the local port is reset at once, no
    DIAL_REQ goes to the server (the recorded stream carries what upstream's agent sends),
    and the forward tunnel works."""

    def local_client_is_reset() -> None:
        start = time.monotonic()
        # The reset may come before connect() has returned: it is that quick.
        with pytest.raises(ConnectionResetError):
            with socket.create_connection((LOOPBACK, N2CP_PORT), timeout=5) as sock:
                sock.sendall(b"GET /version HTTP/1.1\r\n\r\n")
                sock.recv(1)
        assert time.monotonic() - start < 1.0

    ours = observe(
        "upstream",
        "ours+n2cp",
        upstream=upstream,
        certs=certs,
        processes=processes,
        tmp=tmp_path,
        before=local_client_is_reset,
    )
    assert MD_CAPABILITIES in ours.request_keys
    assert MD_CAPABILITIES not in ours.response_keys
    assert ours.to_server == ["DIAL_RSP", "DATA", "CLOSE_RSP"], ours
    assert ours.to_agent == ["DIAL_REQ", "DATA", "CLOSE_REQ"], ours
