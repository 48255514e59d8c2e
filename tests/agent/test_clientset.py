"""The ClientSet against several of our proxy-servers behind one address (a round-robin or
sticky TCP forwarder on 127.0.0.1): one connection per server, convergence after a server
is replaced, duplicates, the sticky warning, drain, and the backoff sequence."""

from __future__ import annotations

import contextlib
import logging
import random

import pytest

from konnectivity_fast.agent.policy import Backoff, ServerCounter, StickyDetector
from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.metrics import discovery as discovery_metrics
from konnectivity_fast.wire.packets import Drain, Packet, PacketType

from .conftest import Certs, RunFn
from .fake_server import fake_server, recv
from .forwarder import Forwarder
from .support import LOOPBACK, EchoServer, Server, Tunnel, agent, proxy_server, until

pytestmark = pytest.mark.timeout(90)


async def _echo_through(server: Server, port: int) -> None:
    tunnel = await Tunnel.open(server.uds)
    rsp = await tunnel.dial(f"{LOOPBACK}:{port}")
    assert rsp.error == "", rsp
    tunnel.write(b"hi " + server.proxy.server_id.encode())
    assert await tunnel.read_exactly(3 + len(server.proxy.server_id)) == (
        b"hi " + server.proxy.server_id.encode()
    )
    await tunnel.aclose()


def test_one_connection_per_server_behind_round_robin(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        echo = EchoServer()
        eport = await echo.start()
        async with contextlib.AsyncExitStack() as stack:
            servers = [
                await stack.enter_async_context(
                    proxy_server(sock_dir, certs, server_id=f"s{i}", server_count=3)
                )
                for i in (1, 2, 3)
            ]
            lb = Forwarder([s.agent_port for s in servers])
            lb_port = await lb.start()
            stack.push_async_callback(lb.close)
            cs = await stack.enter_async_context(
                agent(certs, lb_port, sync_interval=0.05, sync_interval_cap=0.2)
            )
            await until(lambda: sorted(cs.clients) == ["s1", "s2", "s3"], what="3 servers")
            assert agent_metrics.OPEN_SERVER_CONNECTIONS.labels().value == 3
            assert agent_metrics.KNOWN_SERVER_COUNT.value == 3
            for server in servers:
                await until(lambda s=server: s.proxy.router.ready)  # type: ignore[misc]
                await _echo_through(server, eport)
            # Replace s1 by s4: the agent drops s1 and finds s4.
            await servers[0].handle.close()
            s4 = await stack.enter_async_context(
                proxy_server(sock_dir, certs, server_id="s4", server_count=3)
            )
            lb.targets = [servers[1].agent_port, servers[2].agent_port, s4.agent_port]
            await until(lambda: sorted(cs.clients) == ["s2", "s3", "s4"], what="converged")
            await until(lambda: s4.proxy.router.ready)
            await _echo_through(s4, eport)
        await echo.close()

    run(main())


def test_sticky_balancer_is_reported(
    run: RunFn, sock_dir: str, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            servers = [
                await stack.enter_async_context(
                    proxy_server(sock_dir, certs, server_id=f"s{i}", server_count=3)
                )
                for i in (1, 2, 3)
            ]
            lb = Forwarder([s.agent_port for s in servers], mode="sticky")
            lb_port = await lb.start()
            stack.push_async_callback(lb.close)
            cs = await stack.enter_async_context(
                agent(certs, lb_port, sync_interval=0.01, sync_interval_cap=0.05)
            )
            await until(lambda: cs.sticky.suspected, what="sticky suspected")
            assert cs.duplicates_in_a_row >= StickyDetector.window(3)
            assert list(cs.clients) == ["s1"]
            assert agent_metrics.REGISTRY.registered(discovery_metrics.LB_STICKY_SUSPECTED)
            assert discovery_metrics.LB_STICKY_SUSPECTED.value == 1
            assert agent_metrics.OPEN_SERVER_CONNECTIONS.labels().value == 1
            assert agent_metrics.KNOWN_SERVER_COUNT.value == 3

    with caplog.at_level(logging.WARNING, logger="konnectivity_fast.agent.clientset"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if "looks sticky" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not per duplicate
    assert "127.0.0.1" in warnings[0] and "mostly s1" in warnings[0]
    assert "1 of 3 proxy-servers, 2 missing" in warnings[0]


def test_sync_forever_keeps_dialing_and_closes_duplicates(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with proxy_server(sock_dir, certs, server_count=1) as server:
            async with agent(certs, server.agent_port, sync_forever=True, sync_interval=0.01) as cs:
                await until(lambda: cs.attempts >= 5, what="repeated attempts")
                assert list(cs.clients) == ["s1"]
                assert server.proxy.router.ready  # the first connection still serves

    run(main())


def test_drain_sends_one_drain_per_stream_and_stops_new_connections(
    run: RunFn, certs: Certs
) -> None:
    async def main() -> None:
        async with fake_server(certs) as fake:
            async with agent(certs, fake.port, sync_interval=0.01, sync_forever=True) as cs:
                call = await fake.next_stream()
                await until(lambda: cs.attempts >= 2)
                cs.drain()
                packet = await recv(call)
                assert packet == Packet(PacketType.DRAIN, Drain())
                attempts = cs.attempts
                # No new connection while draining, however long we look (bounded).
                for _ in range(20):
                    await cs.connect_once()
                assert cs.attempts == attempts
                assert len(cs.clients) == 1

    run(main())


def test_backoff_sequence() -> None:
    rng = random.Random(3)
    backoff = Backoff(1.0, 10.0, rng)
    bases = [1, 1.5, 2.25, 3.375, 5.0625, 7.59375, 10, 10]
    for base in bases:
        delay = backoff.step()
        assert base <= delay < base * 1.1, (base, delay)
    backoff.reset()
    assert 1.0 <= backoff.step() < 1.1


def test_server_counter() -> None:
    counter = ServerCounter()
    assert counter.count() == 1  # nothing heard yet: try once
    counter.last_received = 3
    assert counter.count() == 3
    leases = ServerCounter(lambda: 0)
    leases.last_received = 3
    assert leases.count() == 1  # default source: leases only, 0 -> 1
    both = ServerCounter(lambda: 2, source="max")
    both.last_received = 3
    assert both.count() == 3
