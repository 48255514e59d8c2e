"""``kf-server-endpoints`` on the agent service, over loopback (docs/high-availability.md,
"Direct endpoints: the server side"): an agent stream that offers ``server-endpoints.v1``
to a server that offers it too gets, in the response headers that carry
``serverid``/``servercount``, this server's advertised address and every peer's known from
the server Leases (``ServerDirectory``). Without the offer on either side the headers are
upstream's.

Clients: our transport's raw gRPC client (to read every response header key) and our
agent's ``AgentClient`` (the real agent's connection). Servers: ``ProxyServer`` in process,
and the ``proxy-server`` program with ``--agent-advertise-address``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.connect import ClientConfig
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.server import CONNECT_PATH, ProxyServer
from konnectivity_fast.server.directory import ServerDirectory
from konnectivity_fast.server.leases import format_micro_time
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire.contract import (
    MD_CAPABILITIES,
    MD_SERVER_COUNT,
    MD_SERVER_ID,
    NO_EXTENSIONS,
    Extension,
    ExtensionSet,
)
from konnectivity_fast.wire.endpoints import (
    AGENT_ENDPOINT_ANNOTATION,
    MD_SERVER_ENDPOINTS,
    Address,
    parse_server_endpoints,
)
from tests.support.inproc import serving

from .conftest import Certs, RunFn
from .test_app import LOOPBACK, WAIT_SECONDS, Running, command, free_ports, wait_healthy

pytestmark = pytest.mark.timeout(60)

ENDPOINTS = Extension.SERVER_ENDPOINTS
SELF = Address("lb.example", 8141)
PEER = Address("2001:db8::2", 8091)


def peer_lease(holder: str, endpoint: Address) -> dict[str, object]:
    return {
        "metadata": {"annotations": {AGENT_ENDPOINT_ANNOTATION: str(endpoint)}},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 30,
            "renewTime": format_micro_time(datetime.now(UTC)),
        },
    }


@contextlib.asynccontextmanager
async def our_server(
    sock_dir: str, certs: Certs, extensions: ExtensionSet
) -> AsyncIterator[tuple[ServerDirectory, int]]:
    directory = ServerDirectory("s1", agent_endpoint=SELF)
    directory.update([peer_lease("s2", PEER)])
    proxy = ProxyServer(
        server_id="s1",
        rng=random.Random(1),
        extensions=extensions,
        server_endpoints=directory.agent_endpoints,
    )
    async with serving(proxy, sock_dir, certs) as handle:
        assert handle.agent_port is not None
        yield directory, handle.agent_port


async def connect_headers(certs: Certs, port: int, offer: str | None) -> list[tuple[str, str]]:
    """Open a Connect stream, offering ``offer`` (a ``kf-capabilities`` value) if given;
    the response headers, in order."""
    ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
    proto = await kgrpc.connect(host=LOOPBACK, port=port, ssl=ctx, server_hostname="localhost")
    try:
        metadata = [("agentid", "a1")]
        if offer is not None:
            metadata.append((MD_CAPABILITIES, offer))
        call = proto.start_call(CONNECT_PATH, metadata=metadata)
        return list(await asyncio.wait_for(call.headers_received, WAIT_SECONDS))
    finally:
        await proto.aclose()


def keys(headers: list[tuple[str, str]]) -> list[str]:
    return [key for key, _ in headers if not key.startswith(":") and key != "content-type"]


def endpoints_of(headers: list[tuple[str, str]]) -> dict[str, Address]:
    return parse_server_endpoints(value for key, value in headers if key == MD_SERVER_ENDPOINTS)


def test_header_lists_self_and_peers(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with our_server(sock_dir, certs, frozenset({ENDPOINTS})) as (directory, port):
            headers = await connect_headers(certs, port, f"flow.v1, {ENDPOINTS}")
            assert keys(headers) == [
                MD_SERVER_ID,
                MD_SERVER_COUNT,
                MD_CAPABILITIES,
                MD_SERVER_ENDPOINTS,
            ]
            assert dict(headers)[MD_CAPABILITIES] == ENDPOINTS
            assert dict(headers)[MD_SERVER_ENDPOINTS] == "s1=lb.example:8141,s2=[2001:db8::2]:8091"
            # Read for every stream: a peer gone from the Leases is gone from the header.
            directory.update([])
            headers = await connect_headers(certs, port, ENDPOINTS)
            assert endpoints_of(headers) == {"s1": SELF}

    run(main())


@pytest.mark.parametrize(
    ("offer", "server_offers"),
    [(None, {ENDPOINTS}), ("flow.v1", {ENDPOINTS}), (ENDPOINTS, set())],
    ids=["agent-offers-none", "agent-offers-other", "server-offers-none"],
)
def test_no_header_without_both_offers(
    run: RunFn, sock_dir: str, certs: Certs, offer: str | None, server_offers: set[str]
) -> None:
    async def main() -> None:
        async with our_server(sock_dir, certs, frozenset(server_offers)) as (_, port):
            headers = await connect_headers(certs, port, offer)
            assert keys(headers) == [MD_SERVER_ID, MD_SERVER_COUNT]  # upstream's, exactly

    run(main())


def agent_client_config(certs: Certs, port: int, extensions: ExtensionSet) -> ClientConfig:
    ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
    return ClientConfig(
        host=LOOPBACK,
        port=port,
        ssl_context=ctx,
        agent_id="agent-1",
        server_name="localhost",
        extensions=extensions,
    )


@pytest.mark.parametrize("agent_offers", [{ENDPOINTS}, set()], ids=["offers", "silent"])
def test_our_agent_client_gets_the_header(
    run: RunFn, sock_dir: str, certs: Certs, agent_offers: set[str]
) -> None:
    async def main() -> None:
        async with our_server(sock_dir, certs, frozenset({ENDPOINTS})) as (_, port):
            client = AgentClient(
                agent_client_config(certs, port, frozenset(agent_offers)), EndpointPool()
            )
            await client.connect()
            try:
                assert client.call is not None
                headers = list(client.call.metadata)
                assert client.server_id == "s1"
                if agent_offers:
                    assert client.extensions == {ENDPOINTS}
                    assert endpoints_of(headers) == {"s1": SELF, "s2": PEER}
                else:
                    assert client.extensions == NO_EXTENSIONS
                    assert MD_SERVER_ENDPOINTS not in dict(headers)
            finally:
                client.close()
                assert client.proto is not None
                await asyncio.wait_for(client.proto.lost, WAIT_SECONDS)

    run(main())


# --- the program -------------------------------------------------------------------------


@pytest.fixture
def advertising_server(certs: Certs, sock_dir: str) -> Iterator[Running]:
    agent, health, admin = free_ports(3)
    uds = os.path.join(sock_dir, "konnectivity.sock")
    proc = subprocess.Popen(
        command(
            f"--uds-name={uds}",
            "--server-port=0",
            "--server-id=srv-a",
            f"--cluster-cert={certs.server_cert}",
            f"--cluster-key={certs.server_key}",
            f"--cluster-ca-cert={certs.ca}",
            f"--agent-bind-address={LOOPBACK}",
            f"--agent-port={agent}",
            f"--health-bind-address={LOOPBACK}",
            f"--health-port={health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-port={admin}",
            "--agent-advertise-address=[::1]:8141",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = Running(proc, health, admin, agent, uds, "grpc")
    try:
        wait_healthy(running)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_SECONDS)


def test_program_advertises_its_address(advertising_server: Running, certs: Certs) -> None:
    async def main() -> None:
        port = advertising_server.agent_port
        offered = await connect_headers(certs, port, ENDPOINTS)
        assert dict(offered)[MD_CAPABILITIES] == ENDPOINTS
        assert dict(offered)[MD_SERVER_ENDPOINTS] == "srv-a=[::1]:8141"
        plain = await connect_headers(certs, port, None)
        assert keys(plain) == [MD_SERVER_ID, MD_SERVER_COUNT]

    asyncio.run(asyncio.wait_for(main(), WAIT_SECONDS))
