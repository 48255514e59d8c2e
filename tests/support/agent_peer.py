"""Independent peers for the proxy-server scenario tests, built on grpcio's asyncio API and
the protobuf runtime (``tests/support/oracle.py`` compiles our .proto with grpc_tools): nothing here
uses our codec or our HTTP/2 engine, so both ends of a tunnel are independent of the code
under test.

- ``TestAgent``: the agent side of ``/AgentService/Connect`` over TLS with client
  certificates. It sends ``agentid``/``agentidentifiers``, reads ``serverid``/
  ``servercount``, answers DIAL_REQ per a ``DialPolicy`` (dial a real TCP backend, a
  scripted error, DIAL_CLS, or hold it for the test to answer), relays DATA both ways one
  socket read per DATA, answers CLOSE_REQ with CLOSE_RSP (``Unknown connectID`` /
  ``unrecognized connectID`` for unknown IDs, as the upstream agent), sends CLOSE_RSP when its
  backend closes, can send DRAIN, can stall (stop reading its stream) and disconnect.
- ``GrpcDialer`` / ``ProxyStream``: a gRPC-mode frontend client (``/ProxyService/Proxy``),
  one channel per dial or many streams on one channel.
- ``open_http`` / ``connect_request``: an HTTP-CONNECT client on asyncio streams.
- ``backend(serve)``: a real TCP server on 127.0.0.1 running ``echo``, ``hello(greeting)``
  (writes, then closes) or ``bulk(blob, expect)`` (sends a known blob while hashing what it
  receives, then sends that hash).

Every packet a peer receives is kept (decoded, and as raw bytes for the agent) so a test can
assert exact sequences; ``wait_until`` and the ``wait_*`` methods poll those logs, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import grpc
import grpc.aio

from tests.support.oracle import pb2

CONNECT_PATH = "/AgentService/Connect"
PROXY_PATH = "/ProxyService/Proxy"
# The upstream agent reads its endpoint sockets 4 KiB at a time; bigger reads keep the
# 64 MiB transfers quick. One read is one DATA either way.
BACKEND_READ_SIZE = 64 << 10
# Packets queued for one stream's writer before producers wait (bounds a peer's memory when
# the server applies flow control).
SEND_QUEUE = 64
# gRPC's default receive limit, as upstream's processes use.
MAX_MESSAGE = 4 << 20
# How long a wait helper polls by default (a failing scenario fails well within
# pytest-timeout), and how often.
WAIT = 20.0
POLL = 0.005

Packet = Any  # a generated konnectivity_pb2.Packet


def P() -> Any:
    """The generated protobuf module."""
    return pb2()


# --- packets ------------------------------------------------------------------------------


def dial_req(address: str, random: int, protocol: str = "tcp") -> Packet:
    m = P()
    return m.Packet(
        type=m.DIAL_REQ,
        dialRequest=m.DialRequest(protocol=protocol, address=address, random=random),
    )


def dial_rsp(random: int, connect_id: int = 0, error: str = "") -> Packet:
    m = P()
    return m.Packet(
        type=m.DIAL_RSP,
        dialResponse=m.DialResponse(random=random, connectID=connect_id, error=error),
    )


def data(connect_id: int, payload: bytes) -> Packet:
    m = P()
    return m.Packet(type=m.DATA, data=m.Data(connectID=connect_id, data=payload))


def close_req(connect_id: int) -> Packet:
    m = P()
    return m.Packet(type=m.CLOSE_REQ, closeRequest=m.CloseRequest(connectID=connect_id))


def close_rsp(connect_id: int, error: str = "") -> Packet:
    m = P()
    return m.Packet(
        type=m.CLOSE_RSP, closeResponse=m.CloseResponse(connectID=connect_id, error=error)
    )


def dial_cls(random: int) -> Packet:
    m = P()
    return m.Packet(type=m.DIAL_CLS, closeDial=m.CloseDial(random=random))


def drain() -> Packet:
    m = P()
    p = m.Packet(type=m.DRAIN)
    p.drain.SetInParent()
    return p


def ptype(packet: Packet) -> str:
    """The packet's type name (``DIAL_REQ`` ...)."""
    return str(P().PacketType.Name(packet.type))


def _serialize(packet: Packet) -> bytes:
    out: bytes = packet.SerializeToString()
    return out


def _identity(raw: bytes) -> bytes:
    return raw


# --- waiting ------------------------------------------------------------------------------


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL)


def go_dial_error(address: str, exc: OSError) -> str:
    """A Go-shaped dial error text, as the upstream agent reports."""
    reason = (exc.strerror or str(exc)).lower()
    return f"dial tcp {address}: connect: {reason}"


# --- the agent ----------------------------------------------------------------------------


