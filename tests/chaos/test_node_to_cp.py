"""Chaos on node-to-control-plane tunneling (docs/node-to-control-plane.md), our
proxy-servers and proxy-agent as processes on 127.0.0.1, the agent listening on a local
port (``--apiserver-port-mapping``) that the servers' ``--allowed-destination`` allows.

1. kill -9 of one of two servers holding the agent's reverse connections: exactly the
   connections it carried are reset (or see EOF) within the agent's keepalive bound, the
   other server's connections keep echoing, and new local connections go through the
   surviving server within 1 s of the kill.
2. 50 forward downloads (frontend -> agent -> backend) and 50 reverse ones (local client ->
   agent -> server -> destination) at once, every one byte-exact (SHA-256); both programs
   alive, their logs clean and their descriptors back afterwards.
3. A reverse client that stops reading while its destination sends a big blob: its
   credit (every reverse connection has one, docs/flow-control.md) holds the destination
   back at its window plus socket buffers, never the agent's stream, so forward
   transfers beside it on the same stream complete byte-exact while it stalls
   (functional only; the rate is bench's business); the server and agent hold no more
   than a bound meanwhile; when the client reads again it gets the whole blob intact;
   then descriptors and memory are back.

The measured figures (time from kill -9 to the reset of the dead server's connections and
to the first new connection, transfer times) are printed with ``-s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable

import pytest

from konnectivity_fast.agent.connect import KEEPALIVE_TIMEOUT
from tests.support.agent_peer import backend, echo
from tests.support.net import free_ports

from .checks import alive, clean_log, fds_back, rss_back
from .conftest import LONG, Chaos
from .programs import LOOPBACK, Program, ServerSpec, start_agent, start_server
from .traffic import Source, consume, download, http_tunnel, random_blob, read_to_end

pytestmark = pytest.mark.timeout(900 if LONG else 120)

GATE = "--feature-gates=NodeToMasterTraffic=true"
#: The agent's keepalive (its minimum, client.py MIN_KEEPALIVE_TIME): a server that
#: vanished without a FIN is noticed within this plus KEEPALIVE_TIMEOUT.
KEEPALIVE = 10.0
KEEPALIVE_BOUND = KEEPALIVE + KEEPALIVE_TIMEOUT
#: The issue's bound from kill -9 to the first new connection carried by the survivor.
FAILOVER_BOUND = 1.0
#: Reverse connections held across the kill.
HELD = 8
PAYLOAD = b"node to control plane " * 4
ROUND_TRIP = 5.0  # seconds one echo may take
#: Each transfer of the 50 + 50.
TRANSFERS = 50
TRANSFER_SIZE = (64 if LONG else 1) << 20
#: What the stalled reverse client's destination sends: well past the agent's budgets
#: (4 MiB per endpoint, 32 MiB per process) and the client's socket buffers.
STALLED_SIZE = (256 if LONG else 64) << 20
#: What a stalled reverse connection's destination may get rid of: its credit window (at
#: most tunnel.flow.MAX_WINDOW, 4 MiB) and the sockets' buffers on both sides of the
#: tunnel (a few MiB each on loopback).
STALLED_BOUND = 24 << 20
#: Memory the server and agent may use beyond their baselines while a client stalls.
HELD_BOUND_KIB = 48 << 10
FORWARD_BESIDE = 8
FORWARD_SIZE = (16 if LONG else 2) << 20

CAPABLE = "konnectivity_fast_agent_capable_servers"
SERVER_CONNECTIONS = "konnectivity_fast_server_agent_connections"
SERVER_DIALS = "konnectivity_fast_server_agent_dials_total"
LOCAL_TOTAL = "konnectivity_fast_agent_local_connections_total"

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def mapping(local: int, destination: str) -> str:
    return f"--apiserver-port-mapping={local}:{destination}"


async def echo_through(local: int) -> Conn:
    """A new reverse connection through the agent's ``local`` port, proven by one echo."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, local), ROUND_TRIP)
    try:
        await round_trip((reader, writer))
    except BaseException:
        writer.transport.abort()
        raise
    return reader, writer


