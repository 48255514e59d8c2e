"""10 000 half-open connections against a ``proxy-server`` process.

The server runs as ``python -m konnectivity_fast.server`` so its descriptors can be counted in
``/proc/<pid>/fd``. With a grpcio agent connected and a healthy tunnel echoing through the
server, the test opens ``HALF_OPEN`` connections spread over every listener of the process and
leaves them idle: a TCP connect and nothing more, half an HTTP/2 preface, or a TLS ClientHello
and nothing more (the handshake started, never finished). Then:

- the healthy tunnel keeps flowing while they are held;
- when the peers leave, the server's fd count returns to its baseline (a correctness check);
- a new dial works afterwards and SIGTERM still exits 0.

The server's RSS before, during and after is printed (run with ``-s``), not asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from .abuse import (
    ADDRESS,
    LOOPBACK,
    PEER_TIMEOUT,
    GrpcioAgent,
    Pinger,
    client_tls,
    count_fds,
    grpcio_dial,
    grpcio_echo,
    http_echo,
    rss_kib,
)
from .conftest import Certs
from .test_app import command, free_ports

pytestmark = pytest.mark.timeout(240)

#: How many idle peers the test holds at once, spread over the listeners.
HALF_OPEN = 10_000
#: Descriptors the test process needs: the peers, plus its own (grpcio, pytest, logs).
FD_HEADROOM = 1_000
#: Parallel openers: enough to keep every accept queue busy without overflowing it.
OPENERS = 8
WAIT = 60.0


@dataclass
class Server:
    mode: str
    proc: subprocess.Popen[bytes]
    log: Any
    agent_port: int
    health_port: int
    admin_port: int
    uds: str = ""
    frontend_port: int = 0
    rss: dict[str, int] = field(default_factory=dict)

    @property
    def fds(self) -> int:
        return count_fds(self.proc.pid)

    def stderr(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return str(self.log.read().decode(errors="replace"))[-4000:]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = HALF_OPEN + FD_HEADROOM
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def wait_listening(server: Server) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"proxy-server exited {server.proc.returncode}: {server.stderr()}")
        try:
            with socket.create_connection((LOOPBACK, server.health_port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail("proxy-server did not answer /healthz")


@pytest.fixture(params=["grpc-uds", "http-connect-mtls"])
def server(
    request: pytest.FixtureRequest, certs: Certs, sock_dir: str, tmp_path: Any
) -> Iterator[Server]:
    raise_nofile()  # the child inherits it
    mode = str(request.param)
    frontend, agent, health, admin = free_ports(4)
    args = [
        f"--cluster-cert={certs.server_cert}",
        f"--cluster-key={certs.server_key}",
        f"--cluster-ca-cert={certs.ca}",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={agent}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-port={admin}",
    ]
    uds = ""
    if mode == "grpc-uds":
        uds = os.path.join(sock_dir, "proxy.sock")
        args += ["--mode=grpc", f"--uds-name={uds}", "--server-port=0"]
    else:
        args += [
            "--mode=http-connect",
            f"--server-bind-address={LOOPBACK}",
            f"--server-port={frontend}",
            f"--server-cert={certs.server_cert}",
            f"--server-key={certs.server_key}",
            f"--server-ca-cert={certs.ca}",
        ]
    # A file, not a pipe: thousands of peers may be logged, and a full pipe blocks the server.
    log = (tmp_path / "server.log").open("w+b")
    proc = subprocess.Popen(command(*args), stdout=log, stderr=log)
    srv = Server(mode, proc, log, agent, health, admin, uds, frontend if mode != "grpc-uds" else 0)
    try:
        wait_listening(srv)
        yield srv
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT)
        log.close()
        print(f"\n[{mode}] server RSS KiB: {srv.rss}")


def client_hello() -> bytes:
    """The first flight of a TLS client offering h2: sent, and then nothing more."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:8]
    return hello


Spec = tuple[str | tuple[str, int], bytes]


def peer_specs(server: Server) -> list[Spec]:
    """``HALF_OPEN`` (target, first bytes) pairs, round-robin over the listeners and the
    kinds of idleness each can have."""
    hello = client_hello()
    tls_port = server.frontend_port
    kinds: list[Spec] = [
        ((LOOPBACK, server.agent_port), b""),
        ((LOOPBACK, server.agent_port), hello),
        ((LOOPBACK, server.health_port), b""),
        ((LOOPBACK, server.admin_port), b"GET /metr"),
    ]
    if server.uds:
        kinds += [(server.uds, b""), (server.uds, b"PRI * HTTP/2.0\r\n")]
    else:
        kinds += [((LOOPBACK, tls_port), b""), ((LOOPBACK, tls_port), hello)]
    return [kinds[i % len(kinds)] for i in range(HALF_OPEN)]


