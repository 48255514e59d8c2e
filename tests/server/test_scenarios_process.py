"""The ``proxy-server`` program as a subprocess (``python -m konnectivity_fast.server``) with
grpcio peers: readiness flipping as an agent comes and goes, a tunnel in each mode, the
metric values scraped over HTTP from the health and admin ports, and SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

import grpc
import pytest

from tests.support.agent_peer import (
    GrpcDialer,
    TestAgent,
    agent_credentials,
    backend,
    close_req,
    connect_request,
    data,
    echo,
    open_http,
)

from .conftest import Certs, RunFn
from .test_app import free_ports

METRIC_PREFIX = "konnectivity_network_proxy_server_"
START_SECONDS = 30.0
NOT_READY = (500, b"no connection to any proxy agent")


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    stderr: IO[bytes]
    uds: str
    agent_port: int
    health_port: int
    admin_port: int

    async def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port or self.health_port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")

    async def stop(self) -> int:
        """SIGTERM; the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, START_SECONDS)

    async def wait_ready(self, want: tuple[int, bytes]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_SECONDS
        while (got := await self.get("/readyz")) != want:
            assert loop.time() < deadline, f"/readyz stayed {got}"
            await asyncio.sleep(0.02)

    async def metrics(self, port: int | None = None) -> dict[str, float]:
        status, body = await self.get("/metrics", port)
        assert status == 200
        out = {}
        for line in body.decode().splitlines():
            if line.startswith(METRIC_PREFIX):
                series, _, value = line.rpartition(" ")
                out[series[len(METRIC_PREFIX) :]] = float(value)
        return out


@contextlib.asynccontextmanager
async def proxy_process(certs: Certs, sock_dir: str, mode: str) -> AsyncIterator[Process]:
    agent, health, admin = free_ports(3)
    uds = os.path.join(sock_dir, "proc.sock")
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    # subprocess, not asyncio's: uvloop keeps an eventfd for child watching once used.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "konnectivity_fast.server",
            f"--mode={mode}",
            f"--uds-name={uds}",
            "--server-port=0",
            "--server-id=proc-1",
            "--server-count=3",
            f"--cluster-cert={certs.server_cert}",
            f"--cluster-key={certs.server_key}",
            f"--cluster-ca-cert={certs.ca}",
            "--agent-bind-address=127.0.0.1",
            f"--agent-port={agent}",
            "--health-bind-address=127.0.0.1",
            f"--health-port={health}",
            "--admin-bind-address=127.0.0.1",
            f"--admin-port={admin}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
    )
    running = Process(proc, stderr, uds, agent, health, admin)
    try:

        async def healthy() -> bool:
            assert proc.poll() is None, f"proxy-server exited: {running.errors()}"
            with contextlib.suppress(OSError):
                return await running.get("/healthz") == (200, b"ok")
            return False

        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_SECONDS
        while not await healthy():
            assert loop.time() < deadline, "proxy-server did not answer /healthz"
            await asyncio.sleep(0.05)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        await asyncio.to_thread(proc.wait, START_SECONDS)
        stderr.close()


async def tunnel_once(p: Process, mode: str, agent: TestAgent, address: str) -> None:
    """One tunnel through the process to the echo backend at ``address``, round trip."""
    payload = os.urandom(50_000)
    if mode == "grpc":
        dialer = GrpcDialer(f"unix:{p.uds}", None)
        try:
            stream = dialer.stream()
            connect_id = await stream.connect(address, 5)
            await stream.send(data(connect_id, payload))
            assert await stream.read_data(connect_id, len(payload)) == payload
            await stream.send(close_req(connect_id))
            await stream.expect("CLOSE_RSP")
            assert await stream.end() == grpc.StatusCode.OK
        finally:
            await dialer.close()
    else:
        tunnel = await open_http(p.uds, None, None)
        try:
            tunnel.writer.write(connect_request(address) + payload)
            head = await tunnel.reader.readuntil(b"\r\n\r\n")
            assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
            assert await tunnel.reader.readexactly(len(payload)) == payload
        finally:
            await tunnel.close()
        await agent.wait_packet("CLOSE_REQ")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
def test_process_readiness_tunnel_metrics(
    arun: RunFn, certs: Certs, sock_dir: str, mode: str
) -> None:
    async def main() -> None:
        async with proxy_process(certs, sock_dir, mode) as p, backend(echo) as echo_backend:
            assert await p.get("/readyz") == NOT_READY
            assert await p.get("/ready") == NOT_READY
            creds = agent_credentials(certs.ca_pem, certs.client_cert_pem, certs.client_key_pem)
            agent = TestAgent(f"127.0.0.1:{p.agent_port}", creds, agent_id="proc-agent")
            await agent.start()
            try:
                assert (agent.headers["serverid"], agent.headers["servercount"]) == ("proc-1", "3")
                assert await p.get("/readyz") == (200, b"ok")
                await tunnel_once(p, mode, agent, echo_backend.address)
                for port in (p.health_port, p.admin_port):
                    got = await p.metrics(port)
                    assert got["dial_duration_seconds_count"] == 1
                    assert got['grpc_connections{service_method="Connect"}'] == 1
                    assert got['ready_backends{proxy_strategy="default"}'] == 1
            finally:
                await agent.disconnect()

            await p.wait_ready(NOT_READY)
            got = await p.metrics()
            assert got['grpc_connections{service_method="Connect"}'] == 0
            assert got['ready_backends{proxy_strategy="default"}'] == 0
            assert got["established_connections"] == 0
            assert got["http_connections"] == 0
            assert await p.stop() == 0, p.errors()

    arun(main())
