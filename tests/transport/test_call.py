"""``GrpcCall`` driven through its event methods, and ``GrpcProtocol`` as its host.

The first tests give a call a recording ``CallHost`` (no engine, no socket), so each event's
effect on the call is observed directly: the inbox's pause and resume of its stream, the
drain callbacks, and the one teardown (``_on_closed``) for a closed stream and for a lost
connection. The last ones drive a real ``GrpcProtocol`` (server role) with a client engine
pumped in memory, to check that the host reports both kinds of end through that teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from konnectivity_fast._compiled import require_compiled
from konnectivity_fast.transport.call import (
    CALL_RECV_HIGH_WATER,
    CALL_SEND_HIGH_WATER,
    CLOSED_LOST,
    GrpcCall,
    GrpcError,
)
from konnectivity_fast.transport.grpc import GrpcProtocol
from konnectivity_fast.wire.errors import StatusCode

w: Any = require_compiled()

STREAM = 1
# RST_STREAM codes (RFC 9113 section 7), written out here rather than taken from the engine.
NO_ERROR = 0x0
CANCEL = 0x8


class RecordingConn:
    """The engine calls a call makes, recorded; ``pending`` is its queued output."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.pending = 0

    def pause_reading(self, stream_id: int) -> None:
        self.log.append(("pause", stream_id))

    def resume_reading(self, stream_id: int) -> None:
        self.log.append(("resume", stream_id))

    def outbound_pending(self, stream_id: int) -> int:
        return self.pending


