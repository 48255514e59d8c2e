"""The proxy-server in HTTP-CONNECT mode, end to end: clients on the Unix socket (plain
HTTP/1.1, asyncio streams), agents over TCP+mTLS made with our client role (the echoing
``FakeAgent`` of the gRPC-mode tests). Each test runs on uvloop and the stdlib loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections.abc import AsyncIterator
from random import Random

from konnectivity_fast.server import ProxyServer, ServerHandle
from konnectivity_fast.server.http_connect import (
    BODY_405,
    MAX_HEADER_BYTES,
    RESPONSE_200,
    start_http_connect_tcp,
    start_http_connect_uds,
)
from konnectivity_fast.server.listeners import start_agent_listener
from konnectivity_fast.transport import tls
from konnectivity_fast.tunnel import ERR_NO_AGENT
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseResponse,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

from .conftest import Certs, RunFn
from .test_grpc_frontend import ADDRESS, CONNECT_ID, SERVER_COUNT, SERVER_ID, Env, FakeAgent

CONNECT = f"CONNECT {ADDRESS} HTTP/1.1\r\nHost: {ADDRESS}\r\n\r\n".encode()


@contextlib.asynccontextmanager
async def running(sock_dir: str, certs: Certs) -> AsyncIterator[Env]:
    proxy = ProxyServer(server_id=SERVER_ID, server_count=SERVER_COUNT, rng=Random(1))
    uds = os.path.join(sock_dir, "http.sock")
    handle = ServerHandle(proxy)
    handle.servers.append(
        await start_agent_listener(
            proxy,
            host="127.0.0.1",
            port=0,
            cert_file=certs.server_cert,
            key_file=certs.server_key,
            client_ca_file=certs.ca,
        )
    )
    http = await start_http_connect_uds(proxy, uds)
    try:
        yield Env(proxy, handle, uds, certs)
    finally:
        http.close()
        await handle.close()


async def open_client(env: Env) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(env.uds)


async def wait_for_packet(agent: FakeAgent, ptype: PacketType) -> Packet:
    """The first packet of ``ptype`` the agent received (waits; the run fixture bounds it)."""
    while True:
        for message in agent.received:
            packet: Packet = decode_packet(message)
            if packet.type == ptype:
                return packet
        assert agent.task is not None and not agent.task.done(), "the agent stopped"
        await asyncio.sleep(0.01)


def test_socket_mode(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            assert stat.S_IMODE(os.stat(env.uds).st_mode) == 0o770

    run(main())


def test_connect_relays_1mib_both_ways(run: RunFn, sock_dir: str, certs: Certs) -> None:
    payload = os.urandom(1024 * 1024)

    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            reader, writer = await open_client(env)
            writer.write(CONNECT)
            assert await agent.alive(reader.readexactly(len(RESPONSE_200))) == RESPONSE_200
            dial = await wait_for_packet(agent, PacketType.DIAL_REQ)
            assert isinstance(dial.payload, DialRequest)
            assert (dial.payload.protocol, dial.payload.address) == ("tcp", ADDRESS)
            writer.write(payload)
            echoed = await agent.alive(reader.readexactly(len(payload)))
            assert echoed == payload
            assert bytes(agent.data) == payload
            assert env.proxy.router.established_connections == 1
            # Client EOF: CLOSE_REQ to the agent, whose CLOSE_RSP is absorbed.
            writer.close()
            await agent.alive(wait_for_packet(agent, PacketType.CLOSE_REQ))
            await writer.wait_closed()
            assert env.proxy.router.established_connections == 0
            await agent.close()

    run(main())


def test_pipelined_bytes_after_connect(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            reader, writer = await open_client(env)
            writer.write(CONNECT + b"early bytes")
            expected = RESPONSE_200 + b"early bytes"
            assert await agent.alive(reader.readexactly(len(expected))) == expected
            writer.close()
            await agent.close()

    run(main())


def test_no_agent(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            reader, writer = await open_client(env)
            writer.write(CONNECT)
            response = await reader.read()  # until the server closes
            assert response == (
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n"
                b"currently no tunnels available: " + ERR_NO_AGENT.encode()
            )
            writer.close()

    run(main())


def test_get_is_405_and_keeps_alive(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            reader, writer = await open_client(env)
            for _ in range(2):
                writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                assert lines[0] == "HTTP/1.1 405 Method Not Allowed"
                headers = dict(line.split(": ", 1) for line in lines[1:] if line)
                assert headers["Content-Type"] == "text/plain; charset=utf-8"
                assert headers["X-Content-Type-Options"] == "nosniff"
                assert int(headers["Content-Length"]) == len(BODY_405)
                assert await reader.readexactly(len(BODY_405)) == BODY_405
            assert BODY_405 == b"this proxy only supports CONNECT passthrough\n"
            writer.close()

    run(main())


def test_oversized_headers_431(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            reader, writer = await open_client(env)
            writer.write(b"CONNECT a:1 HTTP/1.1\r\nX: " + b"y" * (MAX_HEADER_BYTES + 100))
            response = await reader.read()  # the server half-closes after its reply
            assert response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
            writer.close()

    run(main())


def test_disconnect_during_dial_sends_dial_cls(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent(answer_dials=False)
            await agent.start(env)
            _reader, writer = await open_client(env)
            writer.write(CONNECT)
            dial = await agent.alive(wait_for_packet(agent, PacketType.DIAL_REQ))
            assert isinstance(dial.payload, DialRequest)
            writer.close()
            cls = await agent.alive(wait_for_packet(agent, PacketType.DIAL_CLS))
            assert cls.payload == CloseDial(random=dial.payload.random)
            assert env.proxy.router.pending_dials == 0
            await agent.close()

    run(main())


def test_agent_dial_error_response(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent(answer_dials=False)
            await agent.start(env)
            reader, writer = await open_client(env)
            writer.write(CONNECT)
            dial = await agent.alive(wait_for_packet(agent, PacketType.DIAL_REQ))
            assert isinstance(dial.payload, DialRequest) and agent.call is not None
            error = "dial tcp 10.0.0.1:443: i/o timeout"
            agent.call.send(
                encode_packet(
                    Packet(
                        PacketType.DIAL_RSP, DialResponse(random=dial.payload.random, error=error)
                    )
                )
            )
            response = await agent.alive(reader.read())
            assert response == (
                b"HTTP/1.1 504 Gateway Timeout\r\nConnection: close\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + error.encode()
            )
            writer.close()
            await agent.close()

    run(main())


def test_agent_close_rsp_closes_client(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            reader, writer = await open_client(env)
            writer.write(CONNECT)
            assert await agent.alive(reader.readexactly(len(RESPONSE_200))) == RESPONSE_200
            assert agent.call is not None
            agent.call.send(
                encode_packet(Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=CONNECT_ID)))
            )
            assert await agent.alive(reader.read()) == b""  # EOF, nothing more
            writer.close()
            await agent.close()

    run(main())


def test_tcp_mtls_listener(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with running(sock_dir, certs) as env:
            agent = FakeAgent()
            await agent.start(env)
            server = await start_http_connect_tcp(
                env.proxy,
                host="127.0.0.1",
                port=0,
                cert_file=certs.server_cert,
                key_file=certs.server_key,
                client_ca_file=certs.ca,
            )
            port = server.sockets[0].getsockname()[1]
            ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
            ctx.set_alpn_protocols(["http/1.1"])
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(CONNECT + b"ping")
            expected = RESPONSE_200 + b"ping"
            assert await agent.alive(reader.readexactly(len(expected))) == expected
            writer.close()
            server.close()
            await agent.close()

    run(main())
