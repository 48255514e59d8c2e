"""Node-to-control-plane tunneling on the server (node-to-cp.v1, ``server.reverse``), over
loopback: our ``ProxyServer`` in process, a hand-driven agent stream (our transport's raw
gRPC client speaking ``/AgentService/Connect`` with the codec), and real TCP destinations.

Covered: an allowed dial gets odd connectIDs and carries several MiB byte-exact each way;
close from either side; a denied destination is answered at once and never connected to;
a destination that does not answer times out; DIAL_CLS while pending; the per-agent cap;
one agent stream's loss closes its own connections only; a stream that did not negotiate
gets upstream's behaviour (DIAL_REQ ignored); a destination that does not read slows
neither the other connections of its stream nor holds more than its credit window, and an
agent far past its credit loses that connection only; a local client that reads nothing
holds its destination at the window while the stream flows on; a flooding
destination shares the stream with forward tunnels and other connections; host-name
entries are resolved when dialling; shutdown DRAINs negotiated streams only; random packet
sequences never break the stream; the metrics count what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import pytest

from konnectivity_fast.metrics import node_to_cp as node_to_cp_metrics
from konnectivity_fast.metrics.registry import Registry
from konnectivity_fast.server import CONNECT_PATH, ProxyServer
from konnectivity_fast.server.reverse import ERR_PAST_CREDIT, NodeToCpConfig
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.tunnel.allowlist import parse_allowed_destinations
from konnectivity_fast.tunnel.flow import INITIAL_WINDOW, OVERSHOOT_LIMIT
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.contract import MD_CAPABILITIES, PROXY_PATH, Extension
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
from tests.support.inproc import serving

from .conftest import Certs, RunFn

pytestmark = pytest.mark.timeout(120)

LOOPBACK = "127.0.0.1"
WAIT = 20.0
CHUNK = 32 << 10
NODE_TO_CP = Extension.NODE_TO_CP


class Echo:
    """A TCP destination: echoes, or (``hold``) reads nothing; records connections."""

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.accepted = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        if self.hold:
            return
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()
            await self.server.wait_closed()


class HandAgent:
    """One agent stream driven by hand: packets out, packets in by kind. It keeps the
    reverse connections' credit as our agent does (docs/flow-control.md): ``send_bytes``
    waits for credit, and DATA received is granted back at once unless ``granting`` is
    off (a local client that reads nothing)."""

    def __init__(self, proto: kgrpc.GrpcProtocol, call: kgrpc.GrpcCall) -> None:
        self.proto = proto
        self.call = call
        self.credit: dict[int, int] = {}  # what we may still send, per connection
        self.granting = True
        self.dial_rsp: dict[int, asyncio.Future[DialResponse]] = defaultdict(
            asyncio.get_running_loop().create_future
        )
        self.close_rsp: dict[int, asyncio.Future[CloseResponse]] = defaultdict(
            asyncio.get_running_loop().create_future
        )
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.others: list[Packet] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while (message := await self.call.recv()) is not None:
            packet = decode_packet(message)
            payload = packet.payload
            future: asyncio.Future[DialResponse] | asyncio.Future[CloseResponse] | None = None
            if isinstance(payload, DialResponse):
                future = self.dial_rsp[payload.random]
                if payload.connect_id and not payload.error:
                    self.credit[payload.connect_id] = INITIAL_WINDOW
            elif isinstance(payload, FlowCredit):
                self.credit[payload.connect_id] = self.credit.get(payload.connect_id, 0)
                self.credit[payload.connect_id] += payload.bytes
            elif isinstance(payload, CloseResponse):
                future = self.close_rsp[payload.connect_id]
            if future is not None and not future.done():
                future.set_result(payload)  # type: ignore[arg-type]
            elif future is not None:
                self.others.append(packet)  # one is expected: keep the rest for the test
            elif isinstance(payload, Data):
                self.data[payload.connect_id] += payload.data
                if self.granting and payload.connect_id & 1:
                    grant = FlowCredit(payload.connect_id, len(payload.data))
                    self.send(PacketType.FLOW_CREDIT, grant)
            else:
                self.others.append(packet)
            self.changed.set()

    def send(self, ptype: PacketType, payload: object) -> None:
        self.call.send(encode_packet(Packet(ptype, payload)))  # type: ignore[arg-type]

    async def dial(self, address: str, random_: int) -> DialResponse:
        self.send(PacketType.DIAL_REQ, DialRequest(protocol="tcp", address=address, random=random_))
        return await asyncio.wait_for(self.dial_rsp[random_], WAIT)

    async def send_bytes(self, connect_id: int, data: bytes, *, wait: bool = True) -> int:
        """Send ``data`` within the connection's credit, waiting for more (bounded) or,
        without ``wait``, stopping when it is spent; the bytes sent."""
        sent = 0
        deadline = time.monotonic() + WAIT
        while sent < len(data):
            if self.credit.get(connect_id, 0) <= 0:
                if not wait:
                    break
                self.changed.clear()
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no credit for connection {connect_id} after {sent}"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), remaining)
                continue
            chunk = data[sent : sent + CHUNK]
            self.send(PacketType.DATA, Data(connect_id=connect_id, data=chunk))
            self.credit[connect_id] -= len(chunk)
            sent += len(chunk)
            await self.call.drain()
        return sent

    async def received(self, connect_id: int, size: int) -> bytes:
        deadline = time.monotonic() + WAIT
        while len(self.data[connect_id]) < size:
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"got {len(self.data[connect_id])} of {size} bytes"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)
        return bytes(self.data[connect_id])

    async def close(self) -> None:
        self.reader.cancel()
        await self.proto.aclose()


@contextlib.asynccontextmanager
async def our_server(
    sock_dir: str,
    certs: Certs,
    allowed: list[str],
    *,
    dial_timeout: float = 5.0,
    max_per_agent: int = 1000,
) -> AsyncIterator[tuple[ProxyServer, int]]:
    config = NodeToCpConfig(parse_allowed_destinations(allowed), dial_timeout, max_per_agent)
    proxy = ProxyServer(server_id="s1", rng=random.Random(1), node_to_cp=config)
    async with serving(proxy, sock_dir, certs) as handle:
        assert handle.agent_port is not None
        yield proxy, handle.agent_port


async def hand_agent(certs: Certs, port: int, offer: str | None = NODE_TO_CP) -> HandAgent:
    ctx = tls.client_context(certs.ca, certs.client_cert, certs.client_key)
    proto = await kgrpc.connect(host=LOOPBACK, port=port, ssl=ctx, server_hostname="localhost")
    metadata = [("agentid", f"a{random.randrange(1 << 30)}")]
    if offer is not None:
        metadata.append((MD_CAPABILITIES, offer))
    call = proto.start_call(CONNECT_PATH, metadata=metadata)
    headers = dict(await asyncio.wait_for(call.headers_received, WAIT))
    if offer == NODE_TO_CP:
        assert headers.get(MD_CAPABILITIES) == NODE_TO_CP
    return HandAgent(proto, call)


def test_offered_only_with_an_allow_list(run: RunFn) -> None:
    async def main() -> None:
        assert NODE_TO_CP not in ProxyServer().extensions
        off = NodeToCpConfig(parse_allowed_destinations([]))
        assert (
            NODE_TO_CP
            not in ProxyServer(node_to_cp=off, extensions=frozenset({NODE_TO_CP})).extensions
        )
        on = NodeToCpConfig(parse_allowed_destinations(["localhost:6443"]))
        assert NODE_TO_CP in ProxyServer(node_to_cp=on).extensions

    run(main())


def test_allowed_dial_echoes_mebibytes_and_closes_from_the_agent(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [echo.address]) as (proxy, port):
            agent = await hand_agent(certs, port)
            try:
                first = await agent.dial(echo.address, 7)
                second = await agent.dial(echo.address, 8)
                assert (first.error, first.connect_id) == ("", 1)
                assert (second.error, second.connect_id) == ("", 3)
                payload = os.urandom(4 << 20)
                await agent.send_bytes(1, payload)
                got = await agent.received(1, len(payload))
                assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
                # The other connection still works, and closes cleanly.
                await agent.send_bytes(3, b"ping")
                assert await agent.received(3, 4) == b"ping"
                agent.send(PacketType.CLOSE_REQ, CloseRequest(connect_id=3))
                rsp = await asyncio.wait_for(agent.close_rsp[3], WAIT)
                assert rsp.error == ""
                agent.send(PacketType.CLOSE_REQ, CloseRequest(connect_id=1))
                await asyncio.wait_for(agent.close_rsp[1], WAIT)
                assert not any(proxy.reverse[b].connections for b in proxy.reverse)
            finally:
                await agent.close()
                await echo.close()

    run(main())


def test_destination_close_sends_close_rsp_after_all_data(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        payload = os.urandom(3 << 20)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(payload)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, LOOPBACK, 0)
        address = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        async with our_server(sock_dir, certs, [address]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                assert (await agent.dial(address, 1)).connect_id == 1
                rsp = await asyncio.wait_for(agent.close_rsp[1], WAIT)
                assert rsp.error == ""
                assert bytes(agent.data[1]) == payload  # every byte before the CLOSE_RSP
            finally:
                await agent.close()
                server.close()

    run(main())


def test_denied_destination_is_answered_at_once_and_never_dialled(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        allowed = await Echo().start()
        forbidden = await Echo().start()
        async with our_server(sock_dir, certs, [allowed.address]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                started = time.monotonic()
                rsp = await agent.dial(forbidden.address, 99)
                assert time.monotonic() - started < 0.1
                assert rsp.error == f'destination "{forbidden.address}" not allowed'
                assert rsp.connect_id == 0
                await asyncio.sleep(0.2)
                assert forbidden.accepted == 0
            finally:
                await agent.close()
                await allowed.close()
                await forbidden.close()

    run(main())


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port whose accept queue is full: Linux drops SYNs, connect hangs."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect((LOOPBACK, port))
            fillers.append(s)
        time.sleep(0.2)
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_unanswered_destination_times_out(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        with black_hole() as port:
            address = f"{LOOPBACK}:{port}"
            async with our_server(sock_dir, certs, [address], dial_timeout=0.5) as (_, agent_port):
                agent = await hand_agent(certs, agent_port)
                try:
                    started = time.monotonic()
                    rsp = await agent.dial(address, 5)
                    assert 0.4 < time.monotonic() - started < 3
                    assert rsp.error == f"dial tcp {address}: i/o timeout"
                finally:
                    await agent.close()

    run(main())


def test_refused_destination_gets_go_error(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            address = f"{LOOPBACK}:{sock.getsockname()[1]}"
        async with our_server(sock_dir, certs, [address]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                rsp = await agent.dial(address, 5)
                assert rsp.error == f"dial tcp {address}: connect: connection refused"
            finally:
                await agent.close()

    run(main())


def test_dial_close_cancels_a_pending_dial(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        with black_hole() as port:
            address = f"{LOOPBACK}:{port}"
            async with our_server(sock_dir, certs, [address], dial_timeout=1.0) as (proxy, ap):
                agent = await hand_agent(certs, ap)
                try:
                    agent.send(
                        PacketType.DIAL_REQ, DialRequest(protocol="tcp", address=address, random=3)
                    )
                    await asyncio.sleep(0.1)
                    (reverse,) = proxy.reverse.values()
                    assert 3 in reverse.pending
                    agent.send(PacketType.DIAL_CLS, CloseDial(random=3))
                    await asyncio.sleep(1.5)  # past the dial timeout: no answer comes
                    assert not agent.dial_rsp[3].done()
                    assert not reverse.pending and not reverse.connections
                finally:
                    await agent.close()

    run(main())


def test_per_agent_cap(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [echo.address], max_per_agent=2) as (_, port):
            agent = await hand_agent(certs, port)
            other = await hand_agent(certs, port)
            try:
                assert (await agent.dial(echo.address, 1)).connect_id == 1
                assert (await agent.dial(echo.address, 2)).connect_id == 3
                rsp = await agent.dial(echo.address, 3)
                assert rsp.error == "too many agent-initiated connections (limit 2)"
                # The cap is per agent stream.
                assert (await other.dial(echo.address, 1)).connect_id == 1
                # Closing one frees its place.
                agent.send(PacketType.CLOSE_REQ, CloseRequest(connect_id=1))
                await asyncio.wait_for(agent.close_rsp[1], WAIT)
                assert (await agent.dial(echo.address, 4)).connect_id == 5
            finally:
                await agent.close()
                await other.close()
                await echo.close()

    run(main())


def test_stream_loss_closes_only_its_own_connections(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [echo.address]) as (proxy, port):
            lost = await hand_agent(certs, port)
            kept = await hand_agent(certs, port)
            try:
                assert (await lost.dial(echo.address, 1)).connect_id == 1
                assert (await kept.dial(echo.address, 1)).connect_id == 1
                await lost.close()  # the connection goes: its stream with it
                deadline = time.monotonic() + WAIT
                while len(proxy.reverse) != 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert len(proxy.reverse) == 1
                await kept.send_bytes(1, b"still here")
                assert await kept.received(1, 10) == b"still here"
            finally:
                await kept.close()
                await echo.close()

    run(main())


@pytest.mark.parametrize("offer", [None, "flow.v1"], ids=["silent", "other-extension"])
def test_stream_that_did_not_negotiate_ignores_dial_req(
    run: RunFn, sock_dir: str, certs: Certs, offer: str | None
) -> None:
    async def main() -> None:
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [echo.address]) as (proxy, port):
            agent = await hand_agent(certs, port, offer)
            try:
                agent.send(
                    PacketType.DIAL_REQ, DialRequest(protocol="tcp", address=echo.address, random=1)
                )
                agent.send(PacketType.DATA, Data(connect_id=1, data=b"x"))
                await asyncio.sleep(0.3)
                assert not agent.dial_rsp[1].done()
                assert echo.accepted == 0
                assert not proxy.reverse
            finally:
                await agent.close()
                await echo.close()

    run(main())


def test_unknown_odd_connection_is_answered_not_raised(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [echo.address]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                agent.send(PacketType.DATA, Data(connect_id=41, data=b"x"))
                rsp = await asyncio.wait_for(agent.close_rsp[41], WAIT)
                assert rsp.error == "unrecognized connectID"
                # The stream carries on.
                assert (await agent.dial(echo.address, 2)).connect_id == 1
            finally:
                await agent.close()
                await echo.close()

    run(main())


@contextlib.asynccontextmanager
async def stalled_and_echo(sock_dir: str, certs: Certs) -> AsyncIterator[HandAgent]:
    """Our server allowing a destination that reads nothing and an echo, and a hand agent
    with connection 1 open to the first and 3 to the second."""
    stalled = await Echo(hold=True).start()
    echo = await Echo().start()
    async with our_server(sock_dir, certs, [stalled.address, echo.address]) as (_, port):
        agent = await hand_agent(certs, port)
        try:
            assert (await agent.dial(stalled.address, 1)).connect_id == 1
            assert (await agent.dial(echo.address, 2)).connect_id == 3
            yield agent
        finally:
            await agent.close()
            await stalled.close()
            await echo.close()


def test_destination_that_does_not_read_holds_only_its_window(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A destination that reads nothing: the agent's credit for it stops at the window
    (plus what the destination's socket took before it filled), the connection stays
    open, and the stream's other connections keep flowing."""

    async def main() -> None:
        async with stalled_and_echo(sock_dir, certs) as agent:
            flood = os.urandom(32 << 20)
            sent = await agent.send_bytes(1, flood, wait=False)
            for _ in range(50):  # grants for what the kernel took, until none come
                await asyncio.sleep(0.05)
                sent += await agent.send_bytes(1, flood[sent:], wait=False)
            # The window, what the loopback socket pair buffers, and one grant more.
            assert INITIAL_WINDOW <= sent < 16 << 20, sent
            # The stream still flows: were it paused, this echo would never come.
            await agent.send_bytes(3, b"hello")
            assert await agent.received(3, 5) == b"hello"
            assert not agent.close_rsp[1].done()  # never closed for being slow

    run(main())