class DialPolicy(Enum):
    CONNECT = "connect"  # dial the address for real (TCP)
    ERROR = "error"  # answer DIAL_RSP{error=<dial_error>}
    DIAL_CLS = "dial_cls"  # answer DIAL_CLS{random}
    HOLD = "hold"  # keep it in ``held`` for the test to answer


@dataclass
class AgentConn:
    """One endpoint connection of the agent."""

    connect_id: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    received: int = 0  # bytes written to the backend
    sent: int = 0  # bytes read from the backend


@dataclass
class TestAgent:
    """A grpcio agent peer; ``start()`` connects, ``close()`` ends everything it made."""

    __test__ = False  # not a test class

    target: str
    credentials: grpc.ChannelCredentials
    agent_id: str | None = "agent-1"  # None: no agentid metadata
    identifiers: str | None = ""
    policy: DialPolicy = DialPolicy.CONNECT
    dial_error: str = "dial tcp 10.0.0.1:443: connect: connection refused"
    # Per-address policies override ``policy``.
    policies: dict[str, DialPolicy] = field(default_factory=dict)
    extra_metadata: tuple[tuple[str, str], ...] = ()
    # False: CLOSE_REQ is only recorded; the test sends the CLOSE_RSP itself.
    answer_close: bool = True

    headers: dict[str, str] = field(default_factory=dict)
    received: list[Packet] = field(default_factory=list)
    raw_received: list[bytes] = field(default_factory=list)
    held: dict[int, Packet] = field(default_factory=dict)  # random -> DIAL_REQ
    conns: dict[int, AgentConn] = field(default_factory=dict)
    status: grpc.StatusCode | None = None
    details: str | None = None

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None
        self._queue: asyncio.Queue[Packet | None] = asyncio.Queue(SEND_QUEUE)
        self._reading = asyncio.Event()
        self._reading.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()

    # --- lifecycle --------------------------------------------------------------------------

    def metadata(self) -> list[tuple[str, str]]:
        md = [] if self.agent_id is None else [("agentid", self.agent_id)]
        if self.identifiers is not None:
            md.append(("agentidentifiers", self.identifiers))
        return md + list(self.extra_metadata)

    async def open(self) -> None:
        """Open the channel and the Connect call (no headers awaited)."""
        options = [
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ]
        self._channel = grpc.aio.secure_channel(self.target, self.credentials, options=options)
        method = self._channel.stream_stream(
            CONNECT_PATH, request_serializer=_serialize, response_deserializer=_identity
        )
        self._call = method(metadata=tuple(self.metadata()))

    async def start(self) -> TestAgent:
        """Connect; returns once the server's response headers arrived (the server has
        registered the agent by then)."""
        await self.open()
        md = await self._call.initial_metadata()
        self.headers = {k: v for k, v in md}
        self._reader = self._spawn(self._read_loop())
        self._writer = self._spawn(self._write_loop())
        return self

    async def refused(self) -> tuple[grpc.StatusCode, str]:
        """For a Connect the server refuses: the status and message."""
        await self.open()
        code = await self._call.code()
        details = await self._call.details()
        md = await self._call.initial_metadata()
        self.headers = {k: v for k, v in md}
        self.status, self.details = code, details
        return code, details

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Graceful end: half-close, then tear down everything."""
        if self._call is not None and self._writer is not None and not self._writer.done():
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)  # the writer half-closes after what is queued
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._writer), 5)
        await self.disconnect()

    async def disconnect(self) -> None:
        """Abrupt end: cancel the call and close the channel, drop every backend socket."""
        if self._call is not None:
            self._call.cancel()
        for conn in list(self.conns.values()):
            self._drop(conn)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        for conn in list(self.conns.values()):
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
        self.conns.clear()
        if self._channel is not None:
            await self._channel.close()
        # Drop grpcio's objects: it closes the connection once they are collected.
        self._channel = self._call = None
        self.ended.set()

    # --- control ----------------------------------------------------------------------------

    async def send(self, packet: Packet) -> None:
        await self._queue.put(packet)

    async def send_drain(self) -> None:
        await self.send(drain())

    def stall(self) -> None:
        """Stop reading the stream (the server's sends then hit flow control)."""
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    async def answer(
        self,
        random: int,
        *,
        error: str = "",
        connect_id: int | None = None,
        address: str | None = None,
    ) -> int:
        """Answer a held dial: an error, a given connectID without dialling (a "late" or
        fake success), or a real dial of ``address`` (default: the request's)."""
        request = self.held.pop(random)
        if error:
            await self.send(dial_rsp(random, 0, error))
            return 0
        if connect_id is not None:
            await self.send(dial_rsp(random, connect_id))
            return connect_id
        target = address or request.dialRequest.address
        return await self._dial(random, target)

    # --- inspection ---------------------------------------------------------------------------

    def packets(self, kind: str) -> list[Packet]:
        return [p for p in self.received if ptype(p) == kind]

    async def wait_packet(
        self, kind: str, pred: Callable[[Packet], bool] = lambda p: True, timeout: float = WAIT
    ) -> Packet:
        def find() -> Packet | None:
            for p in self.received:
                if ptype(p) == kind and pred(p):
                    return p
            self._check_alive()
            return None

        return await wait_until(find, f"{kind} at agent {self.agent_id}", timeout)

    async def wait_held(self, count: int = 1, timeout: float = WAIT) -> list[int]:
        await wait_until(
            lambda: len(self.held) >= count or self._check_alive(), f"{count} held dials", timeout
        )
        return list(self.held)

    def _check_alive(self) -> None:
        if self._reader is not None and self._reader.done() and not self._reader.cancelled():
            exc = self._reader.exception()
            if exc is not None:
                raise AssertionError(f"agent {self.agent_id} reader failed: {exc!r}")

    # --- loops ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while (packet := await self._queue.get()) is not None:
            await self._call.write(packet)
        await self._call.done_writing()

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._reading.wait()
                raw = await self._call.read()
                if raw is grpc.aio.EOF:
                    break
                packet = P().Packet.FromString(raw)
                self.raw_received.append(raw)
                self.received.append(packet)
                await self._dispatch(packet)
        except grpc.aio.AioRpcError as exc:
            self.status, self.details = exc.code(), exc.details()
            return
        with contextlib.suppress(Exception):
            self.status = await self._call.code()
            self.details = await self._call.details()

    async def _dispatch(self, packet: Packet) -> None:
        kind = ptype(packet)
        if kind == "DIAL_REQ":
            request = packet.dialRequest
            policy = self.policies.get(request.address, self.policy)
            if policy is DialPolicy.HOLD:
                self.held[request.random] = packet
            elif policy is DialPolicy.ERROR:
                next(self._ids)  # a failed dial still uses up an ID, as upstream
                await self.send(dial_rsp(request.random, 0, self.dial_error))
            elif policy is DialPolicy.DIAL_CLS:
                await self.send(dial_cls(request.random))
            else:
                # Dial in the background: DIAL_REQs are handled concurrently.
                self._spawn(self._dial(request.random, request.address))
        elif kind == "DATA":
            connect_id = packet.data.connectID
            if connect_id == 0:
                return
            conn = self.conns.get(connect_id)
            if conn is None:
                await self.send(close_rsp(connect_id, "unrecognized connectID"))
                return
            conn.writer.write(packet.data.data)
            conn.received += len(packet.data.data)
            with contextlib.suppress(ConnectionError):
                await conn.writer.drain()
        elif kind == "CLOSE_REQ" and self.answer_close:
            connect_id = packet.closeRequest.connectID
            conn = self.conns.pop(connect_id, None)
            if conn is None:
                await self.send(close_rsp(connect_id, "Unknown connectID"))
                return
            self._drop(conn)
            await self.send(close_rsp(connect_id))
        # DIAL_CLS, DRAIN, CLOSE_RSP, DIAL_RSP: ignored, as the upstream agent.

    async def _dial(self, random: int, address: str) -> int:
        connect_id = next(self._ids)
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            await self.send(dial_rsp(random, 0, go_dial_error(address, exc)))
            return 0
        conn = AgentConn(connect_id, reader, writer)
        self.conns[connect_id] = conn
        await self.send(dial_rsp(random, connect_id))
        conn.task = self._spawn(self._relay(conn))
        return connect_id

    async def _relay(self, conn: AgentConn) -> None:
        """Backend -> server, one DATA per read; EOF: CLOSE_RSP, unsolicited."""
        with contextlib.suppress(ConnectionError):
            while chunk := await conn.reader.read(BACKEND_READ_SIZE):
                conn.sent += len(chunk)
                await self.send(data(conn.connect_id, chunk))
        if self.conns.pop(conn.connect_id, None) is conn:
            conn.task = None  # it is us: do not cancel ourselves
            self._drop(conn)
            await self.send(close_rsp(conn.connect_id))

    def _drop(self, conn: AgentConn) -> None:
        if conn.task is not None:
            conn.task.cancel()
        conn.writer.close()


def agent_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


# --- the gRPC frontend dialer -----------------------------------------------------------------


class ProxyStream:
    """One ``/ProxyService/Proxy`` call of a ``GrpcDialer``."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.received: list[Packet] = []
        self._lock = asyncio.Lock()

    async def send(self, packet: Packet) -> None:
        async with self._lock:
            await self.call.write(packet)

    async def recv(self, timeout: float = WAIT) -> Packet | None:
        """The next packet, or None at the end of the stream."""
        raw = await asyncio.wait_for(self.call.read(), timeout)
        if raw is grpc.aio.EOF:
            return None
        packet = P().Packet.FromString(raw)
        self.received.append(packet)
        return packet

    async def expect(self, kind: str, timeout: float = WAIT) -> Packet:
        packet = await self.recv(timeout)
        assert packet is not None, f"stream ended, expected {kind}"
        assert ptype(packet) == kind, f"expected {kind}, got {packet}"
        return packet

    async def dial(self, address: str, random: int) -> Packet:
        """DIAL_REQ and its answer (a DIAL_RSP or DIAL_CLS)."""
        await self.send(dial_req(address, random))
        packet = await self.recv()
        assert packet is not None, "stream ended during dial"
        return packet

    async def connect(self, address: str, random: int) -> int:
        """A dial that must succeed: its connectID."""
        rsp = await self.dial(address, random)
        assert ptype(rsp) == "DIAL_RSP" and not rsp.dialResponse.error, rsp
        assert rsp.dialResponse.random == random
        return int(rsp.dialResponse.connectID)

    async def read_data(self, connect_id: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            packet = await self.expect("DATA")
            assert packet.data.connectID == connect_id
            out += packet.data.data
        return bytes(out)

    async def end(self) -> grpc.StatusCode:
        """Half-close and read to the end: the status."""
        async with self._lock:
            await self.call.done_writing()
        while await self.recv() is not None:
            pass
        code: grpc.StatusCode = await self.call.code()
        return code

    def cancel(self) -> None:
        self.call.cancel()


class GrpcDialer:
    """A frontend client on grpcio: one channel, any number of ``Proxy`` streams."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None) -> None:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE)]
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            options.append(("grpc.ssl_target_name_override", "localhost"))
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._method = self.channel.stream_stream(
            PROXY_PATH, request_serializer=_serialize, response_deserializer=_identity
        )
        self.streams: list[ProxyStream] = []

    def stream(self) -> ProxyStream:
        s = ProxyStream(self._method(metadata=(("user-agent-test", "scenarios"),)))
        self.streams.append(s)
        return s

    async def close(self) -> None:
        for s in self.streams:
            s.call.cancel()
            s.call = None  # grpcio closes the connection once its objects are collected
        await self.channel.close()
        del self.channel, self._method


# --- HTTP-CONNECT client ----------------------------------------------------------------------


@dataclass
class HttpTunnel:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    head: bytes = b""  # the response head, when read

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def open_http(
    uds: str | None, port: int | None, ssl_ctx: ssl.SSLContext | None
) -> HttpTunnel:
    if uds is not None:
        reader, writer = await asyncio.open_unix_connection(uds)
    else:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ssl_ctx, server_hostname="localhost"
        )
    return HttpTunnel(reader, writer)


