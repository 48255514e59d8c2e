"""The proxy-server in gRPC mode, end to end on loopback: a frontend on the Unix socket
(h2c), agents over TCP+mTLS, both made with our client role.

The test agent answers DIAL_REQ with DIAL_RSP{connectID=1}, echoes DATA and answers
CLOSE_REQ with CLOSE_RSP, as the upstream agent does. Each test runs on uvloop and the
stdlib loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from random import Random
from typing import Any, TypeVar

import pytest

from konnectivity_fast.server import CONNECT_PATH, PROXY_PATH, ProxyServer, ServerHandle, start
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.tunnel import ERR_BACKEND_GONE, ERR_DIAL_TIMEOUT, ERR_NO_AGENT
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.errors import StatusCode
from konnectivity_fast.wire.packets import (
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

from .conftest import Certs, RunFn

SERVER_ID = "server-1"
SERVER_COUNT = 3
CONNECT_ID = 1
ADDRESS = "10.0.0.1:443"
T = TypeVar("T")


@dataclass
class Env:
    proxy: ProxyServer
    handle: ServerHandle
    uds: str
    certs: Certs

    @property
    def agent_port(self) -> int:
        port = self.handle.agent_port
        assert port is not None
        return port


@contextlib.asynccontextmanager
async def running(sock_dir: str, certs: Certs, dial_timeout: float = 0.0) -> AsyncIterator[Env]:
    proxy = ProxyServer(
        server_id=SERVER_ID, server_count=SERVER_COUNT, rng=Random(1), dial_timeout=dial_timeout
    )
    uds = os.path.join(sock_dir, "proxy.sock")
    handle = await start(
        proxy,
        uds_path=uds,
        agent_host="127.0.0.1",
        agent_port=0,
        cert_file=certs.server_cert,
        key_file=certs.server_key,
        client_ca_file=certs.ca,
    )
    try:
        yield Env(proxy, handle, uds, certs)
    finally:
        await handle.close()


@dataclass
class FakeAgent:
    """An agent on our client role: one ``Connect`` stream."""

    answer_dials: bool = True
    headers: list[tuple[str, str]] | None = None
    metadata_at_first_packet: list[tuple[str, str]] | None = None
    received: list[bytes] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    dialled: asyncio.Event = field(default_factory=asyncio.Event)
    proto: kgrpc.GrpcProtocol | None = None
    call: kgrpc.GrpcCall | None = None
    task: asyncio.Task[None] | None = None

    async def connect(
        self, env: Env, metadata: list[tuple[str, str]] | None = None
    ) -> kgrpc.GrpcCall:
        ctx = tls.client_context(env.certs.ca, env.certs.client_cert, env.certs.client_key)
        self.proto = await kgrpc.connect(
            host="127.0.0.1", port=env.agent_port, ssl=ctx, server_hostname="localhost"
        )
        if metadata is None:
            metadata = [("agentid", "a1"), ("agentidentifiers", "")]
        self.call = self.proto.start_call(CONNECT_PATH, metadata=metadata)
        return self.call

    async def start(self, env: Env) -> None:
        call = await self.connect(env)
        # The server registers the agent as it sends these headers: a dial may follow.
        self.headers = await call.headers_received
        self.task = asyncio.get_running_loop().create_task(self._serve(call))

    async def _serve(self, call: kgrpc.GrpcCall) -> None:
        while (message := await call.recv()) is not None:
            if self.metadata_at_first_packet is None:
                self.metadata_at_first_packet = list(call.metadata)
            self.received.append(message)
            packet = decode_packet(message)
            if packet.type == PacketType.DIAL_REQ:
                assert isinstance(packet.payload, DialRequest)
                self.dialled.set()
                if self.answer_dials:
                    rsp = DialResponse(connect_id=CONNECT_ID, random=packet.payload.random)
                    call.send(encode_packet(Packet(PacketType.DIAL_RSP, rsp)))
            elif packet.type == PacketType.DATA:
                assert isinstance(packet.payload, Data)
                self.data += packet.payload.data
                call.send(encode_packet(Packet(PacketType.DATA, packet.payload)))
            elif packet.type == PacketType.CLOSE_REQ:
                assert isinstance(packet.payload, CloseRequest)
                rsp_close = CloseResponse(connect_id=packet.payload.connect_id)
                call.send(encode_packet(Packet(PacketType.CLOSE_RSP, rsp_close)))

    async def alive(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro``, failing at once if this agent's loop failed meanwhile."""
        assert self.task is not None
        waiter = asyncio.ensure_future(coro)
        await asyncio.wait([waiter, self.task], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            self.task.result()  # raises what the agent hit
            raise AssertionError("the agent's stream ended")
        return waiter.result()

    async def close(self) -> None:
        if self.proto is not None:
            await self.proto.aclose()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await self.task


async def open_frontend(
    env: Env, path: str = PROXY_PATH
) -> tuple[kgrpc.GrpcProtocol, kgrpc.GrpcCall]:
    proto = await kgrpc.connect(path=env.uds)
    return proto, proto.start_call(path)


def dial_req(random: int) -> bytes:
    message: bytes = encode_packet(Packet(PacketType.DIAL_REQ, DialRequest("tcp", ADDRESS, random)))
    return message


async def recv_packet(call: kgrpc.GrpcCall) -> Packet:
    message = await call.recv()
    assert message is not None, f"stream ended: {call.status} {call.message}"
    packet: Packet = decode_packet(message)
    return packet


def test_agent_gets_server_headers_first(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            assert agent.headers is not None
            headers = dict(agent.headers)
            assert headers["serverid"] == SERVER_ID
            assert headers["servercount"] == str(SERVER_COUNT)
            assert len(env.proxy.router.backends) == 1
            assert env.proxy.router.ready
            # The first packet the agent sees comes after those headers.
            proto, call = await open_frontend(env)
            call.send(dial_req(5))
            await recv_packet(call)
            assert agent.metadata_at_first_packet is not None
            assert dict(agent.metadata_at_first_packet)["serverid"] == SERVER_ID
            call.done_writing()
            assert await call.wait_status() == StatusCode.OK
            await proto.aclose()
            await agent.close()

    run(main())


def test_dial_data_both_ways_close(run: RunFn, sock_dir: str, certs: Certs) -> None:
    chunk = 32 * 1024
    payload = os.urandom(1024 * 1024)

    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            proto, call = await open_frontend(env)
            call.send(dial_req(42))
            rsp = await recv_packet(call)
            assert rsp == Packet(
                PacketType.DIAL_RSP, DialResponse(connect_id=CONNECT_ID, random=42)
            )
            assert env.proxy.router.established_connections == 1

            sent: list[bytes] = []

            async def send_all() -> None:
                for i in range(0, len(payload), chunk):
                    message = encode_packet(
                        Packet(PacketType.DATA, Data(CONNECT_ID, data=payload[i : i + chunk]))
                    )
                    sent.append(message)
                    call.send(message)
                    await call.drain()

            sender = asyncio.get_running_loop().create_task(send_all())
            echoed = bytearray()
            while len(echoed) < len(payload):
                packet = await agent.alive(recv_packet(call))
                assert packet.type == PacketType.DATA
                assert isinstance(packet.payload, Data)
                assert packet.payload.connect_id == CONNECT_ID
                echoed += packet.payload.data
            await sender
            assert bytes(echoed) == payload
            assert bytes(agent.data) == payload
            # The server forwarded the frontend's DATA messages byte for byte.
            data_messages = [m for m in agent.received if decode_packet(m).type == PacketType.DATA]
            assert data_messages == sent

            call.send(encode_packet(Packet(PacketType.CLOSE_REQ, CloseRequest(CONNECT_ID))))
            close = await recv_packet(call)
            assert close == Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=CONNECT_ID))
            assert env.proxy.router.established_connections == 0
            call.done_writing()
            assert await call.recv() is None
            assert await call.wait_status() == StatusCode.OK
            await proto.aclose()
            await agent.close()
            assert env.proxy.router.frontends == {}

    run(main())


