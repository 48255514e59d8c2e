"""The proxy-server's tunnel listing on its admin port (``server/tunnel_list.py``), against
an in-process server with independent grpcio agents and frontends: what each row says
(IDs, destination, frontend kind, bytes both ways, buffered, paused, holding, age), the
per-agent counts, the filter and its bounds, and that only the admin port serves it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from konnectivity_fast.server.buffering import TUNNEL_WRITE_HIGH_WATER, BufferBudget
from konnectivity_fast.server.health import admin_routes, start_http
from konnectivity_fast.server.tunnel_list import tunnels_handler
from konnectivity_fast.tunnel.listing import MAX_LIMIT
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH
from tests.support.agent_peer import ProxyStream, backend, bulk, data
from tests.support.net import http_get

from .conftest import Certs, ProxyEnv, RunFn, proxy_env

UP = 1000  # bytes the client sends
DOWN = 5000  # bytes the backend answers with: unequal, so swapped directions show
STALL_BLOB = 8 << 20  # what the backend sends a client that stops reading


@contextlib.asynccontextmanager
async def admin(env: ProxyEnv) -> AsyncIterator[int]:
    """The admin server of ``env``'s proxy, as ``server/app.py`` starts it."""
    server = await start_http("admin", "127.0.0.1", 0, admin_routes(tunnels_handler(env.proxy)))
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


def read_then_answer(up: int, down: int) -> Any:
    """A backend that reads ``up`` bytes, then answers ``down`` bytes and stays open."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(up)
        writer.write(b"d" * down)
        await writer.drain()
        await reader.read(1)

    return serve


def message_size(packet: Any) -> int:
    return len(packet.SerializeToString())


async def exchange(env: ProxyEnv, address: str, random: int) -> tuple[int, int]:
    """Open a tunnel, send ``UP`` bytes, read the ``DOWN`` answer: the bytes the server
    relayed each way (for gRPC, the DATA messages' size, by the protobuf runtime)."""
    if env.mode == "grpc":
        stream = env.dialer().stream()
        connect_id = await stream.connect(address, random)
        packet = data(connect_id, b"u" * UP)
        await stream.send(packet)
        assert await stream.read_data(connect_id, DOWN) == b"d" * DOWN
        return message_size(packet), sum(message_size(p) for p in stream.received[1:])
    tunnel = await env.http_connect(address)
    await tunnel.reader.readuntil(b"\r\n\r\n")
    tunnel.writer.write(b"u" * UP)
    assert await tunnel.reader.readexactly(DOWN) == b"d" * DOWN
    return UP, DOWN


def check_rows(document: dict[str, Any], mode: str, address: str) -> None:
    for row in document["tunnels"]:
        assert row["destination"] == address
        assert row["frontend"] == mode
        assert row["agent_id"] in ("a", "b")
        assert row["buffered"] == 0 and row["window"] is None
        assert row["paused"] is False and row["holding"] is False
        assert row["age_seconds"] >= 0
    for entry in document["agents"]:
        mine = [r for r in document["tunnels"] if r["agent_id"] == entry["agent_id"]]
        assert entry["tunnels"] == len(mine)
        assert entry["bytes_up"] == sum(r["bytes_up"] for r in mine)
        assert entry["bytes_down"] == sum(r["bytes_down"] for r in mine)
        assert entry["streams"] == 1 and not entry["paused"] and not entry["draining"]


@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
def test_rows_count_bytes_both_ways(arun: RunFn, certs: Certs, sock_dir: str, mode: str) -> None:
    """Two agents, three tunnels: each row names its connection, agent, destination and
    frontend kind; bytes are the HTTP-CONNECT payload exactly, or for gRPC exactly the
    DATA messages relayed (measured with the protobuf runtime)."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode=mode) as env,
            backend(read_then_answer(UP, DOWN)) as target,
            admin(env) as port,
        ):
            await env.agent(agent_id="a")
            before = await listing(port)
            assert before["tunnels"] == [] and before["totals"]["tunnels"] == 0
            assert (before["program"], before["server_id"]) == ("proxy-server", "scenario-server")
            assert before["dial_balance"] == "random"
            await env.agent(agent_id="b")
            sizes = [await exchange(env, target.address, random) for random in (1, 2, 3)]
            document = await listing(port)
            check_rows(document, mode, target.address)
            rows = document["tunnels"]
            assert sorted(r["bytes_up"] for r in rows) == sorted(up for up, _ in sizes)
            assert sorted(r["bytes_down"] for r in rows) == sorted(down for _, down in sizes)
            assert {a["agent_id"] for a in document["agents"]} == {"a", "b"}
            totals = document["totals"]
            assert totals["tunnels"] == totals["matched"] == totals["listed"] == 3
            assert (totals["agents"], totals["pending_dials"]) == (2, 0)
            assert totals["bytes_up"] == sum(up for up, _ in sizes)
            assert totals["bytes_down"] == sum(down for _, down in sizes)
            # The filter keeps one agent's tunnels; the totals still cover the process.
            only_a = await listing(port, "agent=a")
            assert only_a["agent"] == "a"
            assert {r["agent_id"] for r in only_a["tunnels"]} <= {"a"}
            assert [a["agent_id"] for a in only_a["agents"]] == ["a"]
            assert only_a["totals"]["matched"] == only_a["agents"][0]["tunnels"]
            assert only_a["totals"]["tunnels"] == 3

    arun(main())


def test_sort_and_limit(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """``sort=bytes`` puts the busiest tunnel first, ``sort=age`` the oldest; ``limit``
    cuts the rows, not the totals; an oversized limit is clamped; a bad one is refused."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir) as env,
            backend(read_then_answer(UP, DOWN)) as target,
            admin(env) as port,
        ):
            await env.agent()
            streams: list[tuple[ProxyStream, int]] = []
            for random in (1, 2, 3):
                stream = env.dialer().stream()
                streams.append((stream, await stream.connect(target.address, random)))
            # Only the youngest tunnel moves bytes.
            stream, connect_id = streams[-1]
            await stream.send(data(connect_id, b"u" * UP))
            await stream.read_data(connect_id, DOWN)
            by_bytes = await listing(port, "sort=bytes&limit=1")
            assert [r["connection_id"] for r in by_bytes["tunnels"]] == [connect_id]
            assert by_bytes["totals"]["tunnels"] == 3 and by_bytes["totals"]["listed"] == 1
            by_age = await listing(port, "sort=age")
            ages = [r["age_seconds"] for r in by_age["tunnels"]]
            assert ages == sorted(ages, reverse=True)
            assert by_age["tunnels"][-1]["connection_id"] == connect_id
            clamped = await listing(port, "limit=1000000000000000000000")
            assert clamped["limit"] == MAX_LIMIT and clamped["totals"]["listed"] == 3
            assert (await listing(port, "limit=0"))["tunnels"] == []
            for bad in ("sort=size", "limit=-1", "limit=ten", "server=s1", "sort=age&sort=bytes"):
                status, body = await http_get(port, f"{ADMIN_TUNNELS_PATH}?{bad}")
                assert status == 400, (bad, body)
                assert body.endswith(b"\n") and len(body) < 200

    arun(main())


