"""Server peering in process (server.peering, tunnel.peering): two ``ProxyServer``s with
peer listeners over mTLS, listing each other; the agent is connected to s2 only, and the
frontends (HTTP-CONNECT and gRPC, on Unix sockets) to s1. Checked here, beyond
tests/interop/test_peering.py (real programs): the agent's side closing first reaches the
client through both servers and ends both sides; a stalled reader behind the peer link
does not hold up the other tunnels sharing that link and that agent (per-tunnel buffering
on both servers), and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from random import Random

from konnectivity_fast.metrics import peering as peer_metrics
from konnectivity_fast.server import ProxyServer, ServerHandle
from konnectivity_fast.server.buffering import RATIONED_WINDOW, BufferBudget
from konnectivity_fast.server.directory import ServerDirectory
from konnectivity_fast.server.http_connect import RESPONSE_200, start_http_connect_uds
from konnectivity_fast.server.listeners import (
    DEFAULT_TLS,
    start_agent_listener,
    start_frontend_uds,
)
from konnectivity_fast.server.peering import (
    PeerForwarder,
    peer_client_context,
    start_peer_listener,
    static_peers,
    union_peers,
)
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.tunnel import ERR_NO_AGENT
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.contract import PROXY_PATH
from konnectivity_fast.wire.endpoints import MD_FORWARDED_FROM, Address
from konnectivity_fast.wire.packets import (
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

from .conftest import Certs, RunFn
from .test_directory import lease
from .test_no_hol import CHUNK, StreamingAgent, pattern

STALLED_BYTES = 6 << 20  # within the default tunnel budget of either server
# Small enough that a stalled tunnel holds (rations) s1's peer stream, and s2's agent
# stream behind it: the rationing path on both servers, not only the buffering.
SMALL_BUDGET = 2 << 20
# More than what s1 takes for a stalled reader (its client's inbox and window, its budget),
# so the rest waits on s2.
BUDGETED_BYTES = 12 << 20
# Each dial asks the down peer first with probability 1/2: that none does is 2**-20.
DIALS_PAST_A_DOWN_PEER = 20
BUSY_TUNNELS = 4
BUSY_BYTES = 2 << 20


class ClosingAgent(StreamingAgent):
    """``once-<tag>-<size>``: the agent sends the pattern, then closes the connection
    itself (CLOSE_RSP, as an agent does when its backend closed first)."""

    def _dial(self, call: kgrpc.GrpcCall, dial: DialRequest) -> None:
        host = dial.address.rpartition(":")[0]
        if not host.startswith("once-"):
            super()._dial(call, dial)
            return
        connect_id, self.next_id = self.next_id, self.next_id + 1
        rsp = DialResponse(connect_id=connect_id, random=dial.random)
        call.send(encode_packet(Packet(PacketType.DIAL_RSP, rsp)))
        tag, size = (int(x) for x in host.removeprefix("once-").split("-"))
        task = asyncio.get_running_loop().create_task(
            self._once(call, connect_id, pattern(tag, size))
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _once(self, call: kgrpc.GrpcCall, connect_id: int, payload: bytes) -> None:
        await self._stream(call, connect_id, payload)
        close = CloseResponse(connect_id=connect_id)
        call.send(encode_packet(Packet(PacketType.CLOSE_RSP, close)))


@dataclass
class Pair:
    s1: ProxyServer
    s2: ProxyServer
    http_uds: str
    grpc_uds: str

    def idle(self) -> bool:
        """No tunnel, dial or peer stream left on either server."""
        return not (
            self.s1.router.backends
            or self.s1.router.frontends
            or self.s2.router.frontends
            or self.s2.router.established_connections
            or self.s2.router.pending_dials
        )


@contextlib.asynccontextmanager
async def peered(
    sock_dir: str,
    certs: Certs,
    tunnel_budget: int = 0,
    extra: dict[str, Address] | None = None,
    *,
    leases: bool = False,
) -> AsyncIterator[Pair]:
    """``tunnel_budget``: both servers' per-tunnel budget (0: the default). ``extra``: more
    peers in both lists. ``leases``: the peers come from each server's ``ServerDirectory``
    fed the other's Lease (its peer-endpoint annotation), not from a static list."""
    servers = [
        ProxyServer(
            server_id=f"s{i}",
            rng=Random(i),
            forward_dials=True,
            budget=BufferBudget(tunnel_budget=tunnel_budget) if tunnel_budget else None,
        )
        for i in (1, 2)
    ]
    handles = [ServerHandle(server) for server in servers]
    forwarders: list[PeerForwarder] = []
    agent = ClosingAgent()
    http_uds = os.path.join(sock_dir, "http.sock")
    grpc_uds = os.path.join(sock_dir, "grpc.sock")
    http = await start_http_connect_uds(servers[0], http_uds)
    try:
        handles[0].servers.append(await start_frontend_uds(servers[0], grpc_uds))
        ports = {}
        for server, handle in zip(servers, handles, strict=True):
            listener = await start_peer_listener(
                server,
                host="127.0.0.1",
                port=0,
                cert_file=certs.server_cert,
                key_file=certs.server_key,
                ca_file=certs.ca,
                tls_settings=DEFAULT_TLS,
            )
            handle.servers.append(listener)
            ports[server.server_id] = listener.sockets[0].getsockname()[1]
        peers = {sid: Address("127.0.0.1", port) for sid, port in ports.items()}
        peers.update(extra or {})
        context = peer_client_context(certs.ca, certs.server_cert, certs.server_key, DEFAULT_TLS)
        for server in servers:
            source = static_peers(peers)
            if leases:
                directory = ServerDirectory(server.server_id)
                now = datetime.now(UTC)
                directory.update(
                    [lease(sid, peer=str(address), renewed=now) for sid, address in peers.items()]
                )
                source = union_peers(static_peers({}), directory.peer_endpoints)
            forwarder = PeerForwarder(server, server_id=server.server_id, peers=source, ssl=context)
            server.forwarder = forwarder
            forwarders.append(forwarder)
        agents = await start_agent_listener(
            servers[1],
            host="127.0.0.1",
            port=0,
            cert_file=certs.server_cert,
            key_file=certs.server_key,
            client_ca_file=certs.ca,
        )
        handles[1].servers.append(agents)
        await agent.start(agents.sockets[0].getsockname()[1], certs)
        yield Pair(servers[0], servers[1], http_uds, grpc_uds)
    finally:
        await agent.close()
        for forwarder in forwarders:
            await forwarder.close()
        http.close()
        for handle in handles:
            await handle.close()
        await http.wait_closed()


