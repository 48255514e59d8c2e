"""The proxy-agent's tunnel listing on its admin port (``agent/tunnel_list.py``), with our
proxy-server and our agent in process: each row's server, destination and payload bytes
both ways (and the server's row for the same tunnel), a backend that stops reading
(buffered, holding its server stream), a frontend that stops reading (the agent's backend
read paused while the server rations its stream), and the admin port's other path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from konnectivity_fast.agent.clientset import ClientSet
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.agent.health import admin_routes
from konnectivity_fast.agent.tunnel_list import tunnels_handler
from konnectivity_fast.server.buffering import BufferBudget
from konnectivity_fast.server.http_connect import RESPONSE_200, start_http_connect_uds
from konnectivity_fast.server.tunnel_list import server_listing
from konnectivity_fast.transport.http import start_http
from konnectivity_fast.tunnel.listing import TunnelQuery
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH
from tests.support.net import http_get

from .conftest import Certs, RunFn
from .support import LOOPBACK, Tunnel, agent, proxy_server, server_has_agent, until

UP = 1000
DOWN = 5000
AGENT_ID = "agent-1"  # support.agent_config's
HEALTH_PORT = 8093  # only named in /metrics' redirect here


@contextlib.asynccontextmanager
async def admin(clients: ClientSet) -> AsyncIterator[int]:
    """The agent's admin server, as ``agent/app.py`` starts it."""
    routes = admin_routes(HEALTH_PORT, tunnels_handler(AGENT_ID, clients))
    server = await start_http("admin", LOOPBACK, 0, routes)
    assert server is not None
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def listing(port: int, query: str = "") -> dict[str, Any]:
    status, body = await http_get(port, ADMIN_TUNNELS_PATH + (f"?{query}" if query else ""))
    assert status == 200, body
    document: dict[str, Any] = json.loads(body)
    return document


