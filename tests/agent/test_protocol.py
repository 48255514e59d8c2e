"""Packet-level conformance of the agent against a scripted server, to upstream's
pkg/agent/client.go (Client.Connect, serverID, serverCount, Client.Serve): metadata,
response-header errors, ALPN, and the replies to each packet type."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.connect import ConnectError
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    Packet,
    PacketType,
)

from .conftest import Certs, RunFn
from .fake_server import fake_server, recv, send
from .support import LOOPBACK, EchoServer, agent, agent_config, until

pytestmark = pytest.mark.timeout(60)


def test_metadata_and_token_reread(run: RunFn, certs: Certs, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first-token")

    async def main() -> None:
        async with fake_server(certs) as fake:
            async with agent(
                certs,
                fake.port,
                agent_id="node-7",
                token_path=str(token),
                sync_interval=0.05,
                sync_interval_cap=0.1,
            ):
                await fake.next_stream()
                md = dict(fake.metadata[0])
                assert md["agentid"] == "node-7"
                assert md["agentidentifiers"] == ""  # sent even when empty
                assert md["authorization"] == "Bearer first-token"
                token.write_text("second-token")
                fake.drop_connections()
                await fake.next_stream()
                assert dict(fake.metadata[-1])["authorization"] == "Bearer second-token"

    run(main())


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([("servercount", "1")], "expected one server ID in the context, got []"),
        (
            [("serverid", "a"), ("serverid", "b"), ("servercount", "1")],
            "expected one server ID in the context, got [a b]",
        ),
        ([("serverid", "a")], "expected one server count, got 0"),
        ([("serverid", "a"), ("servercount", "x")], 'strconv.Atoi: parsing "x": invalid syntax'),
    ],
)
def test_bad_response_headers(
    run: RunFn, certs: Certs, headers: list[tuple[str, str]], error: str
) -> None:
    async def main() -> None:
        async with fake_server(certs, headers=headers) as fake:
            client = AgentClient(agent_config(certs, fake.port), EndpointPool())
            with pytest.raises(ConnectError, match=r"^" + error.replace("[", r"\[") + "$"):
                await client.connect()
            assert client.closed

    run(main())


def test_refused_stream_reports_status(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with fake_server(certs, refuse="Failed to validate authentication token") as fake:
            client = AgentClient(agent_config(certs, fake.port), EndpointPool())
            with pytest.raises(ConnectError) as info:
                await client.connect()
            assert str(info.value) == (
                "rpc error: code = Unknown desc = Failed to validate authentication token"
            )

    run(main())


def test_custom_alpn_and_missing_alpn(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        # The server picks the custom protocol: the agent still speaks gRPC on it.
        async with fake_server(certs, alpn=("konnectivity",)) as fake:
            config = agent_config(certs, fake.port)
            from konnectivity_fast.transport import tls

            config.ssl_context = tls.client_context(
                certs.ca, certs.client_cert, certs.client_key, extra_alpn=["konnectivity"]
            )
            client = AgentClient(config, EndpointPool())
            assert await client.connect() == 1
            client.close()
        # No ALPN negotiated: refused as grpc-go does.
        async with fake_server(certs, alpn=()) as fake:
            client = AgentClient(agent_config(certs, fake.port), EndpointPool())
            with pytest.raises(ConnectError, match="missing selected ALPN property"):
                await client.connect()

    run(main())


def test_packet_replies(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        echo = EchoServer()
        port = await echo.start()
        async with fake_server(certs) as fake, agent(certs, fake.port):
            call = await fake.next_stream()

            async def expect_close_rsp(cid: int, error: str) -> None:
                packet = await recv(call)
                assert packet == Packet(PacketType.CLOSE_RSP, CloseResponse(error, cid)), packet

            # Ignored: DIAL_CLS, DRAIN, CLOSE_RSP, DIAL_RSP, DATA with connectID 0, type 9.
            send(call, Packet(PacketType.DIAL_CLS, CloseDial(5)))
            send(call, Packet(PacketType.DRAIN, Drain()))
            send(call, Packet(PacketType.CLOSE_RSP, CloseResponse("", 3)))
            send(call, Packet(PacketType.DIAL_RSP, DialResponse("", 3, 4)))
            send(call, Packet(PacketType.DATA, Data(0, "", b"zero")))
            send(call, Packet(9, None))
            send(call, Packet(PacketType.DIAL_REQ, None))  # no payload: dropped, no crash
            # Unknown connection IDs.
            send(call, Packet(PacketType.CLOSE_REQ, CloseRequest(99)))
            await expect_close_rsp(99, "Unknown connectID")
            send(call, Packet(PacketType.DATA, Data(98, "", b"x")))
            await expect_close_rsp(98, "unrecognized connectID")
            # A dial, echo, and the close handshake.
            send(call, Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{port}", 7)))
            packet = await recv(call)
            assert packet == Packet(PacketType.DIAL_RSP, DialResponse("", 1, 7)), packet
            send(call, Packet(PacketType.DATA, Data(1, "", b"hello")))
            got = b""
            while len(got) < 5:
                packet = await recv(call)
                assert packet.type == PacketType.DATA and isinstance(packet.payload, Data)
                assert packet.payload.connect_id == 1
                got += packet.payload.data
            assert got == b"hello"
            send(call, Packet(PacketType.CLOSE_REQ, CloseRequest(1)))
            await expect_close_rsp(1, "")
            send(call, Packet(PacketType.CLOSE_REQ, CloseRequest(1)))
            await expect_close_rsp(1, "Unknown connectID")
            await until(lambda: echo.open == 0)
        await echo.close()

    run(main())


def test_server_stream_end_closes_backends_and_reconnects(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        echo = EchoServer()
        port = await echo.start()
        async with fake_server(certs) as fake:
            async with agent(certs, fake.port, sync_interval=0.05, sync_interval_cap=0.1) as cs:
                call = await fake.next_stream()
                for i in (1, 2):
                    send(
                        call,
                        Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{port}", i)),
                    )
                    assert (await recv(call)).type == PacketType.DIAL_RSP
                await until(lambda: echo.open == 2)
                call.finish()  # the server ends the stream (status OK)
                await until(lambda: echo.open == 0, what="backends closed")
                again = await fake.next_stream()
                send(
                    again, Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{port}", 3))
                )
                rsp = await recv(again)
                assert rsp == Packet(PacketType.DIAL_RSP, DialResponse("", 1, 3))
                assert len(cs.clients) == 1
        await echo.close()

    run(main())


def test_slow_backend_does_not_stall_the_others(run: RunFn, certs: Certs) -> None:
    """A backend that reads nothing holds its data in its own queue (within the budget);
    another connection on the same stream keeps flowing."""

    async def main() -> None:
        # Never accepted, small receive buffer: the kernel takes little for it.
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.bind((LOOPBACK, 0))
        stuck.listen(8)
        stuck_port = stuck.getsockname()[1]
        echo = EchoServer()
        port = await echo.start()
        pool = EndpointPool(endpoint_budget=32 << 20, agent_budget=64 << 20)
        async with fake_server(certs) as fake, agent(certs, fake.port, pool=pool) as cs:
            call = await fake.next_stream()
            send(
                call, Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{stuck_port}", 1))
            )
            assert (await recv(call)).type == PacketType.DIAL_RSP
            send(call, Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{port}", 2)))
            assert (await recv(call)).type == PacketType.DIAL_RSP
            # 8 MiB at the stuck backend: more than the kernel buffers, less than its budget.
            chunk = os.urandom(256 << 10)
            for _ in range(32):
                send(call, Packet(PacketType.DATA, Data(1, "", chunk)))
            (client,) = cs.clients.values()
            await until(lambda: pool.total > (1 << 20), what="data queued at the stuck backend")
            for i in range(20):
                msg = f"ping {i}".encode()
                send(call, Packet(PacketType.DATA, Data(2, "", msg)))
                packet = await recv(call)
                assert packet == Packet(PacketType.DATA, Data(2, "", msg)), packet
            assert not client._inbound_paused
        stuck.close()
        await echo.close()

    run(main())


def test_endpoint_over_budget_pauses_only_its_stream(run: RunFn, certs: Certs) -> None:
    """Past its budget a stuck backend pauses its server stream (upstream's behaviour,
    later); once the backend goes away the stream flows again."""

    async def main() -> None:
        stuck = socket.socket()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.bind((LOOPBACK, 0))
        stuck.listen(8)
        stuck_port = stuck.getsockname()[1]
        pool = EndpointPool(endpoint_budget=256 << 10, agent_budget=64 << 20)
        async with fake_server(certs) as fake, agent(certs, fake.port, pool=pool) as cs:
            call = await fake.next_stream()
            send(
                call, Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"{LOOPBACK}:{stuck_port}", 1))
            )
            assert (await recv(call)).type == PacketType.DIAL_RSP
            chunk = os.urandom(256 << 10)
            for _ in range(32):
                send(call, Packet(PacketType.DATA, Data(1, "", chunk)))
            (client,) = cs.clients.values()
            await until(lambda: client._inbound_paused, what="stream paused")
            send(call, Packet(PacketType.CLOSE_REQ, CloseRequest(1)))
            (conn, _) = stuck.accept()
            conn.close()  # the backend goes: its queue is dropped, the stream resumes
            await until(lambda: not client._inbound_paused, what="stream resumed")
        stuck.close()

    run(main())
