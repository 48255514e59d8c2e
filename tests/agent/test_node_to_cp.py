"""Node-to-control-plane tunneling, the agent's half (agent/reverse.py), against scripted
servers (``fake_server``: real gRPC over TLS on loopback) that answer as our server's half
does: ``kf-capabilities: node-to-cp.v1``, odd connectIDs, DATA, CLOSE_RSP, denial texts,
or silence, and keep the reverse connections' credit as our server does (``recv``: DATA
from the agent is granted back at once, FLOW_CREDIT from the agent is counted in
``GRANTED``). Real local clients connect to the agent's real listeners."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.agent.portmap import PortMapping
from konnectivity_fast.agent.reverse import ListenError, LocalListeners, NodeToCpConfig
from konnectivity_fast.metrics import reverse as rmetrics
from konnectivity_fast.transport.call import GrpcCall
from konnectivity_fast.tunnel.flow import INITIAL_WINDOW
from konnectivity_fast.wire.contract import Extension
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    FlowCredit,
    Packet,
    PacketType,
)
from tests.support.net import free_ports

from .conftest import Certs, RunFn
from .fake_server import FakeServer, fake_server, send
from .fake_server import recv as recv_packet
from .support import LOOPBACK, EchoServer, agent_config

pytestmark = pytest.mark.timeout(90)

NODE = frozenset({Extension.NODE_TO_CP})
CAPS = ("kf-capabilities", "node-to-cp.v1")
DEST = "10.96.0.1:6443"
# Fast enough to show "at once", slack enough for a loaded 2-core machine.
QUICK = 1.0
QUIET = 0.3


#: FLOW_CREDIT the agent granted, per (server stream, connectID): what its local clients took.
GRANTED: dict[tuple[int, int], int] = {}


async def recv(call: GrpcCall, timeout: float = 10.0) -> Packet:
    """The next packet from the agent other than FLOW_CREDIT (counted in ``GRANTED``);
    reverse DATA is granted back at once, as a destination that reads everything."""
    while True:
        packet = await recv_packet(call, timeout)
        payload = packet.payload
        if isinstance(payload, FlowCredit):
            key = (id(call), payload.connect_id)
            GRANTED[key] = GRANTED.get(key, 0) + payload.bytes
            continue
        if isinstance(payload, Data) and payload.connect_id & 1:
            grant = FlowCredit(payload.connect_id, len(payload.data))
            send(call, Packet(PacketType.FLOW_CREDIT, grant))
        return packet


def headers(sid: str, capable: bool = True) -> list[tuple[str, str]]:
    return [("serverid", sid), ("servercount", "2"), *([CAPS] if capable else [])]


@dataclass
class Rig:
    fakes: list[FakeServer]
    clients: list[AgentClient]
    calls: list[GrpcCall]
    port: int
    listeners: LocalListeners
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def local(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(LOOPBACK, self.port)
        self.writers.append(writer)
        return reader, writer


@contextlib.asynccontextmanager
async def rig(
    certs: Certs,
    servers: int = 1,
    *,
    capable: bool = True,
    dial_timeout: float = 10.0,
    offer: frozenset[str] = NODE,
) -> AsyncIterator[Rig]:
    async with contextlib.AsyncExitStack() as stack:
        fakes = [
            await stack.enter_async_context(fake_server(certs, headers=headers(f"s{i}", capable)))
            for i in range(servers)
        ]
        pool = EndpointPool()
        clients: list[AgentClient] = []
        calls: list[GrpcCall] = []
        for fake in fakes:
            client = AgentClient(agent_config(certs, fake.port, extensions=offer), pool)
            await client.connect()
            client.start()
            stack.callback(client.close)
            clients.append(client)
            calls.append(await fake.next_stream())
        (port,) = free_ports(1)
        config = NodeToCpConfig(
            [PortMapping(port, "10.96.0.1", 6443)], LOOPBACK, dial_timeout, random.Random(3)
        )
        listeners = LocalListeners(
            config,
            lambda: [
                c.reverse
                for c in clients
                if c.reverse is not None and not c.closed and not c.server_draining
            ],
        )
        listeners.start()
        r = Rig(fakes, clients, calls, port, listeners)
        try:
            yield r
        finally:
            await listeners.stop()
            for writer in r.writers:
                writer.close()
            await asyncio.sleep(0)


async def first_of(calls: list[GrpcCall], timeout: float = 10.0) -> tuple[int, Packet]:
    """The first packet any of ``calls`` receives: (index, packet)."""
    tasks = [asyncio.ensure_future(recv(call, timeout)) for call in calls]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        # Unwound before anyone reads the calls again (a call has one waiter).
        await asyncio.gather(*tasks, return_exceptions=True)
    for index, task in enumerate(tasks):
        if task in done:
            return index, task.result()
    raise AssertionError("unreachable")


async def silent(call: GrpcCall, within: float = QUIET) -> None:
    with pytest.raises(TimeoutError):
        packet = await recv(call, within)
        pytest.fail(f"unexpected packet {packet}")


async def expect_reset(reader: asyncio.StreamReader, within: float = QUICK) -> None:
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        data = await asyncio.wait_for(reader.read(1), within)
        pytest.fail(f"read {data!r}, not a reset")


async def reset_on_connect_or_read(r: Rig) -> None:
    """A client reset at once: the RST may beat connect()'s return."""
    try:
        reader, _ = await r.local()
    except ConnectionResetError:
        return
    await expect_reset(reader)


