"""Every listener stops reading a peer that does not read (or closes it), whatever it
floods with, and the other tunnels keep flowing (docs/architecture.md, "Bad input").

Each test starts the in-process ``abused_server`` (all listeners, an echoing agent, two
healthy tunnels), floods listeners with peers that never read their answers, and checks
that each flooding peer found its writes blocked or its connection closed, never a server
that kept reading; then that the healthy tunnels kept flowing and nothing leaked once the
peers left (``checked``).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest

from tests.support.flood import Flood, flood_stream
from tests.support.h2frames import PREFACE, ping, settings_frame

from .abuse import LOOPBACK, AbusedServer, abused_server, bounded, client_tls, close_writer
from .conftest import Certs, RunFn
from .test_bad_input import checked

pytestmark = pytest.mark.timeout(120)

#: Frames per write of a flooding HTTP/2 peer: each read of the server holds fewer than
#: the engine's MAX_OUTBOUND_ACK, so only the listener's own backpressure can stop it.
FRAMES_PER_WRITE = 20
#: A request a client may pipeline any number of: each gets a 405 it never reads.
PIPELINED_GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def flood_one(
    target: str | tuple[str, int], first: bytes, chunk: bytes, tls: ssl.SSLContext | None
) -> Flood:
    if isinstance(target, str):
        _, writer = await asyncio.open_unix_connection(target, ssl=tls)
    else:
        host, port = target
        _, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname="localhost" if tls else None
        )
    try:
        writer.write(first)
        return await flood_stream(writer, chunk)
    finally:
        writer.transport.abort()
        await close_writer(writer)


def grpc_listeners(env: AbusedServer, certs: Certs) -> dict[str, tuple[Any, Any]]:
    h2 = client_tls(certs, alpn=["h2"])
    return {
        "grpc-frontend-uds": (env.grpc_uds, None),
        "grpc-frontend-mtls": ((LOOPBACK, env.grpc_tls), h2),
        "agent-mtls": ((LOOPBACK, env.agent_mtls), h2),
        "agent-tls": ((LOOPBACK, env.agent_tls), client_tls(certs, alpn=["h2"], client_cert=False)),
    }


@pytest.mark.parametrize("unit", [settings_frame(), ping()], ids=["settings", "ping"])
def test_http2_floods_on_every_grpc_listener(
    run: RunFn, sock_dir: str, certs: Certs, unit: bytes
) -> None:
    async def abuse(env: AbusedServer) -> None:
        listeners = grpc_listeners(env, certs)
        results = await asyncio.gather(
            *(
                flood_one(target, PREFACE + settings_frame(), unit * FRAMES_PER_WRITE, tls)
                for target, tls in listeners.values()
            )
        )
        for name, result in zip(listeners, results, strict=True):
            assert result.outcome in ("stopped reading", "closed"), (name, result)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_pipelined_requests_without_reading_on_http_connect(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """Requests the HTTP-CONNECT frontend answers with 405, pipelined by a client that
    reads none of the answers: the server stops reading it once its answers are queued
    (Go's server answers one request at a time), on the Unix socket and on mTLS."""

    async def abuse(env: AbusedServer) -> None:
        listeners = {
            "http-connect-uds": (env.http_uds, None),
            "http-connect-mtls": ((LOOPBACK, env.http_tls), client_tls(certs, alpn=["http/1.1"])),
        }
        results = await asyncio.gather(
            *(flood_one(target, b"", PIPELINED_GET * 50, tls) for target, tls in listeners.values())
        )
        for name, result in zip(listeners, results, strict=True):
            assert result.outcome == "stopped reading", (name, result)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))
