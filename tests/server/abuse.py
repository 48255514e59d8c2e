"""Helpers for the bad-input and half-open tests of the proxy-server.

- ``abused_server``: one in-process ``ProxyServer`` with every listener it can have (gRPC
  frontend on a Unix socket and on TCP+mTLS, HTTP-CONNECT frontend on a Unix socket and on
  TCP+mTLS, the agent listener with and without client certificates, the health server), an
  echoing agent made with grpcio, and two healthy tunnels (one gRPC, one HTTP-CONNECT) that
  keep echoing in the background while a test abuses the listeners.
- ``AbusedServer.unaffected()``: the healthy tunnels kept flowing and a new dial works on both
  frontends; ``no_leak(baseline)``: the process's fds and the server's state are back.
- Raw peers: ``raw_exchange`` writes bytes and reads until the server closes (or a timeout).

Packets are built with the official protobuf runtime (``oracle.pb2``), not our codec, and
the valid peers are grpcio: both are independent of the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from random import Random
from typing import Any, NamedTuple, TypeVar

import grpc
import grpc.aio

from konnectivity_fast.server import ProxyServer, ServerHandle
from konnectivity_fast.server.health import health_routes, start_http
from konnectivity_fast.server.http_connect import start_http_connect_tcp, start_http_connect_uds
from konnectivity_fast.server.listeners import (
    start_agent_listener,
    start_frontend_tcp,
    start_frontend_uds,
)
from konnectivity_fast.transport.grpc import GrpcServer
from konnectivity_fast.wire.contract import CONNECT_PATH, PROXY_PATH
from tests.support.net import Certs
from tests.support.oracle import pb2

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
ADDRESS = "10.0.0.1:443"
#: grpc-go's (and grpcio's) default receive limit (grpc-go server.go
#: defaultServerMaxReceiveMessageSize).
MAX_MESSAGE = 4 * 1024 * 1024
#: How long a peer waits for the server to answer or close before the test calls it stuck.
PEER_TIMEOUT = 10.0
#: Echo round trips each healthy tunnel must make after the abuse, to count as flowing.
ROUND_TRIPS_AFTER = 5
#: The upstream agent's answer to DATA or CLOSE_REQ for a connection it does not have.
UNKNOWN_CONNECT_ID = "Unknown connectID"

DIAL_REQ, DIAL_RSP, CLOSE_REQ, CLOSE_RSP, DATA, DIAL_CLS, DRAIN = range(7)


def packet(ptype: int, **payload: Any) -> bytes:
    """A serialized ``Packet`` of ``ptype`` with at most one payload member set, e.g.
    ``packet(DATA, data={"connectID": 1, "data": b"x"})``; ``{}`` sets an empty member."""
    msg = pb2().Packet(type=ptype)
    for member, fields in payload.items():
        sub = getattr(msg, member)
        sub.SetInParent()
        for name, value in fields.items():
            setattr(sub, name, value)
    data: bytes = msg.SerializeToString()
    return data


def parse(message: bytes) -> Any:
    msg = pb2().Packet()
    msg.ParseFromString(message)
    return msg


def count_fds(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def client_tls(
    certs: Certs | None,
    *,
    alpn: list[str] | None = None,
    client_cert: bool = True,
    ca: str | None = None,
) -> ssl.SSLContext:
    """A client context trusting ``certs.ca`` (or ``ca``), with the client certificate unless
    ``client_cert`` is false, offering ``alpn`` (None: no ALPN at all)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if ca is not None or certs is not None:
        ctx.load_verify_locations(cafile=ca or (certs.ca if certs else None))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if client_cert and certs is not None:
        ctx.load_cert_chain(certs.client_cert, certs.client_key)
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    return ctx


# --- the independent agent (grpcio) ---------------------------------------------------------