async def round_trip(conn: Conn) -> None:
    reader, writer = conn
    writer.write(PAYLOAD)
    got = await asyncio.wait_for(reader.readexactly(len(PAYLOAD)), ROUND_TRIP)
    assert got == PAYLOAD


async def open_counts(servers: list[Program]) -> list[float]:
    counts = [await s.metric(SERVER_CONNECTIONS) for s in servers]
    assert None not in counts, counts
    return [c or 0.0 for c in counts]


async def ended_at(conn: Conn) -> tuple[str, float]:
    """How a held connection ended (``eof`` or ``reset``) and when (perf_counter); waits
    at most the keepalive bound, plus a margin for the reader."""
    reader, _ = conn
    try:
        data = await asyncio.wait_for(reader.read(1), KEEPALIVE_BOUND + 5.0)
    except (ConnectionError, OSError):
        return "reset", time.perf_counter()
    except TimeoutError:
        return "still open", time.perf_counter()
    return ("eof" if not data else f"data {data!r}"), time.perf_counter()


async def first_new_connection(local: int, deadline: float) -> tuple[Conn, int]:
    """New connections through ``local`` until one echoes (before ``deadline``,
    perf_counter); it and the attempts it took."""
    for attempt in range(1, 1000):
        try:
            return await echo_through(local), attempt
        except (OSError, EOFError, TimeoutError):  # not AssertionError: corrupted echo
            assert time.perf_counter() < deadline, f"no new connection in {attempt} attempts"
            await asyncio.sleep(0.01)
    raise AssertionError("no new connection")


async def hashed(opening: Awaitable[Conn], expected: int) -> tuple[str, int, str]:
    """SHA-256, size and end (``eof``, ``reset``, ``stalled``, ``too long``, ``refused``)
    of what one connection gives until it ends; hashed as it comes, not kept (the long
    form's 100 x 64 MiB)."""
    try:
        reader, writer = await opening
    except (ConnectionError, OSError) as exc:
        return "", 0, f"refused: {exc}"
    digest, size = hashlib.sha256(), 0

    def take(chunk: bytes) -> bool:
        nonlocal size
        digest.update(chunk)
        size += len(chunk)
        return size <= expected

    ended = await consume(reader, writer, take)
    return digest.hexdigest(), size, ended


def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.close()