def open_peers(specs: list[Spec]) -> list[socket.socket]:
    """Connect each spec and send its first bytes (blocking; run in threads)."""
    socks: list[socket.socket] = []
    try:
        for target, first in specs:
            if isinstance(target, str):
                s = socket.socket(socket.AF_UNIX)
            else:
                s = socket.socket(socket.AF_INET)
            socks.append(s)
            # Blocking: a Unix socket's connect then waits for room in the accept queue
            # (with a timeout it would fail with EAGAIN when the queue is full).
            s.settimeout(None if isinstance(target, str) else WAIT)
            s.connect(target)
            if first:
                s.sendall(first)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


async def wait_fds(server: Server, want: int, *, at_least: bool = False) -> int:
    """Poll the server's fd count until it is ``want`` (or more, with ``at_least``);
    returns the last count."""
    now = server.fds
    for _ in range(int(WAIT / 0.05)):
        now = server.fds
        if now == want or (at_least and now >= want):
            return now
        if server.proc.poll() is not None:
            pytest.fail(f"proxy-server died: {server.stderr()}")
        await asyncio.sleep(0.05)
    return now


@dataclass
class Healthy:
    agent: GrpcioAgent
    pinger: Pinger
    new_dial: Any
    close: Any


async def healthy_tunnel(server: Server, certs: Certs) -> Healthy:
    """A grpcio agent and one tunnel through the server's frontend, echoing in a loop."""
    agent = GrpcioAgent(f"{LOOPBACK}:{server.agent_port}", certs)
    await agent.start()
    if server.uds:
        channel = grpc.aio.insecure_channel(f"unix:{server.uds}")
        randoms = iter(range(1, 1 << 30))
        call, cid = await grpcio_dial(channel, next(randoms))

        async def new_dial() -> None:
            call2, cid2 = await grpcio_dial(channel, next(randoms))
            await grpcio_echo(call2, cid2, b"new dial after the abuse")
            await call2.done_writing()
            assert await asyncio.wait_for(call2.code(), PEER_TIMEOUT) == grpc.StatusCode.OK

        async def close() -> None:
            call.cancel()
            await channel.close()

        pinger = Pinger("grpc", lambda data: grpcio_echo(call, cid, data))
    else:
        ctx = client_tls(certs, alpn=["http/1.1"])

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection(
                LOOPBACK, server.frontend_port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(f"CONNECT {ADDRESS} HTTP/1.1\r\nHost: {ADDRESS}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PEER_TIMEOUT)
            assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n", head
            return reader, writer

        reader, writer = await connect()

        async def new_dial() -> None:
            r2, w2 = await connect()
            await http_echo(r2, w2, b"new dial after the abuse")
            w2.close()

        async def close() -> None:
            writer.close()

        pinger = Pinger("http-connect", lambda data: http_echo(reader, writer, data))
    pinger.start()
    await pinger.flowing()
    return Healthy(agent, pinger, new_dial, close)


def test_half_open_connections(server: Server, certs: Certs) -> None:
    async def main() -> None:
        healthy = await healthy_tunnel(server, certs)
        try:
            await asyncio.sleep(0.5)  # let the process settle after the set-up
            baseline = server.fds
            server.rss["before"] = rss_kib(server.proc.pid)
            specs = peer_specs(server)
            parts = [specs[i::OPENERS] for i in range(OPENERS)]
            results = await asyncio.gather(
                *(asyncio.to_thread(open_peers, part) for part in parts), return_exceptions=True
            )
            socks = [s for r in results if isinstance(r, list) for s in r]
            errors = [r for r in results if isinstance(r, BaseException)]
            try:
                assert not errors, f"opening peers failed: {errors[:3]}"
                held = await wait_fds(server, baseline + HALF_OPEN, at_least=True)
                server.rss["during"] = rss_kib(server.proc.pid)
                print(
                    f"\n[{server.mode}] server fds: baseline {baseline}, "
                    f"with {HALF_OPEN} half-open peers {held}"
                )
                # The healthy tunnel flows while every peer is held.
                await healthy.pinger.flowing()
            finally:
                await asyncio.to_thread(close_all, socks)
            after = await wait_fds(server, baseline)
            server.rss["after"] = rss_kib(server.proc.pid)
            assert after == baseline, f"server fds {after} after the peers left, {baseline} before"
            await healthy.pinger.flowing()
            await healthy.new_dial()
            healthy.pinger.check()
        finally:
            await healthy.pinger.stop()
            await healthy.close()
            await healthy.agent.close()

    asyncio.run(asyncio.wait_for(main(), 200))
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=WAIT) == 0, server.stderr()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-s"]))
