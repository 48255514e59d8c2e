"""The ``proxy-server`` program end to end: ``python -m konnectivity_fast.server`` in a
subprocess, on loopback ports and a Unix socket."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from konnectivity_fast.metrics import TEXT_CONTENT_TYPE
from konnectivity_fast.server import CONNECT_PATH
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire import DialRequest, DialResponse, Packet, PacketType
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from tests.support.net import Certs, free_ports

LOOPBACK = "127.0.0.1"
WAIT_SECONDS = 30.0


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "konnectivity_fast.server", *args]


def run_cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    return subprocess.run(
        command(*args), check=False, capture_output=True, timeout=WAIT_SECONDS, env=env
    )


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    health_port: int
    admin_port: int
    agent_port: int
    uds: str
    mode: str


def get(
    port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_healthy(running: Running) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            err = running.proc.stderr.read() if running.proc.stderr else b""
            pytest.fail(f"proxy-server exited {running.proc.returncode}: {err.decode()}")
        try:
            if get(running.health_port, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail("proxy-server did not answer /healthz")


@pytest.fixture(params=["grpc", "http-connect"])
def server(request: pytest.FixtureRequest, certs: Certs, sock_dir: str) -> Iterator[Running]:
    agent, health, admin = free_ports(3)
    uds = os.path.join(sock_dir, "konnectivity.sock")
    proc = subprocess.Popen(
        command(
            f"--mode={request.param}",
            f"--uds-name={uds}",
            "--server-port=0",
            f"--cluster-cert={certs.server_cert}",
            f"--cluster-key={certs.server_key}",
            f"--cluster-ca-cert={certs.ca}",
            f"--agent-bind-address={LOOPBACK}",
            f"--agent-port={agent}",
            f"--health-bind-address={LOOPBACK}",
            f"--health-port={health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-port={admin}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = Running(proc, health, admin, agent, uds, request.param)
    try:
        wait_healthy(running)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_SECONDS)


def test_healthz(server: Running) -> None:
    status, headers, body = get(server.health_port, "/healthz")
    assert (status, body) == (200, b"ok")
    assert headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("path", ["/readyz", "/ready"])
def test_not_ready_without_agents(server: Running, path: str) -> None:
    status, headers, body = get(server.health_port, path)
    assert (status, body) == (500, b"no connection to any proxy agent")
    assert headers["content-type"] == "text/plain; charset=utf-8"


def test_ready_with_an_agent(server: Running, certs: Certs) -> None:
    async def main() -> None:
        ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
        proto = await kgrpc.connect(
            host=LOOPBACK, port=server.agent_port, ssl=ctx, server_hostname="localhost"
        )
        try:
            call = proto.start_call(CONNECT_PATH, metadata=[("agentid", "a1")])
            headers = dict(await call.headers_received)
            assert headers["servercount"] == "1"
            # The agent is registered as its headers are sent: /readyz answers ok.
            result = await asyncio.to_thread(get, server.health_port, "/readyz")
            assert (result[0], result[2]) == (200, b"ok")
        finally:
            await proto.aclose()

    asyncio.run(asyncio.wait_for(main(), WAIT_SECONDS))


def test_unknown_path(server: Running) -> None:
    status, _, body = get(server.health_port, "/nope")
    assert (status, body) == (404, b"404 page not found\n")
    assert get(server.admin_port, "/healthz")[0] == 404


@pytest.mark.parametrize("which", ["health", "admin"])
def test_metrics(server: Running, which: str) -> None:
    port = server.health_port if which == "health" else server.admin_port
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == TEXT_CONTENT_TYPE
    text = body.decode()
    assert "# TYPE konnectivity_network_proxy_server_" in text
    assert 'konnectivity_network_proxy_server_ready_backends{proxy_strategy="default"} 0' in text


def test_metrics_negotiates_escaping(server: Running) -> None:
    accept = "text/plain;version=0.0.4;escaping=values"
    _, headers, _ = get(server.health_port, "/metrics", headers={"Accept": accept})
    assert headers["content-type"].endswith("escaping=values")


def test_head_has_no_body(server: Running) -> None:
    status, headers, body = get(server.health_port, "/healthz", method="HEAD")
    assert (status, body, headers["content-length"]) == (200, b"", "2")


def test_uds_socket_mode(server: Running) -> None:
    mode = os.stat(server.uds).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o770


def test_sigterm_exits_zero(server: Running) -> None:
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=WAIT_SECONDS) == 0
    err = server.proc.stderr.read().decode() if server.proc.stderr else ""
    assert "Starting health server for healthchecks." in err


def test_unknown_flag() -> None:
    proc = run_cli("--nope")
    assert proc.returncode != 0
    assert b"unknown flag: --nope" in proc.stderr


def test_help() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert b"Usage:\n  proxy-server [flags]" in proc.stdout
    assert b"--uds-name string" in proc.stdout


def test_validation_error() -> None:
    proc = run_cli("--mode=nope")
    assert proc.returncode == 1
    assert (
        b"failed to validate server options with mode must be set to either 'grpc' or "
        b"'http-connect' not \"nope\"" in proc.stderr
    )


def test_frontend_speaks_the_mode(server: Running) -> None:
    """HTTP-CONNECT mode answers a CONNECT (500: no agent); gRPC mode answers an HTTP/1
    request by closing (it expects the HTTP/2 preface)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.uds)
        sock.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
            if b"\r\n\r\n" in reply and server.mode == "http-connect":
                break
    if server.mode == "http-connect":
        assert reply.startswith(b"HTTP/1.1 500 "), reply
    else:
        assert not reply.startswith(b"HTTP/1.1"), reply