def test_a_stalled_reader_shows_buffered_and_holding(
    arun: RunFn, certs: Certs, sock_dir: str
) -> None:
    """An HTTP-CONNECT client that stops reading while its backend sends: its row shows
    what waits for it beyond the high-water mark and that it holds its agent's stream
    (a small budget, so the hold comes early); once it reads, both go and every byte is
    counted."""
    budget = BufferBudget(tunnel_budget=2 << 20, stall_timeout=60.0)

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", budget=budget) as env,
            backend(bulk(b"s" * STALL_BLOB, 0)) as target,
            admin(env) as port,
        ):
            await env.agent(agent_id="a")
            tunnel = await env.http_connect(target.address)
            await tunnel.reader.readuntil(b"\r\n\r\n")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:
                document = await listing(port)
                rows = document["tunnels"]
                if rows and rows[0]["holding"]:
                    break
                assert loop.time() < deadline, f"never held: {document}"
                await asyncio.sleep(0.05)
            (row,) = rows
            assert row["buffered"] >= TUNNEL_WRITE_HIGH_WATER
            assert row["bytes_down"] >= row["buffered"]
            assert document["agents"][0]["paused"] is True
            assert document["totals"]["buffer_charged"] > 0
            await tunnel.reader.readexactly(STALL_BLOB + 32)  # the blob, then its digest
            after = await listing(port)
            (row,) = after["tunnels"]
            assert (row["holding"], row["buffered"]) == (False, 0)
            assert row["bytes_down"] == STALL_BLOB + 32
            assert after["agents"][0]["paused"] is False

    arun(main())


def test_a_stalled_agent_pauses_the_clients_source(
    arun: RunFn, certs: Certs, sock_dir: str
) -> None:
    """The agent stops reading its stream while a client uploads: the client's socket is
    no longer read (``paused``); when the agent reads again it resumes and every byte
    reaches the backend, counted once."""
    chunk = b"u" * (256 << 10)
    received = [0]

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while block := await reader.read(1 << 20):
            received[0] += len(block)

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect") as env,
            backend(sink) as target,
            admin(env) as port,
        ):
            agent = await env.agent(agent_id="a")
            tunnel = await env.http_connect(target.address)
            await tunnel.reader.readuntil(b"\r\n\r\n")
            agent.stall()
            sent = [0]

            async def push() -> None:
                while True:
                    tunnel.writer.write(chunk)
                    sent[0] += len(chunk)
                    await tunnel.writer.drain()

            pusher = asyncio.get_running_loop().create_task(push())
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not (rows := (await listing(port))["tunnels"]) or not rows[0]["paused"]:
                    assert loop.time() < deadline, "the client's source was never paused"
                    await asyncio.sleep(0.05)
            finally:
                pusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pusher
            agent.resume()
            while received[0] < sent[0]:
                assert loop.time() < deadline + 30, f"{received[0]} of {sent[0]} arrived"
                await asyncio.sleep(0.02)
            (row,) = (await listing(port))["tunnels"]
            assert row["paused"] is False
            assert row["bytes_up"] == sent[0] == received[0]

    arun(main())


def test_only_the_admin_port_serves_the_listing(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """The health port (and so the agent and frontend ports, which speak gRPC or
    HTTP-CONNECT only) answers 404; the admin port's /metrics is unchanged."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, admin(env) as port:
            assert await env.get(ADMIN_TUNNELS_PATH) == (404, b"404 page not found\n")
            status, body = await http_get(port, "/metrics")
            assert status == 200 and b"konnectivity_network_proxy_server_" in body
            assert b"konnectivity_fast_" not in body
            status, _ = await http_get(port, ADMIN_TUNNELS_PATH)
            assert status == 200

    arun(main())