def test_no_agent_available(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            proto, call = await open_frontend(env)
            call.send(dial_req(7))
            rsp = await recv_packet(call)
            assert rsp == Packet(PacketType.DIAL_RSP, DialResponse(error=ERR_NO_AGENT, random=7))
            # The stream stays open; later packets are thrown away until the client closes.
            call.send(encode_packet(Packet(PacketType.DATA, Data(CONNECT_ID, data=b"x"))))
            call.done_writing()
            assert await call.recv() is None
            assert await call.wait_status() == StatusCode.OK
            await proto.aclose()

    run(main())


def test_agent_loss_fails_pending_dial(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent(answer_dials=False)
            await agent.start(env)
            proto, call = await open_frontend(env)
            call.send(dial_req(99))
            await agent.dialled.wait()
            assert env.proxy.router.pending_dials == 1
            await agent.close()  # the agent goes without answering
            rsp = await recv_packet(call)
            assert rsp == Packet(
                PacketType.DIAL_RSP, DialResponse(error=ERR_BACKEND_GONE, random=99)
            )
            assert env.proxy.router.pending_dials == 0
            assert env.proxy.router.backends == {}
            call.done_writing()
            assert await call.wait_status() == StatusCode.OK
            await proto.aclose()

    run(main())


def test_frontend_end_closes_its_connection(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            proto, call = await open_frontend(env)
            call.send(dial_req(3))
            assert (await recv_packet(call)).type == PacketType.DIAL_RSP
            call.done_writing()  # a half-close closes its connection, as upstream's Proxy
            assert await call.wait_status() == StatusCode.OK
            close_req = encode_packet(Packet(PacketType.CLOSE_REQ, CloseRequest(CONNECT_ID)))
            while close_req not in agent.received:
                await agent.alive(asyncio.sleep(0.01))
            assert env.proxy.router.established_connections == 0
            assert env.proxy.router.frontends == {}
            await proto.aclose()
            await agent.close()

    run(main())


def test_dial_timeout(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs, dial_timeout=0.05) as env:
            agent = FakeAgent(answer_dials=False)
            await agent.start(env)
            proto, call = await open_frontend(env)
            call.send(dial_req(11))
            rsp = await recv_packet(call)
            assert rsp == Packet(
                PacketType.DIAL_RSP, DialResponse(error=ERR_DIAL_TIMEOUT, random=11)
            )
            assert env.proxy.router.pending_dials == 0
            call.done_writing()
            assert await call.wait_status() == StatusCode.OK
            await proto.aclose()
            await agent.close()

    run(main())


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "expected one agent ID in the context, got []"),
        ([("agentid", "a"), ("agentid", "b")], "expected one agent ID in the context, got [a b]"),
    ],
)
def test_bad_agent_metadata(
    run: RunFn, sock_dir: str, certs: Certs, metadata: list[tuple[str, str]], message: str
) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            call = await agent.connect(env, metadata)
            assert await call.wait_status() == StatusCode.UNKNOWN
            assert call.message == message
            assert "serverid" not in dict(call.metadata)
            assert env.proxy.router.backends == {}
            await agent.close()

    run(main())


def test_unknown_service(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            proto, call = await open_frontend(env, "/AgentService/Connect")
            assert await call.wait_status() == StatusCode.UNIMPLEMENTED
            assert call.message == "unknown service AgentService"
            proto2, call2 = await open_frontend(env, "/ProxyService/Nope")
            assert await call2.wait_status() == StatusCode.UNIMPLEMENTED
            assert call2.message == "unknown method Nope for service ProxyService"
            await proto.aclose()
            await proto2.aclose()

    run(main())