async def wait_until(predicate: object, what: str) -> None:
    """Poll ``predicate()`` (the run fixture bounds the whole test)."""
    assert callable(predicate)
    while not predicate():
        await asyncio.sleep(0.01)


async def http_tunnel(pair: Pair, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # A small read limit: the client's own buffer must not hide a stalled reader.
    reader, writer = await asyncio.open_unix_connection(pair.http_uds, limit=CHUNK)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert await reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
    return reader, writer


async def grpc_tunnel(
    pair: Pair, target: str, random: int
) -> tuple[kgrpc.GrpcProtocol, kgrpc.GrpcCall, int]:
    proto = await kgrpc.connect(path=pair.grpc_uds)
    call = proto.start_call(PROXY_PATH)
    call.send(encode_packet(Packet(PacketType.DIAL_REQ, DialRequest("tcp", target, random))))
    message = await call.recv()
    assert message is not None
    rsp = decode_packet(message).payload
    assert isinstance(rsp, DialResponse) and not rsp.error, rsp
    assert rsp.random == random  # the frontend's own, not the one s1 sent to s2
    return proto, call, rsp.connect_id


async def grpc_read(call: kgrpc.GrpcCall, connect_id: int, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        message = await call.recv()
        assert message is not None
        payload = decode_packet(message).payload
        assert isinstance(payload, Data) and payload.connect_id == connect_id, payload
        received += payload.data
    return bytes(received)


def test_http_agent_closes_first(arun: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with peered(sock_dir, certs) as pair:
            reader, writer = await http_tunnel(pair, "once-5-300000:80")
            assert await reader.readexactly(300000) == pattern(5, 300000)
            assert await reader.read() == b""  # the agent's close reached the client
            writer.close()
            await writer.wait_closed()
            await wait_until(pair.idle, "both servers forget the tunnel")

    arun(main())


def test_peers_from_the_leases(arun: RunFn, sock_dir: str, certs: Certs) -> None:
    """The peer-endpoint annotation of the other server's Lease is a source of peers."""

    async def main() -> None:
        async with peered(sock_dir, certs, leases=True) as pair:
            reader, writer = await http_tunnel(pair, "once-8-5000:80")
            assert await reader.readexactly(5000) == pattern(8, 5000)
            writer.close()
            await writer.wait_closed()
            await wait_until(pair.idle, "both servers forget the tunnel")

    arun(main())


def test_grpc_echo_then_agent_closes_first(arun: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with peered(sock_dir, certs) as pair:
            proto, call, connect_id = await grpc_tunnel(pair, "once-6-200000:80", 77)
            assert await grpc_read(call, connect_id, 200000) == pattern(6, 200000)
            message = await call.recv()
            assert message is not None
            close = decode_packet(message).payload
            assert close == CloseResponse(connect_id=connect_id)
            call.done_writing()
            assert await call.wait_status() == 0
            await proto.aclose()
            await wait_until(pair.idle, "both servers forget the tunnel")

    arun(main())


def test_grpc_client_leaves_first(arun: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with peered(sock_dir, certs) as pair:
            proto, call, connect_id = await grpc_tunnel(pair, "echo:80", 78)
            call.send(encode_packet(Packet(PacketType.DATA, Data(connect_id, data=b"ping"))))
            assert await grpc_read(call, connect_id, 4) == b"ping"
            call.cancel()  # no CLOSE_REQ: the stream just goes
            await proto.aclose()
            await wait_until(pair.idle, "both servers forget the tunnel")

    arun(main())


def test_stalled_reader_behind_the_peer_does_not_block_neighbours(
    arun: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with peered(sock_dir, certs) as pair:
            # Not read: our client role pauses it once its inbox is full, so s1 buffers
            # for it (within its budget) while the other tunnels of the agent, on their
            # own peer streams to s2, carry on.
            proto, call, connect_id = await grpc_tunnel(pair, f"stream-98-{STALLED_BYTES}:80", 1)
            await wait_until(lambda: pair.s1.budget.total > 0, "the stalled stream blocks s1")

            async def busy(tag: int) -> bytes:
                reader, writer = await http_tunnel(pair, f"stream-{tag}-{BUSY_BYTES}:80")
                data = await reader.readexactly(BUSY_BYTES)
                writer.close()
                await writer.wait_closed()
                return data

            done = await asyncio.gather(*(busy(tag) for tag in range(BUSY_TUNNELS)))
            for tag, data in enumerate(done):
                assert data == pattern(tag, BUSY_BYTES)
            assert await grpc_read(call, connect_id, STALLED_BYTES) == pattern(98, STALLED_BYTES)
            await wait_until(lambda: pair.s1.budget.total == 0, "s1's charge is released")
            await proto.aclose()
            await wait_until(pair.idle, "both servers forget every tunnel")

    arun(main())


def test_stalled_reader_is_budgeted_on_both_servers(
    arun: RunFn, sock_dir: str, certs: Certs
) -> None:
    """Past s1's budget the peer stream is rationed, so s2 buffers for it in turn, within
    its own budget, and rations the agent's stream; once the reader reads, every byte
    arrives in order."""

    async def main() -> None:
        async with peered(sock_dir, certs, SMALL_BUDGET) as pair:
            proto, call, connect_id = await grpc_tunnel(pair, f"stream-97-{BUDGETED_BYTES}:80", 2)
            await wait_until(lambda: pair.s2.budget.total > 0, "s2 buffers behind s1")
            (agent,) = pair.s2.router.backends.values()
            await wait_until(lambda: pair.s2.budget.paused(agent.conn), "s2 rations its agent")
            # docs/data-path.md: a held tunnel overshoots its budget by its ration and the
            # message that crossed it.
            bound = SMALL_BUDGET + RATIONED_WINDOW + CHUNK
            assert pair.s1.budget.total <= bound
            assert pair.s2.budget.total <= bound
            received = await grpc_read(call, connect_id, BUDGETED_BYTES)
            assert received == pattern(97, BUDGETED_BYTES)
            await wait_until(lambda: pair.s2.budget.total == 0, "s2's charge is released")
            await proto.aclose()
            await wait_until(pair.idle, "both servers forget the tunnel")

    arun(main())


def dials(result: str) -> float:
    return peer_metrics.PEER_DIALS.labels(result).value


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_peer_is_skipped(arun: RunFn, sock_dir: str, certs: Certs) -> None:
    """A listed peer that is down costs one error count, not the dial: the next peer has
    the agent (the order is random, so the down one is met sooner or later), and the down
    one is not tried again for a while."""

    async def main() -> None:
        down = {"s3": Address("127.0.0.1", closed_port())}
        async with peered(sock_dir, certs, extra=down) as pair:
            errors, ok = dials("error"), dials("ok")
            for tag in range(DIALS_PAST_A_DOWN_PEER):
                reader, writer = await http_tunnel(pair, f"once-{tag}-1000:80")
                assert await reader.readexactly(1000) == pattern(tag, 1000)
                writer.close()
                await writer.wait_closed()
            assert dials("ok") - ok == DIALS_PAST_A_DOWN_PEER
            # Tried once, then skipped for PEER_RETRY_AFTER.
            assert dials("error") - errors == 1
            await wait_until(pair.idle, "both servers forget every tunnel")

    arun(main())


def test_stream_naming_a_forwarder_is_not_forwarded(
    arun: RunFn, sock_dir: str, certs: Certs
) -> None:
    """The hop limit holds on the ordinary frontend too: a stream that says it was
    forwarded gets upstream's error from s1 without s1 asking anyone."""

    async def main() -> None:
        async with peered(sock_dir, certs) as pair:
            asked = sum(dials(r) for r in ("ok", "no_agent", "error"))
            proto = await kgrpc.connect(path=pair.grpc_uds)
            call = proto.start_call(PROXY_PATH, [(MD_FORWARDED_FROM, "s9")])
            request = DialRequest("tcp", "once-1-10:80", 5)
            call.send(encode_packet(Packet(PacketType.DIAL_REQ, request)))
            message = await call.recv()
            assert message is not None
            assert decode_packet(message).payload == DialResponse(error=ERR_NO_AGENT, random=5)
            assert sum(dials(r) for r in ("ok", "no_agent", "error")) == asked
            await proto.aclose()

    arun(main())