def dial_req(packet: Packet) -> DialRequest:
    assert packet.type == PacketType.DIAL_REQ, packet
    assert isinstance(packet.payload, DialRequest)
    return packet.payload


def rsp(random_: int, *, cid: int = 0, error: str = "") -> Packet:
    return Packet(PacketType.DIAL_RSP, DialResponse(error=error, connect_id=cid, random=random_))


def data(cid: int, payload: bytes) -> Packet:
    return Packet(PacketType.DATA, Data(connect_id=cid, data=payload))


def unread_on_accepted(port: int) -> int:
    """Bytes waiting in the kernel on the agent's accepted socket of local port ``port``
    (/proc/net/tcp's rx_queue of the established connection whose local port it is)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    (queue,) = [row[4] for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "01"]
    return int(queue.split(":")[1], 16)


async def echo_server_side(call: GrpcCall, conns: int, size: int) -> None:
    """Play the server for ``conns`` reverse connections of ``size`` bytes each: accept
    every DIAL_REQ with an odd connectID, echo DATA back, answer CLOSE_REQ."""
    next_id, seen, closed = 1, {}, 0
    while closed < conns:
        packet = await recv(call)
        payload = packet.payload
        if isinstance(payload, DialRequest):
            send(call, rsp(payload.random, cid=next_id))
            seen[next_id] = 0
            next_id += 2
        elif isinstance(payload, Data):
            seen[payload.connect_id] += len(payload.data)
            send(call, data(payload.connect_id, payload.data))
        elif isinstance(payload, CloseRequest):
            assert seen.pop(payload.connect_id) == size
            send(call, Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=payload.connect_id)))
            closed += 1


def count(port: int, result: str) -> float:
    return rmetrics.LOCAL_CONNECTIONS_TOTAL.labels(str(port), result).value


# -- the whole life of a reverse connection ------------------------------------------------


def test_reverse_connection_byte_exact_both_ways(run: RunFn, certs: Certs) -> None:
    up = os.urandom(3 << 20)
    down = os.urandom(3 << 20)

    async def main() -> None:
        async with rig(certs) as r:
            call = r.calls[0]
            reader, writer = await r.local()
            writer.write(b"first bytes")  # before any DIAL_RSP
            await writer.drain()
            req = dial_req(await recv(call))
            assert (req.protocol, req.address) == ("tcp", DEST)
            assert req.random != 0
            await silent(call)  # nothing read, nothing sent before the DIAL_RSP
            assert unread_on_accepted(r.port) == len(b"first bytes")  # still in the kernel
            send(call, rsp(req.random, cid=5))
            got = bytearray()
            sender = asyncio.ensure_future(_write_all(writer, up))
            for offset in range(0, len(down), 64 << 10):
                send(call, data(5, down[offset : offset + (64 << 10)]))
            received = asyncio.ensure_future(reader.readexactly(len(down)))
            while len(got) < len(b"first bytes") + len(up):
                packet = await recv(call)
                assert packet.type == PacketType.DATA, packet
                assert isinstance(packet.payload, Data) and packet.payload.connect_id == 5
                got += packet.payload.data
            assert bytes(got) == b"first bytes" + up
            assert await received == down
            await sender
            # The client took everything: all but the last part of a window was granted.
            await until_granted(call, 5, len(down) - INITIAL_WINDOW)
            assert r.clients[0].reverse is not None
            assert set(r.clients[0].reverse.endpoints) == {5}
            writer.close()
            packet = await recv(call)
            assert packet == Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=5))
            send(call, Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=5)))
            await silent(call)
            assert not r.clients[0].reverse.endpoints
            assert count(r.port, rmetrics.OK) == 1

    run(main())


async def _write_all(writer: asyncio.StreamWriter, payload: bytes) -> None:
    for offset in range(0, len(payload), 1 << 16):
        writer.write(payload[offset : offset + (1 << 16)])
        await writer.drain()


async def until_granted(call: GrpcCall, cid: int, at_least: int) -> None:
    for _ in range(100):
        if GRANTED.get((id(call), cid), 0) >= at_least:
            return
        with contextlib.suppress(TimeoutError):
            await recv(call, 0.05)
    raise AssertionError(f"granted {GRANTED.get((id(call), cid), 0)} of {at_least}")


def test_local_client_that_reads_nothing_holds_only_its_window(run: RunFn, certs: Certs) -> None:
    """A local client that reads nothing while the server sends it more than an endpoint
    budget: the agent grants only what the client's socket took, and its stream is never
    paused for it, so another reverse connection of the stream still gets its bytes."""
    # Past ENDPOINT_WRITE_BUDGET by far, inside the window plus the overshoot limit.
    flood = os.urandom(8 << 20)

    async def main() -> None:
        async with rig(certs) as r:
            call, client = r.calls[0], r.clients[0]
            # A small receive buffer: the kernel cannot hide the flood from the agent.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((LOOPBACK, r.port))
            _, stalled = await asyncio.open_connection(sock=sock)
            send(call, rsp(dial_req(await recv(call)).random, cid=1))
            for offset in range(0, len(flood), 64 << 10):
                send(call, data(1, flood[offset : offset + (64 << 10)]))
            reader, writer = await r.local()
            send(call, rsp(dial_req(await recv(call)).random, cid=3))
            send(call, data(3, b"still flowing"))
            got = await asyncio.wait_for(reader.readexactly(len(b"still flowing")), 10)
            assert got == b"still flowing"
            assert not client.inbound_paused
            granted = GRANTED.get((id(call), 1), 0)
            assert granted < len(flood) - INITIAL_WINDOW, granted
            writer.close()
            stalled.close()

    run(main())


def test_many_concurrent_reverse_connections(run: RunFn, certs: Certs) -> None:
    conns, size = 24, 256 << 10

    async def one(r: Rig, payload: bytes) -> None:
        reader, writer = await r.local()
        writer.write(payload)
        assert await asyncio.wait_for(reader.readexactly(len(payload)), 30) == payload
        writer.close()

    async def main() -> None:
        async with rig(certs) as r:
            server = asyncio.ensure_future(echo_server_side(r.calls[0], conns, size))
            await asyncio.gather(*(one(r, os.urandom(size)) for _ in range(conns)))
            await asyncio.wait_for(server, 30)
            assert r.clients[0].reverse is not None
            assert r.clients[0].reverse.load == 0

    run(main())


@pytest.mark.parametrize("how", [PacketType.CLOSE_RSP, PacketType.CLOSE_REQ])
def test_server_close_flushes_then_closes(run: RunFn, certs: Certs, how: PacketType) -> None:
    async def main() -> None:
        async with rig(certs) as r:
            call = r.calls[0]
            reader, writer = await r.local()
            req = dial_req(await recv(call))
            send(call, rsp(req.random, cid=3))
            payload = os.urandom(1 << 20)
            send(call, data(3, payload))
            if how == PacketType.CLOSE_RSP:
                send(call, Packet(how, CloseResponse(connect_id=3)))
            else:
                send(call, Packet(how, CloseRequest(connect_id=3)))
                assert await recv(call) == Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=3))
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 10) == payload
            assert await asyncio.wait_for(reader.read(1), 10) == b""
            writer.close()
            await silent(call)  # closed by the server: no CLOSE_REQ back

    run(main())


# -- refusals, failures, retries -----------------------------------------------------------


def test_denial_resets_at_once_and_is_not_retried(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs, servers=2) as r:
            reader, _ = await r.local()
            index, packet = await first_of(r.calls)
            req = dial_req(packet)
            loop = asyncio.get_running_loop()
            start = loop.time()
            send(r.calls[index], rsp(req.random, error=f'destination "{DEST}" not allowed'))
            await expect_reset(reader)
            assert loop.time() - start < QUICK
            await silent(r.calls[1 - index])
            assert count(r.port, rmetrics.REJECTED) == 1

    run(main())


def test_dial_failure_is_retried_once_on_another_server(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs, servers=2) as r:
            reader, writer = await r.local()
            writer.write(b"hello")
            await writer.drain()
            index, packet = await first_of(r.calls)
            first = dial_req(packet)
            send(
                r.calls[index],
                rsp(first.random, error=f"dial tcp {DEST}: connect: connection refused"),
            )
            other = r.calls[1 - index]
            second = dial_req(await recv(other))
            assert second.address == DEST
            send(other, rsp(second.random, cid=1))
            packet = await recv(other)
            assert packet == Packet(PacketType.DATA, Data(connect_id=1, data=b"hello"))
            send(other, data(1, b"world"))
            assert await asyncio.wait_for(reader.readexactly(5), 10) == b"world"
            await silent(r.calls[index])

            # Both fail: one retry only, then a reset.
            reader2, _ = await r.local()
            index, packet = await first_of(r.calls)
            error = f"dial tcp {DEST}: i/o timeout"
            send(r.calls[index], rsp(dial_req(packet).random, error=error))
            again = r.calls[1 - index]
            send(again, rsp(dial_req(await recv(again)).random, error=error))
            await expect_reset(reader2)
            for call in r.calls:
                await silent(call, 0.1)
            assert count(r.port, rmetrics.ERROR) == 1

    run(main())


@pytest.mark.parametrize("peer", ["no-capability", "agent-offers-none"])
def test_no_capable_server_resets_and_sends_no_dial(run: RunFn, certs: Certs, peer: str) -> None:
    async def main() -> None:
        capable = peer != "no-capability"
        offer = NODE if capable is False else frozenset()
        async with rig(certs, capable=capable, offer=offer) as r:
            assert r.clients[0].reverse is None
            loop = asyncio.get_running_loop()
            start = loop.time()
            await reset_on_connect_or_read(r)
            assert loop.time() - start < QUICK
            await silent(r.calls[0])
            assert count(r.port, rmetrics.NO_SERVER) == 1

    run(main())


def test_our_proxy_server_today_is_not_capable(run: RunFn, certs: Certs, sock_dir: str) -> None:
    """A real server without the extension (ours, before its half): reset, forward works."""
    from .support import Tunnel, proxy_server

    async def main() -> None:
        echo = EchoServer()
        echo_port = await echo.start()
        async with proxy_server(sock_dir, certs) as server:
            client = AgentClient(
                agent_config(certs, server.agent_port, extensions=NODE), EndpointPool()
            )
            await client.connect()
            client.start()
            try:
                assert client.reverse is None and not client.extensions
                (port,) = free_ports(1)
                listeners = LocalListeners(
                    NodeToCpConfig([PortMapping(port, "127.0.0.1", echo_port)]),
                    lambda: [client.reverse] if client.reverse is not None else [],
                )
                listeners.start()
                try:
                    try:
                        reader, writer = await asyncio.open_connection(LOOPBACK, port)
                    except ConnectionResetError:
                        pass  # the RST beat connect()'s return
                    else:
                        await expect_reset(reader)
                        writer.close()
                finally:
                    await listeners.stop()
                tunnel = await Tunnel.open(server.uds)
                try:
                    dialed = await tunnel.dial(f"127.0.0.1:{echo_port}")
                    assert not dialed.error and dialed.connect_id == 1  # upstream's IDs
                    tunnel.write(b"ping")
                    assert await tunnel.read_exactly(4) == b"ping"
                finally:
                    await tunnel.aclose()
            finally:
                client.close()
                await echo.close()

    run(main())


# -- connection IDs ------------------------------------------------------------------------


@pytest.mark.parametrize("negotiated", [True, False])
def test_forward_ids_even_only_when_negotiated(run: RunFn, certs: Certs, negotiated: bool) -> None:
    async def main() -> None:
        echo = EchoServer()
        echo_port = await echo.start()
        try:
            async with rig(certs, capable=negotiated) as r:
                call = r.calls[0]
                ids = []
                for rnd in (11, 12, 13):
                    send(
                        call,
                        Packet(
                            PacketType.DIAL_REQ,
                            DialRequest("tcp", f"127.0.0.1:{echo_port}", rnd),
                        ),
                    )
                    packet = await recv(call)
                    assert isinstance(packet.payload, DialResponse), packet
                    assert packet.payload.random == rnd and not packet.payload.error
                    ids.append(packet.payload.connect_id)
                assert ids == ([2, 4, 6] if negotiated else [1, 2, 3])
        finally:
            await echo.close()

    run(main())


# -- leaving while pending, timeouts, late answers ------------------------------------------


def test_client_leaving_while_pending_sends_dial_cls(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs) as r:
            call = r.calls[0]
            _, writer = await r.local()
            req = dial_req(await recv(call))
            writer.close()
            packet = await recv(call)
            assert packet == Packet(PacketType.DIAL_CLS, CloseDial(random=req.random))
            send(call, rsp(req.random, cid=9))  # the server's dial finished anyway
            assert await recv(call) == Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=9))
            await silent(call)

    run(main())


def test_timeout_resets_client_and_late_answer_is_closed(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs, servers=2, dial_timeout=0.4) as r:
            reader, _ = await r.local()
            index, packet = await first_of(r.calls)
            req = dial_req(packet)
            call = r.calls[index]
            packet = await recv(call, 5)
            assert packet == Packet(PacketType.DIAL_CLS, CloseDial(random=req.random))
            await expect_reset(reader)
            await silent(r.calls[1 - index])  # a timeout is not retried
            send(call, rsp(req.random, cid=11))
            assert await recv(call) == Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=11))
            assert count(r.port, rmetrics.TIMEOUT) == 1

    run(main())


def test_stream_loss_resets_only_its_connections(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs, servers=2) as r:
            opened = []
            for cid in (1, 3):
                reader, writer = await r.local()
                index, packet = await first_of(r.calls)
                send(r.calls[index], rsp(dial_req(packet).random, cid=cid))
                opened.append((index, reader, writer))
            # least loaded first: one connection on each server
            assert {index for index, _, _ in opened} == {0, 1}
            (lost_i, lost_reader, _), (kept_i, kept_reader, kept_writer) = sorted(
                opened, key=lambda o: o[0]
            )
            r.fakes[lost_i].drop_connections()
            await expect_reset(lost_reader, 10)
            kept_call = r.calls[kept_i]
            kept_writer.write(b"still here")
            packet = await recv(kept_call)
            assert isinstance(packet.payload, Data) and packet.payload.data == b"still here"
            cid = packet.payload.connect_id
            send(kept_call, data(cid, b"yes"))
            assert await asyncio.wait_for(kept_reader.readexactly(3), 10) == b"yes"
            # new connections go to the remaining server
            _, writer = await r.local()
            assert dial_req(await recv(kept_call)).address == DEST
            writer.close()

    run(main())


def test_draining_server_takes_no_new_connection(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with rig(certs, servers=2) as r:
            send(r.calls[0], Packet(PacketType.DRAIN))
            await asyncio.sleep(0.1)
            for _ in range(3):
                _, writer = await r.local()
                assert dial_req(await recv(r.calls[1])).address == DEST
                writer.close()
                await recv(r.calls[1])  # its DIAL_CLS
            await silent(r.calls[0])

    run(main())


# -- start-up ------------------------------------------------------------------------------


def test_local_port_in_use_fails_start(run: RunFn) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind((LOOPBACK, 0))
            taken.listen()
            port = taken.getsockname()[1]
            listeners = LocalListeners(
                NodeToCpConfig([PortMapping(port, "127.0.0.1", 6443)]), lambda: []
            )
            with pytest.raises(ListenError) as info:
                listeners.start()
            assert str(info.value) == (
                f"failed to start listening with listen tcp 127.0.0.1:{port}: "
                "bind: address already in use"
            )

    run(main())