@dataclass
class GrpcioAgent:
    """An agent on grpcio that behaves like the upstream agent towards the server: DIAL_REQ
    succeeds for ``host:port`` (an address without a port fails as Go's dialer does), DATA is
    echoed, CLOSE_REQ is answered with CLOSE_RSP (``Unknown connectID`` if unknown)."""

    target: str
    certs: Certs
    agent_id: str = "abuse-agent"
    received: list[Any] = field(default_factory=list)
    connections: dict[int, bytearray] = field(default_factory=dict)
    channel: grpc.aio.Channel | None = None
    call: Any = None
    task: asyncio.Task[None] | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    async def start(self) -> None:
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.certs.ca_pem,
            private_key=self.certs.client_key_pem,
            certificate_chain=self.certs.client_cert_pem,
        )
        self.channel = grpc.aio.secure_channel(
            self.target, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        self.call = self.channel.stream_stream(CONNECT_PATH)(metadata=(("agentid", self.agent_id),))
        await self.call.initial_metadata()  # the server registered us before sending these
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def _reply(self, p: Any) -> bytes | None:
        if p.type == DIAL_REQ:
            address = p.dialRequest.address
            host, sep, port = address.rpartition(":")
            if not sep or not port.isdigit() or not host:
                error = f"dial tcp: address {address}: missing port in address"
                return packet(
                    DIAL_RSP, dialResponse={"random": p.dialRequest.random, "error": error}
                )
            cid = next(self._ids)
            self.connections[cid] = bytearray()
            return packet(DIAL_RSP, dialResponse={"random": p.dialRequest.random, "connectID": cid})
        if p.type == DATA:
            cid = p.data.connectID
            if cid not in self.connections:
                return packet(
                    CLOSE_RSP, closeResponse={"connectID": cid, "error": UNKNOWN_CONNECT_ID}
                )
            self.connections[cid] += p.data.data
            return packet(DATA, data={"connectID": cid, "data": p.data.data})
        if p.type == CLOSE_REQ:
            cid = p.closeRequest.connectID
            error = "" if self.connections.pop(cid, None) is not None else UNKNOWN_CONNECT_ID
            return packet(CLOSE_RSP, closeResponse={"connectID": cid, "error": error})
        return None

    async def _serve(self) -> None:
        while True:
            message = await self.call.read()
            if message is grpc.aio.EOF:
                return
            p = parse(message)
            self.received.append(p)
            reply = self._reply(p)
            if reply is not None:
                await self.call.write(reply)

    def data_for(self, connect_id: int) -> bytes:
        return bytes(self.connections.get(connect_id, b""))

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.task is not None:
            # Not ``await self.task``: that could swallow the caller's own cancellation.
            await asyncio.wait([self.task], timeout=PEER_TIMEOUT)
            if self.task.done() and not self.task.cancelled():
                self.task.exception()  # retrieved: a read error after close is expected


# --- frontends (grpcio and raw HTTP/1.1) ----------------------------------------------------


def grpcio_frontend_channel(uds: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"unix:{uds}")


async def grpcio_dial(
    channel: grpc.aio.Channel, random: int, address: str = ADDRESS
) -> tuple[Any, int]:
    """A ``Proxy`` call that dialled ``address``: (call, connectID)."""
    call = channel.stream_stream(PROXY_PATH)()
    await call.write(
        packet(DIAL_REQ, dialRequest={"protocol": "tcp", "address": address, "random": random})
    )
    rsp = parse(await asyncio.wait_for(call.read(), PEER_TIMEOUT))
    assert rsp.type == DIAL_RSP and rsp.dialResponse.random == random, rsp
    assert rsp.dialResponse.error == "", rsp
    return call, rsp.dialResponse.connectID


async def grpcio_echo(call: Any, connect_id: int, data: bytes) -> None:
    await call.write(packet(DATA, data={"connectID": connect_id, "data": data}))
    got = bytearray()
    while len(got) < len(data):
        p = parse(await asyncio.wait_for(call.read(), PEER_TIMEOUT))
        assert p.type == DATA and p.data.connectID == connect_id, p
        got += p.data.data
    assert bytes(got) == data


async def http_connect(
    uds: str, address: str = ADDRESS
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(uds)
    writer.write(f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PEER_TIMEOUT)
    assert head == b"HTTP/1.1 200 Connection Established\r\n\r\n", head
    return reader, writer


async def http_echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> None:
    writer.write(data)
    got = await asyncio.wait_for(reader.readexactly(len(data)), PEER_TIMEOUT)
    assert got == data


@dataclass
class Pinger:
    """A healthy tunnel echoing small messages in a loop until stopped."""

    name: str
    echo: Callable[[bytes], Any]
    round_trips: int = 0
    stopping: bool = False
    error: BaseException | None = None
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        rng = Random(self.name)
        try:
            while not self.stopping:
                await self.echo(rng.randbytes(rng.randrange(1, 2048)))
                self.round_trips += 1
                await asyncio.sleep(0.005)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.error = exc

    def check(self) -> None:
        assert self.error is None, f"{self.name} tunnel broke: {self.error!r}"
        assert self.task is not None and not self.task.done(), f"{self.name} tunnel stopped"

    async def flowing(self) -> None:
        """Wait until it made ``ROUND_TRIPS_AFTER`` more round trips, failing if it broke."""
        target = self.round_trips + ROUND_TRIPS_AFTER
        for _ in range(int(PEER_TIMEOUT / 0.01)):
            self.check()
            if self.round_trips >= target:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{self.name} tunnel stalled at {self.round_trips} round trips")

    async def stop(self) -> None:
        """Let the loop finish its round trip and stop. Not by cancelling it: cancelling a
        pending grpcio read sometimes never completes (grpcio 1.85)."""
        self.stopping = True
        if self.task is not None:
            await asyncio.wait([self.task], timeout=PEER_TIMEOUT + 1)
            if not self.task.done():
                self.task.cancel()
                await asyncio.wait([self.task], timeout=PEER_TIMEOUT)


# --- the abused server ----------------------------------------------------------------------


class TracebackTrap(logging.Handler):
    """Keeps the ERROR records with a traceback that our code logs: bad input must never
    reach the server's "unexpected exception" paths."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.found.append(f"{record.name}: {record.getMessage()} ({record.exc_info[1]!r})")


class State(NamedTuple):
    frontends: int
    backends: int
    pending_dials: int
    established: int
    grpc_connections: tuple[int, ...]  # per gRPC listener


@dataclass
class AbusedServer:
    proxy: ProxyServer
    handle: ServerHandle
    http_servers: list[asyncio.Server]
    certs: Certs
    grpc_uds: str
    http_uds: str
    grpc_tls: int = 0
    http_tls: int = 0
    agent_mtls: int = 0
    agent_tls: int = 0
    health: int = 0
    agent: GrpcioAgent | None = None
    channel: grpc.aio.Channel | None = None
    pingers: list[Pinger] = field(default_factory=list)
    tracebacks: TracebackTrap = field(default_factory=TracebackTrap)
    _closers: list[Callable[[], Any]] = field(default_factory=list)
    _randoms: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def next_random(self) -> int:
        return next(self._randoms)

    @property
    def agent_backend(self) -> Any:
        (backend,) = [b for b in self.proxy.router.backends.values() if b.agent_id == "abuse-agent"]
        return backend

    async def unaffected(self) -> None:
        """The healthy tunnels still flow, and a new dial works on both UDS frontends."""
        for pinger in self.pingers:
            await pinger.flowing()
        assert self.channel is not None
        call, cid = await grpcio_dial(self.channel, self.next_random())
        await grpcio_echo(call, cid, b"after the abuse")
        await call.done_writing()
        assert await asyncio.wait_for(call.code(), PEER_TIMEOUT) == grpc.StatusCode.OK
        reader, writer = await http_connect(self.http_uds)
        await http_echo(reader, writer, b"after the abuse, http")
        await close_writer(writer)
        for pinger in self.pingers:
            pinger.check()

    def state(self) -> State:
        """The router's frontends, backends, pending dials and established connections, and
        the connections each gRPC listener holds."""
        router = self.proxy.router
        return State(
            len(router.frontends),
            len(router.backends),
            router.pending_dials,
            router.established_connections,
            tuple(len(s.connections) for s in self.handle.servers if isinstance(s, GrpcServer)),
        )

    async def no_leak(self, fds: int, state: State) -> None:
        """Wait until the process has ``fds`` descriptors and the server ``state`` again."""
        now = (count_fds(), self.state())
        for _ in range(int(PEER_TIMEOUT / 0.02)):
            now = (count_fds(), self.state())
            if now == (fds, state):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"leak: fds/state {now}, expected {(fds, state)}")

    def describe(self) -> str:
        """The server's connections and calls, for a hang report."""
        lines = [f"state {self.state()} rounds {[p.round_trips for p in self.pingers]}"]
        for server in self.handle.servers:
            if not isinstance(server, GrpcServer):
                continue
            for proto in server.connections:
                transport = proto.transport
                reading = transport.is_reading() if transport is not None else None
                calls = [
                    f"{c.stream_id}:{c.path}:out={c.outbound_pending()}:paused={c._paused}"
                    for c in proto.calls.values()
                ]
                lines.append(f"conn reading={reading} wpaused={proto._write_paused} {calls}")
        return "\n".join(lines)

    def baseline(self) -> tuple[int, State]:
        return count_fds(), self.state()


async def _listen_all(proxy: ProxyServer, certs: Certs, sock_dir: str, env: AbusedServer) -> None:
    cert, key = certs.server_cert, certs.server_key
    servers = env.handle.servers
    servers.append(await start_frontend_uds(proxy, env.grpc_uds))
    grpc_tls = await start_frontend_tcp(
        proxy, host=LOOPBACK, port=0, client_ca_file=certs.ca, cert_file=cert, key_file=key
    )
    servers.append(grpc_tls)
    agent_mtls = await start_agent_listener(
        proxy, host=LOOPBACK, port=0, client_ca_file=certs.ca, cert_file=cert, key_file=key
    )
    servers.append(agent_mtls)
    agent_tls = await start_agent_listener(
        proxy, host=LOOPBACK, port=0, cert_file=cert, key_file=key
    )
    servers.append(agent_tls)
    env.http_servers.append(await start_http_connect_uds(proxy, env.http_uds))
    http_tls = await start_http_connect_tcp(
        proxy, host=LOOPBACK, port=0, client_ca_file=certs.ca, cert_file=cert, key_file=key
    )
    env.http_servers.append(http_tls)
    health = await start_http("health", LOOPBACK, 0, health_routes(lambda: proxy.router.ready))
    assert health is not None
    env.http_servers.append(health)
    env.grpc_tls = grpc_tls.sockets[0].getsockname()[1]
    env.agent_mtls = agent_mtls.sockets[0].getsockname()[1]
    env.agent_tls = agent_tls.sockets[0].getsockname()[1]
    env.http_tls = http_tls.sockets[0].getsockname()[1]
    env.health = health.sockets[0].getsockname()[1]


async def _healthy_tunnels(env: AbusedServer) -> None:
    env.agent = GrpcioAgent(f"{LOOPBACK}:{env.agent_mtls}", env.certs)
    await env.agent.start()
    env.channel = grpcio_frontend_channel(env.grpc_uds)
    call, cid = await grpcio_dial(env.channel, env.next_random())
    reader, writer = await http_connect(env.http_uds)
    env._closers.append(writer.close)
    env._closers.append(call.cancel)
    env.pingers = [
        Pinger("grpc", lambda data: grpcio_echo(call, cid, data)),
        Pinger("http-connect", lambda data: http_echo(reader, writer, data)),
    ]
    for pinger in env.pingers:
        pinger.start()
    for pinger in env.pingers:
        await pinger.flowing()


@contextlib.asynccontextmanager
async def abused_server(sock_dir: str, certs: Certs) -> AsyncIterator[AbusedServer]:
    proxy = ProxyServer(server_id="abused", rng=Random(1))
    env = AbusedServer(
        proxy,
        ServerHandle(proxy),
        [],
        certs,
        os.path.join(sock_dir, "grpc.sock"),
        os.path.join(sock_dir, "http.sock"),
    )
    HANG_DUMPS.append(env.describe)
    logging.getLogger("konnectivity_fast").addHandler(env.tracebacks)
    try:
        await _listen_all(proxy, certs, sock_dir, env)
        await _healthy_tunnels(env)
        yield env
    finally:
        logging.getLogger("konnectivity_fast").removeHandler(env.tracebacks)
        HANG_DUMPS.remove(env.describe)
        for pinger in env.pingers:
            await pinger.stop()
        for closer in env._closers:
            closer()
        if env.channel is not None:
            await env.channel.close()
        if env.agent is not None:
            await env.agent.close()
        for server in env.http_servers:
            server.close()
        await env.handle.close()


#: A test's own bound, below the ``run`` fixture's 60 s: on expiry the tasks' stacks are shown.
TEST_TIMEOUT = 45.0


#: Callables describing the server's state, shown when a test hangs.
HANG_DUMPS: list[Callable[[], str]] = []


def _await_chain(coro: Any) -> list[str]:
    """Where a suspended coroutine waits, outermost first (following ``cr_await``)."""
    parts: list[str] = []
    while coro is not None and len(parts) < 20:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is not None:
            parts.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return parts


async def bounded(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro``; if it takes over ``TEST_TIMEOUT``, fail with every task's stack (a
    plain cancellation could be swallowed by a peer library and pass as success)."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait([task], timeout=TEST_TIMEOUT)
    if not done:
        stacks = []
        for t in asyncio.all_tasks():
            stacks.append(f"{t.get_name()}: {' -> '.join(_await_chain(t.get_coro()))}")
        stacks += [dump() for dump in HANG_DUMPS]
        task.cancel()
        await asyncio.wait([task], timeout=5)
        raise AssertionError(f"hung for {TEST_TIMEOUT}s; tasks:\n" + "\n".join(stacks))
    return task.result()


# --- raw peers ------------------------------------------------------------------------------


@dataclass
class Exchange:
    """What a raw peer got back: the bytes, and how the connection ended."""

    reply: bytes
    closed: bool  # the server closed (EOF or reset) before the peer's timeout
    error: str = ""


async def raw_exchange(
    target: str | tuple[str, int],
    data: bytes | list[bytes] = b"",
    *,
    tls: ssl.SSLContext | None = None,
    timeout: float = PEER_TIMEOUT,
    stop_after: bytes | None = None,
) -> Exchange:
    """Connect (a Unix socket path or (host, port), with ``tls`` if given), send ``data`` (a
    list: written one part at a time), then read until the server closes, ``stop_after``
    appears in the reply, or ``timeout``."""
    reply = bytearray()
    try:
        if isinstance(target, str):
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(target, ssl=tls), timeout
            )
        else:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    *target, ssl=tls, server_hostname="localhost" if tls else None
                ),
                timeout,
            )
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        return Exchange(b"", True, f"{type(exc).__name__}: {exc}")
    closed, error = False, ""
    try:
        for part in data if isinstance(data, list) else [data]:
            writer.write(part)
            await writer.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), left)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            reply += chunk
            if stop_after is not None and stop_after in reply:
                break
    except (ssl.SSLError, ConnectionError, OSError) as exc:
        closed, error = True, f"{type(exc).__name__}: {exc}"
    finally:
        await close_writer(writer)
    return Exchange(bytes(reply), closed, error)


#: How long a test peer waits for its own close to finish: a TLS close waits for the
#: server's close_notify, which a server that stopped talking never sends.
CLOSE_WAIT = 1.0


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_WAIT)


def tcp_socket_count(port: int) -> int:
    """Established TCP sockets to ``port`` on loopback seen from /proc/net/tcp (both ends)."""
    hexport = f"{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1].endswith(":" + hexport) or fields[2].endswith(":" + hexport):
                count += 1
    return count


def unix_path_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    return s