def test_kill9_server_reverse_failover(chaos: Chaos) -> None:
    """Two servers, one agent holding both; 8 reverse connections spread over them (the
    fewest-open choice: 4 and 4). kill -9 of one: its connections end, the other's go on,
    and a new one is carried by the survivor within 1 s."""

    async def main() -> None:
        async with backend(echo) as echo_backend:
            dest = echo_backend.address
            specs = [
                ServerSpec(
                    "ours",
                    chaos.certs,
                    chaos.workdir,
                    extra=(
                        "--server-count=2",
                        f"--allowed-destination={dest}",
                        f"--server-id=s{i}",
                    ),
                )
                for i in (1, 2)
            ]
            servers = [
                chaos.keep(await start_server(s, f"server-{i}")) for i, s in enumerate(specs)
            ]
            (local,) = free_ports(1)
            listed = ",".join(f"{LOOPBACK}:{s.ports.agent}" for s in specs)
            agent = chaos.keep(
                await start_agent(
                    "ours",
                    chaos.certs,
                    chaos.workdir,
                    specs[0].ports.agent,
                    "node",
                    "--proxy-server-host=",
                    f"--proxy-server-list={listed}",
                    f"--keepalive-time={KEEPALIVE:.0f}s",
                    GATE,
                    mapping(local, dest),
                )
            )
            await agent.wait_metric(CAPABLE, 2)
            conns: list[Conn] = []
            carrier: list[int] = []
            before = await open_counts(servers)
            for _ in range(HELD):
                conns.append(await echo_through(local))
                now = await open_counts(servers)
                rose = [i for i in range(2) if now[i] == before[i] + 1]
                assert len(rose) == 1 and sum(now) == sum(before) + 1, (before, now)
                carrier.append(rose[0])
                before = now
            assert before == [HELD / 2, HELD / 2], f"not spread by the fewest-open choice: {before}"
            victim, survivor = servers[0], servers[1]
            doomed = [c for c, s in zip(conns, carrier, strict=True) if s == 0]
            kept = [c for c, s in zip(conns, carrier, strict=True) if s == 1]
            dials_before = await survivor.metric(SERVER_DIALS, 'result="ok"')
            assert dials_before == len(kept)
            loop = asyncio.get_running_loop()
            watchers = [loop.create_task(ended_at(c)) for c in doomed]
            await asyncio.sleep(0.1)  # the watchers are reading
            killed = time.perf_counter()
            victim.kill9()
            new, attempts = await first_new_connection(local, killed + 10.0)
            failover = time.perf_counter() - killed
            endings = await asyncio.gather(*watchers)
            for how, when in endings:
                assert how in ("reset", "eof"), how
                assert when - killed <= KEEPALIVE_BOUND, f"{how} after {when - killed:.1f} s"
            slowest_end = max(when for _, when in endings) - killed
            for conn in kept:
                await round_trip(conn)
            more = [await echo_through(local) for _ in range(HELD // 2)]
            assert failover <= FAILOVER_BOUND, f"first new connection {failover:.3f} s after kill"
            assert await survivor.metric(SERVER_CONNECTIONS) == len(kept) + 1 + len(more)
            assert await survivor.metric(SERVER_DIALS, 'result="ok"') == len(kept) + 1 + len(more)
            ok = f'local_port="{local}",result="ok"'
            assert await agent.metric(LOCAL_TOTAL, ok) == HELD + 1 + len(more)
            await agent.wait_metric(CAPABLE, 1, timeout=5.0)
            close_all([*kept, new, *more, *doomed])
            await survivor.wait_metric(SERVER_CONNECTIONS, 0, timeout=10.0)
        for program in (survivor, agent):
            alive(program)
            clean_log(program)
        chaos.note(
            f"n2cp kill -9: {len(doomed)} connections ended ({', '.join(h for h, _ in endings)}) "
            f"within {1000 * slowest_end:.0f} ms (bound {KEEPALIVE_BOUND:.0f} s); "
            f"first new connection through the survivor {1000 * failover:.0f} ms after the "
            f"kill ({attempts} attempt(s)); {len(kept)} survivors echo"
        )

    chaos.run(main())


async def one_pair(chaos: Chaos, destination: str) -> tuple[ServerSpec, Program, Program, int]:
    """One server (HTTP-CONNECT frontend) allowing ``destination`` and one agent mapping
    a local port to it, once the agent holds a capable stream: (spec, server, agent, the
    local port)."""
    spec = ServerSpec(
        "ours",
        chaos.certs,
        chaos.workdir,
        mode="http-connect",
        extra=(f"--allowed-destination={destination}",),
    )
    server = chaos.keep(await start_server(spec))
    (local,) = free_ports(1)
    agent = chaos.keep(
        await start_agent(
            "ours",
            chaos.certs,
            chaos.workdir,
            spec.ports.agent,
            "node",
            GATE,
            mapping(local, destination),
        )
    )
    await server.wait_for("/readyz")
    await agent.wait_metric(CAPABLE, 1)
    return spec, server, agent, local


def test_forward_and_reverse_transfers_at_once(chaos: Chaos) -> None:
    """50 forward and 50 reverse downloads at once through one server and one agent,
    every one byte-exact."""

    async def main() -> None:
        source = chaos.closing(await Source(random_blob(TRANSFER_SIZE)).start())
        spec, server, agent, local = await one_pair(chaos, source.address)
        baselines = [p.stats().fds for p in (server, agent)]
        started = time.perf_counter()
        forward = [
            hashed(http_tunnel(spec.uds, source.address), TRANSFER_SIZE) for _ in range(TRANSFERS)
        ]
        reverse = [
            hashed(asyncio.open_connection(LOOPBACK, local, limit=1 << 20), TRANSFER_SIZE)
            for _ in range(TRANSFERS)
        ]
        results = await asyncio.gather(*forward, *reverse)
        took = time.perf_counter() - started
        for i, (sha256, size, ended) in enumerate(results):
            kind = "forward" if i < TRANSFERS else "reverse"
            assert (ended, size) == ("eof", TRANSFER_SIZE), (kind, i, ended, size)
            assert sha256 == source.sha256, f"{kind} transfer {i}: bytes differ"
        assert await server.metric(SERVER_DIALS, 'result="ok"') == TRANSFERS
        ok = f'local_port="{local}",result="ok"'
        assert await agent.metric(LOCAL_TOTAL, ok) == TRANSFERS
        await server.wait_metric(SERVER_CONNECTIONS, 0, timeout=10.0)
        for program, fds in zip((server, agent), baselines, strict=True):
            await fds_back(program, fds)
            alive(program)
            clean_log(program)
        total = 2 * TRANSFERS * TRANSFER_SIZE
        chaos.note(
            f"n2cp {TRANSFERS} forward + {TRANSFERS} reverse x {TRANSFER_SIZE >> 20} MiB at once: "
            f"{took:.2f} s, {total / took / (1 << 20):.0f} MiB/s, all SHA-256 ok"
        )

    chaos.run(main())


def test_stalled_reverse_client_beside_forward_transfers(chaos: Chaos) -> None:
    """A reverse client that stops reading while its destination sends a big blob: the
    destination is held back at the connection's credit, forward downloads on the same
    agent stream complete byte-exact meanwhile, and the client, reading again, gets the
    whole blob; descriptors and memory are back afterwards."""

    async def main() -> None:
        blob = random_blob(STALLED_SIZE)
        big = chaos.closing(await Source(blob).start())
        small = chaos.closing(await Source(random_blob(FORWARD_SIZE)).start())
        spec, server, agent, local = await one_pair(chaos, big.address)
        warm = await download(spec.uds, small.address)  # both programs warm, nothing held
        assert warm.sha256 == small.sha256
        baselines = [p.stats() for p in (server, agent)]
        reader, writer = await asyncio.open_connection(LOOPBACK, local)
        try:
            stalled_at = await wait_stalled(big)
            assert stalled_at < STALLED_BOUND, stalled_at
            held = [p.stats().rss_kib for p in (server, agent)]
            started = time.perf_counter()
            got = await asyncio.gather(
                *(download(spec.uds, small.address) for _ in range(FORWARD_BESIDE))
            )
            took = time.perf_counter() - started
            for transfer in got:
                assert (transfer.ended, transfer.sha256) == ("eof", small.sha256), transfer.ended
            assert big.sent == stalled_at  # still held back: the forward ones went past it
            whole = await read_to_end(reader, writer)
        finally:
            writer.transport.abort()
        assert (whole.ended, whole.sha256) == ("eof", big.sha256), whole.ended
        for stats, rss in zip(baselines, held, strict=True):
            assert rss - stats.rss_kib < HELD_BOUND_KIB, (stats.rss_kib, rss)
        await server.wait_metric(SERVER_CONNECTIONS, 0, timeout=10.0)
        for program, stats in zip((server, agent), baselines, strict=True):
            await fds_back(program, stats.fds)
            alive(program)
            clean_log(program)
        back = [
            await rss_back(p, s.rss_kib) or 0.0
            for p, s in zip((server, agent), baselines, strict=True)
        ]
        chaos.note(
            f"n2cp stalled reverse client: its destination held at {stalled_at >> 10} KiB of "
            f"{STALLED_SIZE >> 20} MiB; {FORWARD_BESIDE} forward x {FORWARD_SIZE >> 20} MiB "
            f"beside it in {took:.2f} s, SHA-256 ok; then the whole blob, SHA-256 ok; RSS "
            f"server {baselines[0].rss_kib >> 10} -> {held[0] >> 10} MiB, agent "
            f"{baselines[1].rss_kib >> 10} -> {held[1] >> 10} MiB, back within 20 % in "
            f"{back[0]:.0f} / {back[1]:.0f} s"
        )

    chaos.run(main())


async def wait_stalled(source: Source, quiet: float = 0.5, timeout: float = 20.0) -> int:
    """Wait until ``source`` has sent something and then nothing for ``quiet`` seconds
    (its reader stalled): the bytes it sent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last, since = -1, loop.time()
    while loop.time() < deadline:
        if source.sent != last:
            last, since = source.sent, loop.time()
        elif last > 0 and loop.time() - since >= quiet:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"the source never stalled: {source.sent} bytes sent")