@contextlib.asynccontextmanager
async def backend(serve: Any) -> AsyncIterator[str]:
    """A TCP server on loopback running ``serve`` per connection; its connections are
    closed with it."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        try:
            await serve(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    try:
        yield f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()


async def read_then_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
        await reader.readexactly(UP)
        writer.write(b"d" * DOWN)
        await writer.drain()
        await reader.read(1)


def test_rows_count_payload_bytes_both_ways(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with (
            backend(read_then_answer) as address,
            proxy_server(sock_dir, certs) as server,
            agent(certs, server.agent_port) as clients,
            admin(clients) as port,
        ):
            await until(lambda: server_has_agent(server))
            empty = await listing(port)
            assert (empty["program"], empty["agent_id"]) == ("proxy-agent", AGENT_ID)
            assert empty["tunnels"] == [] and empty["totals"]["servers"] == 1
            tunnels = [await Tunnel.open(server.uds) for _ in range(2)]
            for rnd, tunnel in enumerate(tunnels, 1):
                await tunnel.dial(address, rnd=rnd)
                tunnel.write(b"u" * UP)
                assert await tunnel.read_exactly(DOWN) == b"d" * DOWN
            document = await listing(port)
            rows = document["tunnels"]
            assert sorted(r["connection_id"] for r in rows) == sorted(t.connect_id for t in tunnels)
            for row in rows:
                assert (row["server_id"], row["destination"]) == ("s1", address)
                assert (row["bytes_up"], row["bytes_down"]) == (UP, DOWN)
                assert (row["buffered"], row["paused"], row["holding"]) == (0, False, False)
                assert row["window"] is None and row["age_seconds"] >= 0
                assert "frontend" not in row
            (entry,) = document["servers"]
            assert entry == {
                "server_id": "s1",
                "tunnels": 2,
                "pending_dials": 0,
                "bytes_up": 2 * UP,
                "bytes_down": 2 * DOWN,
                "draining": False,
                "paused": False,
            }
            assert document["totals"]["tunnels"] == 2
            assert (await listing(port, "server=elsewhere"))["tunnels"] == []
            assert len((await listing(port, "server=s1"))["tunnels"]) == 2
            status, _ = await http_get(port, f"{ADMIN_TUNNELS_PATH}?agent=a")
            assert status == 400  # the server's filter, not the agent's
            # The server's listing shows the same tunnels from its side.
            seen = server_listing(server.proxy, TunnelQuery(), 0.0)
            assert {
                (r["agent_id"], r["connection_id"], r["destination"]) for r in seen["tunnels"]
            } == {(AGENT_ID, r["connection_id"], address) for r in rows}
            for tunnel in tunnels:
                await tunnel.aclose()

    run(main())


def test_a_backend_that_stops_reading_is_buffered_and_holds(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """The backend reads nothing while the frontend sends: what waits for it shows as
    buffered, and past its budget it holds (pauses) its server stream. Once it reads,
    both go and every byte was counted once. (More than the kernel's socket buffers
    take.)"""
    size = 24 << 20
    go = asyncio.Event()
    got = [0]

    async def late_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        while got[0] < size and (block := await reader.read(1 << 20)):
            got[0] += len(block)
        await reader.read(1)  # stay open until the tunnel closes

    async def main() -> None:
        pool = EndpointPool(endpoint_budget=256 << 10)
        async with (
            backend(late_reader) as address,
            proxy_server(sock_dir, certs) as server,
            agent(certs, server.agent_port, pool=pool) as clients,
            admin(clients) as port,
        ):
            await until(lambda: server_has_agent(server))
            tunnel = await Tunnel.open(server.uds)
            await tunnel.dial(address)
            for offset in range(0, size, 64 << 10):
                tunnel.write(b"u" * min(64 << 10, size - offset))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not (rows := (await listing(port))["tunnels"]) or not rows[0]["holding"]:
                assert loop.time() < deadline, "the backend never held its stream"
                await asyncio.sleep(0.02)
            document = await listing(port)
            (row,) = document["tunnels"]
            assert row["buffered"] > 256 << 10
            assert document["servers"][0]["paused"] is True
            go.set()
            await until(lambda: got[0] == size, what="the backend read everything")
            await until(lambda: not pool.total, what="nothing queued")
            document = await listing(port)
            (row,) = document["tunnels"]
            assert (row["holding"], row["buffered"], row["bytes_up"]) == (False, 0, size)
            assert document["servers"][0]["paused"] is False
            await tunnel.aclose()

    run(main())


def test_a_frontend_that_stops_reading_pauses_the_backend_read(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """An HTTP-CONNECT client stops reading a download: the server holds the agent's
    stream (its row: buffered, holding) and rations it, and the agent stops reading that
    backend (its row: paused). Once the client reads, the download completes and the
    agent counted every byte."""
    size = 16 << 20

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"s" * size)
            await writer.drain()
            await reader.read(1)

    async def main() -> None:
        budget = BufferBudget(tunnel_budget=2 << 20, stall_timeout=60.0)
        http_uds = os.path.join(sock_dir, "connect.sock")
        async with (
            backend(source) as address,
            proxy_server(sock_dir, certs, budget=budget) as server,
            agent(certs, server.agent_port) as clients,
            admin(clients) as port,
        ):
            http = await start_http_connect_uds(server.proxy, http_uds)
            await until(lambda: server_has_agent(server))
            reader, writer = await asyncio.open_unix_connection(http_uds)
            writer.write(f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            assert await reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            # The agent may pause its read before the server holds (its window is short
            # already): wait for both.
            while True:
                rows = (await listing(port))["tunnels"]
                seen_rows = server_listing(server.proxy, TunnelQuery(), loop.time())["tunnels"]
                if rows and rows[0]["paused"] and seen_rows and seen_rows[0]["holding"]:
                    break
                assert loop.time() < deadline, f"the agent never paused: {rows} {seen_rows}"
                await asyncio.sleep(0.02)
            (seen,) = seen_rows
            assert seen["buffered"] > 0
            assert seen["frontend"] == "http-connect"
            await reader.readexactly(size)
            await until(lambda: clients.clients["s1"].endpoints, what="the tunnel")
            (row,) = (await listing(port))["tunnels"]
            assert (row["paused"], row["bytes_down"]) == (False, size)
            writer.close()
            http.close()
            await http.wait_closed()

    run(main())


def test_metrics_still_redirect_on_the_admin_port(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with (
            proxy_server(sock_dir, certs) as server,
            agent(certs, server.agent_port) as clients,
            admin(clients) as port,
        ):
            status, _ = await http_get(port, "/metrics")
            assert status == 301

    run(main())
