"""Chaos on the data path, our programs as processes: kill -9 of the agent and of the
server in the middle of a transfer, backends that reset or half-close, readers that stall.

Every byte a tunnel delivers is checked: a complete transfer matches the backend's SHA-256,
an interrupted one is a prefix of what the backend sent (nothing corrupted, nothing made
up). After each scenario, new tunnels work, the surviving program's descriptors are back
to their baseline and its memory stayed within a bound.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.agent_peer import backend, echo

from .checks import alive, clean_log, fds_back, rss_back
from .conftest import LONG, Chaos
from .programs import ServerSpec, start_agent, start_server
from .traffic import Prober, Source, Transfer, download, http_tunnel, random_blob

pytestmark = pytest.mark.timeout(900 if LONG else 200)

#: Bytes of a transfer cut in the middle, and of the complete ones.
BIG = (256 if LONG else 32) << 20
SMALL = 4 << 20
MODES = ("http-connect", "grpc")


def both(short: str) -> tuple[str, ...]:
    """Frontend modes a scenario runs with: ``short`` in the short form, both in the long."""
    return MODES if LONG else (short,)


#: Memory a server may use beyond its baseline during these scenarios: the buffer budgets
#: (docs/data-path.md) for a few tunnels; far below what an unbounded buffer would reach.
RSS_BOUND_KIB = 160 << 10


def assert_prefix(transfer: Transfer, blob: bytes) -> None:
    assert transfer.data == blob[: len(transfer.data)], "the tunnel delivered corrupted bytes"


async def wait_received(task: asyncio.Task[Transfer], source: Source, at_least: int) -> None:
    """Until the backend has sent ``at_least`` bytes into the tunnel (the transfer is
    under way); fails if the transfer ended first."""
    for _ in range(2000):
        if task.done():
            raise AssertionError(f"the transfer ended early: {task.result().ended}")
        if source.sent >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the transfer did not start")


@pytest.mark.parametrize("mode", both("http-connect"))
def test_kill9_agent_mid_transfer(chaos: Chaos, mode: str) -> None:
    """The agent dies mid-download: the tunnel ends with a prefix of the data, the server
    forgets the agent (descriptors back), and a new agent carries a complete transfer."""

    async def main() -> None:
        blob = random_blob(BIG)
        source = chaos.closing(await Source(blob).start())
        spec = ServerSpec("ours", chaos.certs, chaos.workdir, mode=mode)
        server = chaos.keep(await start_server(spec))
        baseline = server.stats()
        agent = chaos.keep(
            await start_agent("ours", chaos.certs, chaos.workdir, spec.ports.agent, "doomed")
        )
        await server.wait_for("/readyz")
        with_agent = server.stats().fds
        task = asyncio.get_running_loop().create_task(download(spec.uds, source.address, mode))
        await wait_received(task, source, BIG // 4)
        agent.kill9()
        cut = await task
        assert cut.ended != "stalled" and len(cut.data) < BIG, cut.ended
        assert_prefix(cut, blob)
        await server.wait_for("/readyz", 500)
        await fds_back(server, baseline.fds)
        chaos.keep(await start_agent("ours", chaos.certs, chaos.workdir, spec.ports.agent, "new"))
        await server.wait_for("/readyz")
        small = chaos.closing(await Source(blob[:SMALL]).start())
        whole = await download(spec.uds, small.address, mode)
        assert (whole.sha256, whole.ended) == (small.sha256, "eof")
        await fds_back(server, with_agent)
        assert server.stats().rss_kib - baseline.rss_kib < RSS_BOUND_KIB
        alive(server)
        clean_log(server)
        chaos.note(
            f"kill -9 agent ({mode}): cut after {len(cut.data) >> 20} of {BIG >> 20} MiB "
            f"({cut.ended}), prefix intact; new agent: {SMALL >> 20} MiB, SHA-256 ok"
        )

    chaos.run(main())


@pytest.mark.parametrize("mode", both("grpc"))
def test_kill9_server_mid_transfer(chaos: Chaos, mode: str) -> None:
    """The server dies mid-download: the frontend's tunnel ends with a prefix, the agent
    notices, logs it, drops its backend connections, and is back once the server restarts
    on the same ports; a new tunnel then carries the data intact."""

    async def main() -> None:
        blob = random_blob(BIG)
        source = chaos.closing(await Source(blob).start())
        spec = ServerSpec("ours", chaos.certs, chaos.workdir, mode=mode)
        server = chaos.keep(await start_server(spec, "server-1"))
        agent = chaos.keep(
            await start_agent("ours", chaos.certs, chaos.workdir, spec.ports.agent, "survivor")
        )
        await agent.wait_for("/readyz")
        agent_baseline = agent.stats()
        task = asyncio.get_running_loop().create_task(download(spec.uds, source.address, mode))
        await wait_received(task, source, BIG // 4)
        server.kill9()
        cut = await task
        assert len(cut.data) < BIG
        assert_prefix(cut, blob)
        await agent.wait_for("/readyz", 503)  # the agent says 503, the server 500
        chaos.keep(await start_server(spec, "server-2"))
        await agent.wait_for("/readyz")
        small = chaos.closing(await Source(blob[:SMALL]).start())
        whole = await download(spec.uds, small.address, mode)
        assert (whole.sha256, whole.ended) == (small.sha256, "eof")
        await fds_back(agent, agent_baseline.fds)
        assert agent.stats().rss_kib - agent_baseline.rss_kib < RSS_BOUND_KIB
        log = clean_log(agent)
        assert "disconnected from server" in log, log[-2000:]
        chaos.note(
            f"kill -9 server ({mode}): cut after {len(cut.data) >> 20} of {BIG >> 20} MiB, "
            f"prefix intact; agent back after the restart, SHA-256 ok"
        )

    chaos.run(main())


@pytest.mark.parametrize("mode", ["http-connect", "grpc"])
def test_backend_reset_and_half_close(chaos: Chaos, mode: str) -> None:
    """A backend that resets mid-stream ends its tunnel with a prefix of what it sent; one
    that half-closes after sending delivers everything, then the tunnel ends; other
    tunnels never notice."""

    async def main() -> None:
        blob = random_blob(SMALL)
        resetting = chaos.closing(await Source(blob, reset_after=SMALL // 2).start())
        half_closing = chaos.closing(await Source(blob, half_close=True).start())
        spec = ServerSpec("ours", chaos.certs, chaos.workdir, mode=mode)
        server = chaos.keep(await start_server(spec))
        chaos.keep(await start_agent("ours", chaos.certs, chaos.workdir, spec.ports.agent, "a"))
        await server.wait_for("/readyz")
        baseline = server.stats()
        async with backend(echo) as echo_backend:
            prober = chaos.closing(Prober(spec.uds, echo_backend.address, mode).start())
            await prober.flowing()
            for _ in range(5 if not LONG else 50):
                reset = await download(spec.uds, resetting.address, mode)
                assert len(reset.data) <= SMALL // 2
                assert_prefix(reset, blob)
                whole = await download(spec.uds, half_closing.address, mode)
                assert (whole.sha256, whole.ended) == (half_closing.sha256, "eof")
            await prober.flowing()
            await prober.stop()
        await fds_back(server, baseline.fds)
        alive(server)
        clean_log(server)
        chaos.note(f"backend reset / half-close ({mode}): {prober.summary()}")

    chaos.run(main())


def test_slow_readers_hold_no_one_up(chaos: Chaos) -> None:
    """Tunnels whose readers stop for a while: the server buffers within its budgets, a
    probe beside them keeps its round trips, every stalled reader gets all its bytes
    intact when it reads again, and once idle the server gives the memory back (within
    20 % of its RSS before the burst, within a minute: cli/malloc.py)."""

    async def main() -> None:
        # Within the server's budgets (server/buffering.py: 16 MiB per tunnel, 256 MiB per
        # process), so that no tunnel holds its agent's stream: past them, a reader
        # stalled for TUNNEL_STALL_TIMEOUT (10 s) is cut, by design.
        size = (12 if LONG else 8) << 20
        tunnels = 16 if LONG else 6
        blob = random_blob(size)
        source = chaos.closing(await Source(blob).start())
        spec = ServerSpec("ours", chaos.certs, chaos.workdir, mode="http-connect")
        server = chaos.keep(await start_server(spec))
        chaos.keep(await start_agent("ours", chaos.certs, chaos.workdir, spec.ports.agent, "a"))
        await server.wait_for("/readyz")
        async with backend(echo) as echo_backend:
            prober = chaos.closing(Prober(spec.uds, echo_backend.address).start())
            await prober.flowing()
            baseline = server.stats()  # warm: tunnels were made, none is buffered
            opened = [await http_tunnel(spec.uds, source.address) for _ in range(tunnels)]
            await asyncio.sleep(2.0)  # nobody reads: the server holds what it may
            peak = server.stats().rss_kib
            await prober.flowing()

            async def read_all(reader: asyncio.StreamReader) -> bytes:
                return await asyncio.wait_for(reader.readexactly(size), 60)

            got = await asyncio.gather(*(read_all(r) for r, _ in opened))
            for _, writer in opened:
                writer.close()
            assert all(g == blob for g in got)
            await prober.stop()
        await fds_back(server, baseline.fds)
        grown = peak - baseline.rss_kib
        assert grown < tunnels * (size >> 10) + RSS_BOUND_KIB
        idle = await rss_back(server, baseline.rss_kib) or 0.0
        chaos.note(
            f"slow readers: {tunnels} x {size >> 20} MiB held, server RSS "
            f"{baseline.rss_kib >> 10} -> {peak >> 10} MiB at the peak -> "
            f"{server.stats().rss_kib >> 10} MiB after {idle:.0f} s idle; {prober.summary()}"
        )

    chaos.run(main())
