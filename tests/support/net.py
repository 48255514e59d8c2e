"""Fixtures shared by the tests that open sockets (transport/, server/): an event loop of
each kind, certificates made here, and a short directory for Unix sockets.

The conftest.py of each such folder re-exports them."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}

RunFn = Callable[[Coroutine[Any, Any, Any]], Any]


#: Seconds a test's coroutine may run (``@pytest.mark.run_timeout(s)`` gives a test more).
RUN_TIMEOUT = 60.0


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[RunFn]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    marker = request.node.get_closest_marker("run_timeout")
    bound = float(marker.args[0]) if marker is not None else RUN_TIMEOUT
    with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
        yield lambda coro: runner.run(asyncio.wait_for(coro, bound))


@dataclass
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    client_cert_pem: bytes
    client_key_pem: bytes


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d: Path = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.example")
    paths = {}
    for name, blob in {
        "ca.pem": ca.cert_pem.bytes(),
        "server.pem": server.cert_chain_pems[0].bytes(),
        "server.key": server.private_key_pem.bytes(),
        "client.pem": client.cert_chain_pems[0].bytes(),
        "client.key": client.private_key_pem.bytes(),
    }.items():
        (d / name).write_bytes(blob)
        paths[name] = str(d / name)
    return Certs(
        paths["ca.pem"],
        paths["server.pem"],
        paths["server.key"],
        paths["client.pem"],
        paths["client.key"],
        ca.cert_pem.bytes(),
        server.cert_chain_pems[0].bytes(),
        server.private_key_pem.bytes(),
        client.cert_chain_pems[0].bytes(),
        client.private_key_pem.bytes(),
    )


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # Unix socket paths must be short (108 bytes); pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="kf-") as d:
        yield d


# Both programs' validation limits ports to 1024-49151; below the usual ephemeral range, a
# port picked here is also not taken by an outgoing connection meanwhile.
PORT_RANGE = (20000, 32000)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now (a race with other processes is
    possible but unlikely in the range used)."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        ports.append(port)
    return ports


def agent_loopback_args() -> list[str]:
    """A proxy-agent's port flags, all on loopback: a proxy-server port that nothing
    listens on, and free health and admin ports."""
    health, admin, server = free_ports(3)
    return [
        "--proxy-server-host=127.0.0.1",
        f"--proxy-server-port={server}",
        "--health-server-host=127.0.0.1",
        f"--health-server-port={health}",
        "--admin-bind-address=127.0.0.1",
        f"--admin-server-port={admin}",
    ]


async def http_get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One HTTP/1.1 GET on a fresh connection, read to its end: (status, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body
