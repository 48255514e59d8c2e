"""Volume scenarios: 64 MiB in each direction at once through one tunnel, byte-exact (gRPC and
HTTP-CONNECT mode), and 1000 concurrent tunnels through one agent to a real echo backend,
each round-tripping a few KiB. Peers are grpcio (tests/support/agent_peer.py); the backends
are real TCP servers on 127.0.0.1. No timing is asserted: the run fixture bounds each test.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import resource
from collections.abc import Iterator

import grpc
import pytest

from tests.support.agent_peer import backend, bulk, close_req, data, echo

from .conftest import Certs, RunFn, check_metrics, proxy_env

BULK_SIZE = 64 << 20
# Frontend write sizes: a gRPC DATA message each (under the 4 MiB message limit), or one
# socket write for HTTP-CONNECT.
CHUNK = 256 << 10
DIGEST = 32
TUNNELS = 1000
TUNNEL_BYTES = 4 << 10
# Each tunnel holds about four fds in this process (client or stream, agent socket,
# backend socket, server side): 1000 tunnels need more than the usual soft limit of 1024.
FDS_NEEDED = 8 * TUNNELS


@pytest.fixture(scope="module")
def blobs() -> tuple[bytes, bytes]:
    """Deterministic pseudo-random payloads: client -> backend, backend -> client."""
    return random.Random(1).randbytes(BULK_SIZE), random.Random(2).randbytes(BULK_SIZE)


@pytest.fixture
def enough_fds() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FDS_NEEDED if hard == resource.RLIM_INFINITY else min(hard, FDS_NEEDED)
    if want < FDS_NEEDED:
        pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the {FDS_NEEDED} fds needed")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["uds", "tcp"])
def test_grpc_64mib_each_way(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str, blobs: tuple[bytes, bytes]
) -> None:
    up, down = blobs

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, transport=transport) as env,
            backend(bulk(down, expect=len(up))) as bulk_backend,
        ):
            await env.agent()
            stream = env.dialer().stream()
            connect_id = await stream.connect(bulk_backend.address, 64)

            async def send() -> None:
                view = memoryview(up)
                for i in range(0, len(up), CHUNK):
                    await stream.send(data(connect_id, bytes(view[i : i + CHUNK])))

            sender = asyncio.get_running_loop().create_task(send())
            received = hashlib.sha256()
            got = 0
            tail = b""
            while got < len(down) + DIGEST:
                packet = await stream.expect("DATA")
                assert packet.data.connectID == connect_id
                chunk = packet.data.data
                body = chunk[: max(0, len(down) - got)]
                received.update(body)
                tail += chunk[len(body) :]
                got += len(chunk)
            await sender
            assert got == len(down) + DIGEST
            assert received.digest() == hashlib.sha256(down).digest()
            assert tail == hashlib.sha256(up).digest()  # what the backend read, hashed
            await stream.send(close_req(connect_id))
            await stream.expect("CLOSE_RSP")
            assert await stream.end() == grpc.StatusCode.OK
            check_metrics({"established_connections": 0, "dial_duration_seconds_count": 1})

    arun(main())


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transport", ["uds", "tcp"])
def test_http_connect_64mib_each_way(
    arun: RunFn, certs: Certs, sock_dir: str, transport: str, blobs: tuple[bytes, bytes]
) -> None:
    up, down = blobs

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", transport=transport) as env,
            backend(bulk(down, expect=len(up))) as bulk_backend,
        ):
            await env.agent()
            tunnel = await env.http_connect(bulk_backend.address)
            head = await tunnel.reader.readuntil(b"\r\n\r\n")
            assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"

            async def send() -> None:
                view = memoryview(up)
                for i in range(0, len(up), CHUNK):
                    tunnel.writer.write(view[i : i + CHUNK])
                    await tunnel.writer.drain()

            sender = asyncio.get_running_loop().create_task(send())
            received = hashlib.sha256()
            left = len(down)
            while left:
                chunk = await tunnel.reader.read(min(left, 1 << 20))
                assert chunk, "tunnel closed early"
                received.update(chunk)
                left -= len(chunk)
            tail = await tunnel.reader.readexactly(DIGEST)
            await sender
            assert received.digest() == hashlib.sha256(down).digest()
            assert tail == hashlib.sha256(up).digest()
            await tunnel.close()
            check_metrics({"dial_duration_seconds_count": 1})

    arun(main())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_grpc_1000_concurrent_tunnels(
    arun: RunFn, certs: Certs, sock_dir: str, enough_fds: None
) -> None:
    """1000 Proxy streams on one connection, all open at once through one agent."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            await env.agent()
            dialer = env.dialer()
            all_open = asyncio.Event()
            opened = 0

            async def one(i: int) -> None:
                nonlocal opened
                stream = dialer.stream()
                connect_id = await stream.connect(echo_backend.address, 10_000 + i)
                opened += 1
                if opened == TUNNELS:
                    all_open.set()
                await all_open.wait()  # every tunnel is established at the same time
                payload = random.Random(i).randbytes(TUNNEL_BYTES)
                await stream.send(data(connect_id, payload))
                assert await stream.read_data(connect_id, len(payload)) == payload
                await stream.send(close_req(connect_id))
                await stream.expect("CLOSE_RSP")
                assert await stream.end() == grpc.StatusCode.OK

            await asyncio.gather(*(one(i) for i in range(TUNNELS)))
            assert echo_backend.accepted == TUNNELS
            check_metrics(
                {
                    "established_connections": 0,
                    "pending_backend_dials": 0,
                    "dial_duration_seconds_count": TUNNELS,
                    "connection_duration_seconds_count": None,  # not in v0.36.0
                    'grpc_connections{service_method="Proxy"}': 0,
                }
            )

    arun(main())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_http_connect_1000_concurrent_tunnels(
    arun: RunFn, certs: Certs, sock_dir: str, enough_fds: None
) -> None:
    """1000 HTTP-CONNECT tunnels open at once through one agent."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect") as env,
            backend(echo) as echo_backend,
        ):
            await env.agent()
            all_open = asyncio.Event()
            opened = 0

            async def one(i: int) -> None:
                nonlocal opened
                tunnel = await env.http_connect(echo_backend.address)
                head = await tunnel.reader.readuntil(b"\r\n\r\n")
                assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n"
                opened += 1
                if opened == TUNNELS:
                    all_open.set()
                await all_open.wait()
                payload = random.Random(i).randbytes(TUNNEL_BYTES)
                tunnel.writer.write(payload)
                assert await tunnel.reader.readexactly(len(payload)) == payload
                await tunnel.close()

            await asyncio.gather(*(one(i) for i in range(TUNNELS)))
            await asyncio.sleep(0)
            assert echo_backend.accepted == TUNNELS
            check_metrics({"dial_duration_seconds_count": TUNNELS})

    arun(main())