class RecordingHost:
    """A ``CallHost`` without a connection behind it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.conn = RecordingConn()
        self.loop = loop
        self.write_paused = False
        self.flushes = 0
        self.watched: list[GrpcCall] = []

    def schedule_flush(self) -> None:
        self.flushes += 1

    def watch_drain(self, call: GrpcCall) -> None:
        self.watched.append(call)


class RecordingSink:
    """A ``CallSink`` writing what it hears (and the call's state then) to a shared log."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        self.log.append(("message", message))

    def on_end(self, call: GrpcCall) -> None:
        self.log.append(("end",))

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        self.log.append(("closed", error_code, call.status, call.closed.done()))


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def host(loop: asyncio.AbstractEventLoop) -> RecordingHost:
    return RecordingHost(loop)


def new_call(host: RecordingHost) -> GrpcCall:
    return GrpcCall(host, STREAM, "/svc/Method", [])


def test_inbox_pauses_its_stream_and_recv_resumes_it(
    loop: asyncio.AbstractEventLoop, host: RecordingHost
) -> None:
    call = new_call(host)
    chunk = b"x" * (CALL_RECV_HIGH_WATER // 4)
    for _ in range(4):
        call._on_message(chunk)
    assert host.conn.log == [("pause", STREAM)]
    flushes = host.flushes
    for _ in range(2):
        assert loop.run_until_complete(call.recv()) == chunk
    assert host.conn.log == [("pause", STREAM)]  # half the high water left: still paused
    assert loop.run_until_complete(call.recv()) == chunk
    assert host.conn.log == [("pause", STREAM), ("resume", STREAM)]
    assert host.flushes == flushes + 1


def test_recv_after_the_end_drains_the_inbox_then_returns_none(
    loop: asyncio.AbstractEventLoop, host: RecordingHost
) -> None:
    call = new_call(host)
    call._on_message(b"one")
    call._on_end()
    assert loop.run_until_complete(call.recv()) == b"one"
    assert loop.run_until_complete(call.recv()) is None


def test_sink_receives_messages_and_the_end(host: RecordingHost) -> None:
    log: list[tuple[Any, ...]] = []
    call = new_call(host)
    call.set_sink(RecordingSink(log))
    call._on_message(b"m")
    call._on_end()
    assert log == [("message", b"m"), ("end",)]
    assert host.conn.log == []


def test_drain_callbacks_wait_for_the_flush_that_drains(host: RecordingHost) -> None:
    call = new_call(host)
    ran: list[str] = []
    host.conn.pending = CALL_SEND_HIGH_WATER
    call.when_drained(lambda: ran.append("drained"))
    assert host.watched == [call]
    assert call._on_flushed() is False
    host.conn.pending = CALL_SEND_HIGH_WATER - 1
    assert call._on_flushed() is True
    assert ran == ["drained"]


def test_lost_connection_is_one_teardown(
    loop: asyncio.AbstractEventLoop, host: RecordingHost
) -> None:
    log: list[tuple[Any, ...]] = []
    call = new_call(host)
    call.set_sink(RecordingSink(log))
    headers = call.headers_received
    host.conn.pending = CALL_SEND_HIGH_WATER  # a drain callback is left waiting
    call.when_drained(lambda: log.append(("drained",)))

    call._on_closed(CLOSED_LOST, StatusCode.UNAVAILABLE, "connection lost")

    assert (call.status, call.message) == (StatusCode.UNAVAILABLE, "connection lost")
    assert call.closed.result() == CLOSED_LOST
    exc = headers.exception()
    assert isinstance(exc, GrpcError) and exc.status == StatusCode.UNAVAILABLE
    # The sink hears first, with the call already closed; then waiting drains are released.
    assert log == [("closed", CLOSED_LOST, StatusCode.UNAVAILABLE, True), ("drained",)]
    assert loop.run_until_complete(call.recv()) is None

    call._on_closed(CANCEL, StatusCode.CANCELLED, "again")
    assert call.closed.result() == CLOSED_LOST
    assert call.status == StatusCode.UNAVAILABLE
    assert len(log) == 2


def test_closed_stream_keeps_a_known_outcome(host: RecordingHost) -> None:
    call = new_call(host)
    call._on_outcome(StatusCode.NOT_FOUND, "no such thing", [("k", "v")])
    call._on_closed(NO_ERROR, StatusCode.OK, "")
    assert (call.status, call.message, call.trailers) == (
        StatusCode.NOT_FOUND,
        "no such thing",
        [("k", "v")],
    )
    assert call.closed.result() == NO_ERROR


def test_closed_stream_without_headers_resolves_them_empty(host: RecordingHost) -> None:
    call = new_call(host)
    headers = call.headers_received
    call._on_closed(CANCEL, None, "")
    assert headers.result() == []
    assert call.status is None


def test_response_headers_resolve_the_waiter(host: RecordingHost) -> None:
    call = new_call(host)
    headers = call.headers_received
    call._on_headers([("serverid", "s1")])
    assert headers.result() == [("serverid", "s1")] == call.metadata


# -- GrpcProtocol as the host -----------------------------------------------------------


class MemoryTransport:
    """Collects what the protocol writes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


class SinkService:
    """A callback-style service whose calls share one recording sink."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.calls: list[GrpcCall] = []

    def open_call(self, call: GrpcCall) -> RecordingSink:
        self.calls.append(call)
        return RecordingSink(self.log)


def served(
    loop: asyncio.AbstractEventLoop,
) -> tuple[GrpcProtocol, MemoryTransport, Any, SinkService]:
    """A server-role protocol on a memory transport, and a client engine talking to it."""
    service = SinkService()
    proto = GrpcProtocol(True, service, loop=loop)
    transport = MemoryTransport()
    proto.connection_made(transport)
    client = w.H2Connection(False, now=loop.time())
    return proto, transport, client, service


def pump(proto: GrpcProtocol, transport: MemoryTransport, client: Any) -> None:
    for _ in range(100):
        data = client.data_to_send()
        if data:
            view = proto.get_buffer(len(data))
            view[: len(data)] = data
            proto.buffer_updated(len(data))
        answer = bytes(transport.out)
        transport.out.clear()
        if answer:
            client.receive_data(answer)
        if not data and not answer:
            return
    raise AssertionError("never quiet")


def test_host_reports_a_client_reset_as_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    proto, transport, client, service = served(loop)
    sid = client.start_request("/svc/Method")
    client.send_message(sid, b"hello")
    pump(proto, transport, client)
    (call,) = service.calls
    assert service.log == [("message", b"hello")]

    client.reset_stream(sid, CANCEL)
    pump(proto, transport, client)

    assert service.log[1:] == [("closed", CANCEL, StatusCode.CANCELLED, True)]
    assert proto.calls == {}
    assert call.closed.result() == CANCEL


def test_host_tears_every_call_down_when_the_connection_is_lost(
    loop: asyncio.AbstractEventLoop,
) -> None:
    proto, transport, client, service = served(loop)
    for _ in range(2):
        client.start_request("/svc/Method")
    pump(proto, transport, client)
    assert len(service.calls) == 2

    proto.connection_lost(None)

    assert service.log == [("closed", CLOSED_LOST, StatusCode.UNAVAILABLE, True)] * 2
    assert all(call.message == "connection lost" for call in service.calls)
    assert proto.calls == {}
