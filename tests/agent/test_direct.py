"""Direct server endpoints (agent/discovery.py, agent/clientset.py) against our proxy-servers
in process: behind a sticky balancer the agent still holds every server through a static
list; it can do without a balancer; a replaced server is found again; a duplicate never
costs a sync interval; and an endpoint whose certificate does not verify gets neither the
client certificate nor the token."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from konnectivity_fast.agent import clientset as clientset_module
from konnectivity_fast.agent.clientset import ClientSet
from konnectivity_fast.agent.discovery import EndpointBook, Source
from konnectivity_fast.metrics import agent as agent_metrics
from konnectivity_fast.metrics import discovery as discovery_metrics
from konnectivity_fast.wire.contract import Extension
from konnectivity_fast.wire.endpoints import Address

from .conftest import Certs, RunFn
from .forwarder import Forwarder
from .support import LOOPBACK, Server, agent_config, proxy_server, until

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def direct_agent(
    certs: Certs,
    lb_port: int,
    addresses: list[Address],
    *,
    host: str = LOOPBACK,
    sync_interval: float = 0.05,
    **kw: Any,
) -> AsyncIterator[ClientSet]:
    static = dict.fromkeys(addresses, "")
    cs = ClientSet(
        agent_config(certs, lb_port, host=host, **kw),
        sync_interval=sync_interval,
        sync_interval_cap=max(0.2, sync_interval),
        rng=random.Random(7),
        book=EndpointBook(sync_interval, max(0.2, sync_interval), random.Random(8)),
        sources={Source.STATIC: lambda: static},
    )
    cs.start()
    try:
        yield cs
    finally:
        await cs.stop()


@contextlib.asynccontextmanager
async def three_servers(sock_dir: str, certs: Certs) -> AsyncIterator[list[Server]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                proxy_server(sock_dir, certs, server_id=f"s{i}", server_count=3)
            )
            for i in (1, 2, 3)
        ]


def _addresses(servers: list[Server]) -> list[Address]:
    return [Address(LOOPBACK, s.agent_port) for s in servers]


def _attempts(path: str, result: str) -> float:
    return discovery_metrics.CONNECT_ATTEMPTS.labels(path, result).value


def test_static_list_holds_every_server_behind_a_sticky_balancer(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with three_servers(sock_dir, certs) as servers:
            lb = Forwarder([s.agent_port for s in servers], mode="sticky")
            lb_port = await lb.start()
            try:
                direct_new = _attempts("direct", "new")
                async with direct_agent(certs, lb_port, _addresses(servers)) as cs:
                    await until(lambda: sorted(cs.clients) == ["s1", "s2", "s3"], what="3/3")
                    for server in servers:  # every server can route to the agent
                        await until(lambda s=server: s.proxy.router.ready)  # type: ignore[misc]
                    # The balancer gave s1 or a direct dial did; the other two came directly.
                    assert _attempts("direct", "new") - direct_new >= 2
                    assert discovery_metrics.MISSING_SERVERS.value == 0
                    assert discovery_metrics.SERVER_ENDPOINTS.labels("static").value == 3
                    # One connection per server, whatever the path: nothing more is held.
                    await asyncio.sleep(0.3)
                    assert sorted(cs.clients) == ["s1", "s2", "s3"]
                    assert agent_metrics.OPEN_SERVER_CONNECTIONS.labels().value == 3
            finally:
                await lb.close()

    run(main())


def test_direct_endpoints_alone_without_a_balancer(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with three_servers(sock_dir, certs) as servers:
            lb_new = _attempts("lb", "new") + _attempts("lb", "error")
            async with direct_agent(certs, 1, _addresses(servers), host="") as cs:
                await until(lambda: sorted(cs.clients) == ["s1", "s2", "s3"], what="3/3")
            assert _attempts("lb", "new") + _attempts("lb", "error") == lb_new  # never dialled

    run(main())


def test_a_replaced_server_is_found_at_its_address(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            first = await stack.enter_async_context(
                proxy_server(sock_dir, certs, server_id="s1", server_count=2)
            )
            second = await stack.enter_async_context(
                proxy_server(sock_dir, certs, server_id="s2", server_count=2)
            )
            port = second.agent_port
            addresses = [Address(LOOPBACK, first.agent_port), Address(LOOPBACK, port)]
            cs = await stack.enter_async_context(direct_agent(certs, 1, addresses, host=""))
            await until(lambda: sorted(cs.clients) == ["s1", "s2"], what="2/2")
            await second.handle.close()
            await until(lambda: sorted(cs.clients) == ["s1"], what="s2 gone")
            # A new server (new ID) on the same address: dialled again after its backoff.
            await stack.enter_async_context(
                proxy_server(sock_dir, certs, server_id="s2b", server_count=2, agent_port=port)
            )
            await until(lambda: sorted(cs.clients) == ["s1", "s2b"], what="s2b found")

    run(main())


def test_round_robin_duplicates_cost_no_sync_interval(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """With a sync interval longer than the test's bound, the agent can only hold all
    three servers if duplicates inside the streak are retried at once (upstream sleeps a
    sync interval after each, issue #816)."""

    async def main() -> None:
        async with three_servers(sock_dir, certs) as servers:
            lb = Forwarder([s.agent_port for s in servers])
            lb.targets = [servers[0].agent_port, servers[0].agent_port, *lb.targets]
            lb_port = await lb.start()
            try:
                cs = ClientSet(
                    agent_config(certs, lb_port),
                    sync_interval=60.0,
                    sync_interval_cap=60.0,
                    rng=random.Random(7),
                )
                cs.start()
                try:
                    await until(lambda: sorted(cs.clients) == ["s1", "s2", "s3"], what="3/3")
                    assert cs.attempts >= 4  # at least two duplicates on the way
                finally:
                    await cs.stop()
            finally:
                await lb.close()

    run(main())


class _Recorder(asyncio.Protocol):
    """A TLS endpoint that records the client certificates it saw and every byte."""

    def __init__(self, seen: list[bytes | None], received: bytearray) -> None:
        self.seen = seen
        self.received = received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        self.seen.append(ssl_object.getpeercert(binary_form=True))

    def data_received(self, data: bytes) -> None:
        self.received += data


def _impostor_context(certs: Certs, other: trustme.CA) -> ssl.SSLContext:
    """A server certificate from ``other``; asks for a client certificate and accepts
    ours, so that one would be recorded if the client sent it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=Path(certs.ca).read_text())
    ctx.set_alpn_protocols(["h2"])
    return ctx


@pytest.mark.parametrize("trusted", [False, True], ids=["foreign-ca", "control-trusted"])
def test_an_endpoint_with_a_foreign_certificate_gets_no_credentials(
    run: RunFn, sock_dir: str, certs: Certs, tmp_path: Path, trusted: bool
) -> None:
    """``control-trusted`` is the positive control: an agent that trusts the other CA too
    sends its certificate and its Connect request (with the token) to the same endpoint,
    so the recorder would see them."""
    other = trustme.CA()
    token = tmp_path / "token"
    token.write_text("secret-token-value")
    seen: list[bytes | None] = []
    received = bytearray()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Recorder(seen, received), LOOPBACK, 0, ssl=_impostor_context(certs, other)
        )
        port = server.sockets[0].getsockname()[1]
        try:
            async with three_servers(sock_dir, certs) as servers:
                failed = _attempts("direct", "error")
                addresses = [*_addresses(servers[:1]), Address(LOOPBACK, port)]
                async with direct_agent(certs, 1, addresses, host="", token_path=str(token)) as cs:
                    if trusted:
                        other.configure_trust(cs.config.ssl_context)
                        await until(lambda: len(received) > 100, what="a Connect request")
                    else:
                        await until(
                            lambda: _attempts("direct", "error") >= failed + 2, what="refusals"
                        )
                    # Both endpoints are dialled at once: the recorder may see its request
                    # before s1's Connect is answered. The recorder never answers, so it is
                    # never held as a server.
                    await until(lambda: "s1" in cs.clients, what="s1 held")
                    assert sorted(cs.clients) == ["s1"]
        finally:
            server.close()
            await server.wait_closed()

    run(main())
    if trusted:
        assert seen and seen[0] is not None  # our client certificate went there
        assert len(received) > 100  # the HTTP/2 preface and the Connect request
    else:
        assert all(cert is None for cert in seen)
        assert received == bytearray()


def test_header_discovery_learns_replicas_the_server_meets_later(
    run: RunFn, sock_dir: str, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent meets s1 alone (the balancer's pool has only s1) while s1 knows of no other
    server; s1 then learns of s2 and s3 (from Leases, in a cluster). The agent re-reads the
    list through the balancer and dials both directly."""
    monkeypatch.setattr(clientset_module, "HEADER_REFRESH_FIRST", 0.2)
    offered = frozenset({Extension.SERVER_ENDPOINTS})

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            servers = [
                await stack.enter_async_context(
                    proxy_server(sock_dir, certs, server_id=f"s{i}", extensions=offered)
                )
                for i in (1, 2, 3)
            ]
            known = {"s1": Address(LOOPBACK, servers[0].agent_port)}
            for server in servers:
                server.proxy.server_endpoints = lambda: dict(known)
            lb = Forwarder([servers[0].agent_port], mode="sticky")
            lb_port = await lb.start()
            stack.push_async_callback(lb.close)
            cs = ClientSet(
                agent_config(certs, lb_port, extensions=offered),
                sync_interval=0.05,
                sync_interval_cap=0.2,
                rng=random.Random(7),
                book=EndpointBook(0.05, 0.2, random.Random(8)),
                sources={},
            )
            cs.start()
            stack.push_async_callback(cs.stop)
            await until(lambda: list(cs.clients) == ["s1"], what="s1")
            await asyncio.sleep(0.5)  # a few refreshes: s1 still lists itself alone
            assert list(cs.clients) == ["s1"]
            known.update({f"s{i}": Address(LOOPBACK, servers[i - 1].agent_port) for i in (2, 3)})
            await until(lambda: sorted(cs.clients) == ["s1", "s2", "s3"], what="3/3")
            assert discovery_metrics.SERVER_ENDPOINTS.labels("header").value == 3

    run(main())