def test_agent_far_past_its_credit_loses_that_connection_only(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with stalled_and_echo(sock_dir, certs) as agent:
            flood = os.urandom(CHUNK)
            for _ in range((INITIAL_WINDOW + 2 * OVERSHOOT_LIMIT) // CHUNK):
                agent.send(PacketType.DATA, Data(connect_id=1, data=flood))
                await agent.call.drain()
                if agent.close_rsp[1].done():
                    break
            rsp = await asyncio.wait_for(agent.close_rsp[1], WAIT)
            assert rsp.error == ERR_PAST_CREDIT
            await agent.send_bytes(3, b"hello")
            assert await agent.received(3, 5) == b"hello"

    run(main())


def test_local_client_that_reads_nothing_holds_only_its_window(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """The other direction: the agent grants nothing for a connection (its local client
    reads nothing); the server stops reading that destination at the credit, and another
    connection of the stream keeps its round trips."""

    async def main() -> None:
        flood = os.urandom(32 << 20)
        taken: list[int] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            for offset in range(0, len(flood), CHUNK):
                writer.write(flood[offset : offset + CHUNK])
                await writer.drain()
                taken.append(CHUNK)
            await reader.read()
            writer.close()

        server = await asyncio.start_server(serve, LOOPBACK, 0)
        busy = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [busy, echo.address]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                agent.granting = False
                assert (await agent.dial(busy, 1)).connect_id == 1
                await asyncio.sleep(0.5)
                got = len(agent.data[1])
                # The window, plus one read past the credit.
                assert INITIAL_WINDOW <= got < INITIAL_WINDOW + (256 << 10), got
                agent.granting = True
                assert (await agent.dial(echo.address, 2)).connect_id == 3
                for i in range(10):
                    await agent.send_bytes(3, b"%04d" % i)
                    await agent.received(3, 4 * (i + 1))
                assert len(agent.data[1]) == got  # still nothing granted for it
                assert sum(taken) < len(flood)  # and the destination is held back
            finally:
                await agent.close()
                await echo.close()
                server.close()

    run(main())


def test_busy_destination_does_not_starve_its_neighbours(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A destination that sends as fast as it can shares the stream: a round trip on
    another connection of the same stream stays short, and every byte arrives in order."""

    async def main() -> None:
        flood = os.urandom(32 << 20)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(flood)
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(serve, LOOPBACK, 0)
        busy = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [busy, echo.address]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                assert (await agent.dial(echo.address, 1)).connect_id == 1
                assert (await agent.dial(busy, 2)).connect_id == 3
                worst = 0.0
                for i in range(20):
                    started = time.monotonic()
                    await agent.send_bytes(1, b"%04d" % i)
                    await agent.received(1, 4 * (i + 1))
                    worst = max(worst, time.monotonic() - started)
                assert worst < 1.0
                got = await agent.received(3, len(flood))
                assert hashlib.sha256(got).digest() == hashlib.sha256(flood).digest()
            finally:
                await agent.close()
                await echo.close()
                server.close()

    run(main())


def test_metrics_count_dials_connections_and_bytes(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        registry = Registry()
        node_to_cp_metrics.enable(registry)
        text = registry.expose().decode()
        for name in ("dials_total", "dial_duration_seconds", "connections", "bytes_total"):
            assert f"# TYPE konnectivity_fast_server_agent_{name} " in text
        dials = node_to_cp_metrics.AGENT_DIALS
        before = {r: dials.labels(r).value for r in node_to_cp_metrics.DIAL_RESULTS}
        open_before = node_to_cp_metrics.AGENT_CONNECTIONS.value
        up = node_to_cp_metrics.AGENT_BYTES.labels(node_to_cp_metrics.TO_DESTINATION).value
        echo = await Echo().start()
        async with our_server(sock_dir, certs, [echo.address], max_per_agent=1) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                assert (await agent.dial(echo.address, 1)).connect_id == 1
                assert node_to_cp_metrics.AGENT_CONNECTIONS.value == open_before + 1
                await agent.dial(echo.address, 2)  # limit
                await agent.dial("localhost:1", 3)  # not allowed
                await agent.send_bytes(1, b"abc")
                await agent.received(1, 3)
                agent.send(PacketType.CLOSE_REQ, CloseRequest(connect_id=1))
                await asyncio.wait_for(agent.close_rsp[1], WAIT)
            finally:
                await agent.close()
                await echo.close()
        after = {r: dials.labels(r).value for r in node_to_cp_metrics.DIAL_RESULTS}
        assert {r: after[r] - before[r] for r in after} == {
            "ok": 1,
            "not_allowed": 1,
            "dial_error": 0,
            "timeout": 0,
            "canceled": 0,
            "limit": 1,
        }
        assert node_to_cp_metrics.AGENT_CONNECTIONS.value == open_before
        assert node_to_cp_metrics.AGENT_BYTES.labels("to_destination").value == up + 3

    run(main())


def test_shutdown_drains_negotiated_streams_only(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with our_server(sock_dir, certs, ["localhost:6443"]) as (proxy, port):
            ours = await hand_agent(certs, port)
            plain = await hand_agent(certs, port, None)
            try:
                proxy.drain_agents()
                deadline = time.monotonic() + WAIT
                while not ours.others and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                assert [p.type for p in ours.others] == [PacketType.DRAIN]
                await asyncio.sleep(0.2)
                assert plain.others == []
            finally:
                await ours.close()
                await plain.close()

    run(main())


def test_random_packets_never_break_the_stream(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """Whatever a negotiated agent sends (addresses, randoms, IDs of any parity, closes of
    unknown connections, cancels of unknown dials), the server answers or ignores it per
    packet, and the stream still dials and carries bytes afterwards."""

    async def main() -> None:
        rng = random.Random(18)
        echo = await Echo().start()
        addresses = [echo.address, "localhost:1", "", "[::1", "x" * 300, "*:1", "a:b:c", ":"]
        async with our_server(sock_dir, certs, [echo.address], max_per_agent=8) as (proxy, port):
            agent = await hand_agent(certs, port)
            try:
                for _ in range(400):
                    kind = rng.randrange(5)
                    conn = rng.randrange(0, 40)
                    if kind == 0:
                        request = DialRequest(
                            protocol=rng.choice(["tcp", "udp", ""]),
                            address=rng.choice(addresses),
                            random=rng.randrange(0, 50),
                        )
                        agent.send(PacketType.DIAL_REQ, request)
                    elif kind == 1:
                        agent.send(PacketType.DIAL_CLS, CloseDial(random=rng.randrange(0, 50)))
                    elif kind == 2:
                        agent.send(PacketType.DATA, Data(connect_id=conn, data=b"junk"))
                    elif kind == 3:
                        agent.send(PacketType.CLOSE_REQ, CloseRequest(connect_id=conn))
                    else:
                        agent.send(PacketType.CLOSE_RSP, CloseResponse(connect_id=conn))
                await asyncio.sleep(0.5)
                for reverse in list(proxy.reverse.values()):
                    for connect_id in list(reverse.connections):
                        agent.send(PacketType.CLOSE_REQ, CloseRequest(connect_id=connect_id))
                await asyncio.sleep(0.2)
                rsp = await agent.dial(echo.address, 1 << 40)
                assert rsp.error == "" and rsp.connect_id % 2 == 1
                await agent.send_bytes(rsp.connect_id, b"alive")
                data = await agent.received(rsp.connect_id, 5)
                assert data.endswith(b"alive")
            finally:
                await agent.close()
                await echo.close()

    run(main())


def test_host_name_entry_is_resolved_when_dialling(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """``localhost:<port>`` (each server's own kube-apiserver, k0s style): allowed by its
    exact entry, resolved by the server; its address written as a literal is not allowed."""

    async def main() -> None:
        echo = await Echo().start()
        name = f"localhost:{echo.port}"
        async with our_server(sock_dir, certs, [name]) as (_, port):
            agent = await hand_agent(certs, port)
            try:
                rsp = await agent.dial(f"LocalHost.:{echo.port}", 1)
                assert (rsp.error, rsp.connect_id) == ("", 1)
                await agent.send_bytes(1, b"hi")
                assert await agent.received(1, 2) == b"hi"
                denied = await agent.dial(echo.address, 2)
                assert denied.error == f'destination "{echo.address}" not allowed'
            finally:
                await agent.close()
                await echo.close()

    run(main())


def test_forward_tunnel_shares_the_stream_with_busy_reverse_connections(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A forward tunnel (kube-apiserver -> agent, even connectID) and agent-initiated
    connections (odd) on one agent stream: while one destination floods the stream and
    another takes nothing, forward round trips stay short and intact."""

    async def main() -> None:
        flood = os.urandom(32 << 20)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(flood)
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(serve, LOOPBACK, 0)
        busy = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        stalled = await Echo(hold=True).start()
        async with our_server(sock_dir, certs, [busy, stalled.address]) as (_, port):
            agent = await hand_agent(certs, port)
            frontend = await kgrpc.connect(path=os.path.join(sock_dir, "s1.sock"))
            try:
                proxy_call = frontend.start_call(PROXY_PATH, metadata=[])
                request = DialRequest(protocol="tcp", address="backend:80", random=77)
                proxy_call.send(encode_packet(Packet(PacketType.DIAL_REQ, request)))
                deadline = time.monotonic() + WAIT
                while not agent.others and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                (dial_req,) = agent.others
                assert dial_req.type == PacketType.DIAL_REQ
                agent.send(PacketType.DIAL_RSP, DialResponse(connect_id=2, random=77))
                answer = decode_packet(await asyncio.wait_for(proxy_call.recv(), WAIT) or b"")
                assert isinstance(answer.payload, DialResponse)
                assert answer.payload.connect_id == 2

                assert (await agent.dial(busy, 1)).connect_id == 1
                assert (await agent.dial(stalled.address, 2)).connect_id == 3
                await agent.send_bytes(3, os.urandom(4 << 20), wait=False)  # taken by nobody
                worst = 0.0
                for i in range(20):
                    started = time.monotonic()
                    text = b"%04d" % i
                    data = Data(connect_id=2, data=text)
                    proxy_call.send(encode_packet(Packet(PacketType.DATA, data)))
                    await agent.received(2, 4 * (i + 1))
                    agent.send(PacketType.DATA, Data(connect_id=2, data=text))
                    back = decode_packet(await asyncio.wait_for(proxy_call.recv(), WAIT) or b"")
                    assert isinstance(back.payload, Data) and back.payload.data == text
                    worst = max(worst, time.monotonic() - started)
                assert worst < 1.0
                got = await agent.received(1, len(flood))
                assert hashlib.sha256(got).digest() == hashlib.sha256(flood).digest()
            finally:
                await frontend.aclose()
                await agent.close()
                await stalled.close()
                server.close()

    run(main())