def connect_request(address: str) -> bytes:
    return f"CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode()


# --- backends -------------------------------------------------------------------------------


@dataclass
class Backend:
    """A TCP server on 127.0.0.1 and the connections it accepted."""

    server: asyncio.Server
    accepted: int = 0
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        self.server.close()
        # Closing a connection ends its handler (its reads see EOF); cancelling the handler
        # instead makes asyncio's stream callback log the CancelledError.
        for writer in list(self.writers):
            writer.transport.abort()
        if self.tasks:
            _, late = await asyncio.wait(list(self.tasks), timeout=WAIT)
            for task in late:
                task.cancel()
        await self.server.wait_closed()


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


@contextlib.asynccontextmanager
async def backend(serve: Serve) -> AsyncIterator[Backend]:
    holder: list[Backend] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        b = holder[0]
        b.accepted += 1
        b.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        b.tasks.add(task)
        try:
            with contextlib.suppress(ConnectionError):
                await serve(reader, writer)
        finally:
            writer.close()
            b.writers.discard(writer)
            b.tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20)
    holder.append(Backend(server))
    try:
        yield holder[0]
    finally:
        await holder[0].close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(BACKEND_READ_SIZE):
        writer.write(chunk)
        await writer.drain()


def hello(greeting: bytes) -> Serve:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()

    return serve


def bulk(blob: bytes, expect: int) -> Serve:
    """Send ``blob`` while reading ``expect`` bytes; then send the SHA-256 of what was read."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            view = memoryview(blob)
            for i in range(0, len(blob), 1 << 20):
                writer.write(view[i : i + (1 << 20)])
                await writer.drain()

        sender = asyncio.get_running_loop().create_task(send())
        digest = hashlib.sha256()
        left = expect
        try:
            while left:
                chunk = await reader.read(min(left, 1 << 20))
                if not chunk:
                    return
                digest.update(chunk)
                left -= len(chunk)
            await sender
            writer.write(digest.digest())
            await writer.drain()
            await reader.read(1)  # until the client closes
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    return serve