def test_kube_client_failure_is_one_clear_line(certs: Certs, sock_dir: str) -> None:
    """Token auth needs a Kubernetes client: no --kubeconfig and no in-cluster environment
    is a clean start-up failure."""
    agent, health, admin = free_ports(3)
    proc = run_cli(
        f"--uds-name={os.path.join(sock_dir, 'p.sock')}",
        "--server-port=0",
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--authentication-audience=system:konnectivity-server",
        f"--cluster-cert={certs.server_cert}",
        f"--cluster-key={certs.server_key}",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={agent}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={health}",
        f"--admin-port={admin}",
    )
    assert proc.returncode == 1
    assert b"unable to load in-cluster configuration" in proc.stderr


@pytest.fixture(params=["grpc", "http-connect"])
def tcp_server(request: pytest.FixtureRequest, certs: Certs) -> Iterator[tuple[Running, int]]:
    """The frontend on TCP with mTLS (no --uds-name)."""
    frontend, agent, health, admin = free_ports(4)
    proc = subprocess.Popen(
        command(
            f"--mode={request.param}",
            f"--server-bind-address={LOOPBACK}",
            f"--server-port={frontend}",
            f"--server-cert={certs.server_cert}",
            f"--server-key={certs.server_key}",
            f"--server-ca-cert={certs.ca}",
            f"--cluster-cert={certs.server_cert}",
            f"--cluster-key={certs.server_key}",
            f"--agent-bind-address={LOOPBACK}",
            f"--agent-port={agent}",
            f"--health-bind-address={LOOPBACK}",
            f"--health-port={health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-port={admin}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = Running(proc, health, admin, agent, "", request.param)
    try:
        wait_healthy(running)
        yield running, frontend
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_SECONDS)


def test_tcp_frontend_with_mtls(tcp_server: tuple[Running, int], certs: Certs) -> None:
    """Over TCP+mTLS both modes answer a dial with no agent connected: HTTP-CONNECT with
    a 500, gRPC with DIAL_RSP "No agent available"."""
    running, port = tcp_server
    client_tls = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
    if running.mode == "http-connect":
        client_tls.set_alpn_protocols(["http/1.1"])
        with (
            socket.create_connection((LOOPBACK, port), timeout=10) as raw,
            client_tls.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            sock.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 500 ")
        return

    async def dial() -> Packet:
        proto = await kgrpc.connect(
            host=LOOPBACK, port=port, ssl=client_tls, server_hostname="localhost"
        )
        call = proto.start_call("/ProxyService/Proxy")
        call.send(encode_packet(Packet(PacketType.DIAL_REQ, DialRequest("tcp", "10.0.0.1:1", 7))))
        reply = await asyncio.wait_for(call.recv(), WAIT_SECONDS)
        await proto.aclose()
        assert reply is not None
        return decode_packet(reply)

    reply = asyncio.run(dial())
    assert reply == Packet(PacketType.DIAL_RSP, DialResponse(error="No agent available", random=7))
