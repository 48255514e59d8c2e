"""Both halves of node-to-control-plane tunneling together, in process on loopback: our
proxy-server with an allow-list and our agent with two mappings, one allowed and one not.
A local client's bytes reach the allowed destination and come back byte-exact, while a
forward tunnel on the same agent stream gets an even connectID and works; the other
mapping resets its client at once and its destination never sees a connection."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import pytest

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.agent.portmap import PortMapping
from konnectivity_fast.agent.reverse import LocalListeners, NodeToCpConfig
from konnectivity_fast.server import ProxyServer, start
from konnectivity_fast.server.reverse import NodeToCpConfig as ServerNodeToCp
from konnectivity_fast.tunnel.allowlist import parse_allowed_destinations
from konnectivity_fast.wire.contract import Extension
from tests.support.net import free_ports

from .conftest import Certs, RunFn
from .support import LOOPBACK, EchoServer, Tunnel, agent_config, until

pytestmark = pytest.mark.timeout(90)

SIZE = 4 << 20


async def send_all(writer: asyncio.StreamWriter, payload: bytes) -> None:
    for offset in range(0, len(payload), 1 << 16):
        writer.write(payload[offset : offset + (1 << 16)])
        await writer.drain()


async def forward_tunnel(uds: str, port: int) -> None:
    """A forward tunnel through the server's frontend: even connectIDs on the stream."""
    tunnel = await Tunnel.open(uds)
    try:
        dialed = await tunnel.dial(f"127.0.0.1:{port}")
        assert not dialed.error and dialed.connect_id == 2
        tunnel.write(b"forward")
        assert await tunnel.read_exactly(7) == b"forward"
    finally:
        await tunnel.aclose()


async def reset_at_once(port: int) -> None:
    loop = asyncio.get_running_loop()
    start_time = loop.time()
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
    except ConnectionResetError:
        pass  # the RST beat connect()'s return
    else:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        writer.close()
    assert loop.time() - start_time < 1.0


def test_both_halves_carry_allowed_and_reset_denied(
    run: RunFn, certs: Certs, sock_dir: str
) -> None:
    async def main() -> None:
        allowed, forbidden = EchoServer(), EchoServer()
        allowed_port, forbidden_port = await allowed.start(), await forbidden.start()
        proxy = ProxyServer(
            server_id="s1",
            rng=random.Random(1),
            node_to_cp=ServerNodeToCp(
                parse_allowed_destinations([f"127.0.0.1:{allowed_port}"]), 5.0, 1000
            ),
        )
        uds = os.path.join(sock_dir, "s1.sock")
        handle = await start(
            proxy,
            uds_path=uds,
            agent_host=LOOPBACK,
            agent_port=0,
            cert_file=certs.server_cert,
            key_file=certs.server_key,
            client_ca_file=certs.ca,
        )
        assert handle.agent_port is not None
        client = AgentClient(
            agent_config(certs, handle.agent_port, extensions=frozenset({Extension.NODE_TO_CP})),
            EndpointPool(),
        )
        await client.connect()
        client.start()
        local_ok, local_denied = free_ports(2)
        listeners = LocalListeners(
            NodeToCpConfig(
                [
                    PortMapping(local_ok, "127.0.0.1", allowed_port),
                    PortMapping(local_denied, "127.0.0.1", forbidden_port),
                ]
            ),
            lambda: [client.reverse] if client.reverse is not None else [],
        )
        listeners.start()
        try:
            assert client.reverse is not None
            payload = os.urandom(SIZE)
            reader, writer = await asyncio.open_connection(LOOPBACK, local_ok)
            sending = asyncio.ensure_future(send_all(writer, payload))
            await forward_tunnel(uds, allowed_port)  # on the same stream meanwhile
            echoed = await asyncio.wait_for(reader.readexactly(SIZE), 60)
            await sending
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            (cid,) = client.reverse.endpoints
            assert cid % 2 == 1
            writer.close()

            await reset_at_once(local_denied)
            assert forbidden.accepted == 0
            reverse = client.reverse
            await until(lambda: not reverse.endpoints, what="the reverse connection to close")
        finally:
            await listeners.stop()
            client.close()
            await handle.close()
            await allowed.close()
            await forbidden.close()

    run(main())
