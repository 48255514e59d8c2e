"""One gRPC call (one HTTP/2 stream) as the application sees it: ``GrpcCall``.

A call is either read with ``recv()`` from a task, or, in the callback style that a proxy
with thousands of idle tunnels needs, delivered to a ``CallSink`` (no task per call).

A call does not know its connection's class, as h2's and aioquic's streams do not: it
drives the engine through ``CallHost``, the five members of its connection it needs
(``transport.grpc.GrpcProtocol`` is the host), and the host reports what happened on the
stream through the call's event methods: ``_on_headers``, ``_on_message``, ``_on_end``,
``_on_outcome``, ``_on_closed`` and ``_on_flushed``. Those are the host's interface, not the
application's. One shortcut, for the data path: a host hands a message straight to the
call's ``sink`` when it has one, which is what ``_on_message`` would do, less a frame.

Invariants:
- Each call buffers received messages up to ``CALL_RECV_HIGH_WATER`` bytes; beyond that its
  HTTP/2 stream is paused (no window given back), so a slow reader stalls only its own
  stream, never the connection.
- ``_on_closed`` is a call's one teardown, whether its stream closed or its connection was
  lost: it runs once, and after it ``closed`` and ``headers_received`` are done, ``recv()``
  returns None, the sink has heard ``on_closed`` and no drain callback is left waiting.
- Nothing is sent on a call after ``closed`` resolved.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from konnectivity_fast.wire.errors import StatusCode

if TYPE_CHECKING:  # only a type here: the engine is loaded, checked, by transport.grpc
    from konnectivity_fast._wire import H2Connection

# Bytes a call may hold in received-but-unread messages before its stream is paused. It is
# the per-call share of inbound memory on top of the HTTP/2 window.
CALL_RECV_HIGH_WATER = 1 << 20
# Bytes of application output queued on one call above which ``GrpcCall.drain()`` waits.
CALL_SEND_HIGH_WATER = 1 << 20
# What a drain callback waits for (``when_drained``, ``when_room``): queued output, the part
# of it the peer does not let out now, or room for a message to go out at once.
_PENDING, _UNSENT, _ROOM = 0, 1, 2
# The code ``closed`` resolves with when the connection was lost rather than the stream
# closed (RST_STREAM codes are unsigned).
CLOSED_LOST = -1
Metadata = list[tuple[str, str]]


class GrpcError(Exception):
    """A call that ended with a non-OK status."""

    def __init__(self, status: int, message: str) -> None:
        known = status in StatusCode._value2member_map_
        super().__init__(f"{StatusCode(status).name if known else status}: {message}")
        self.status = status
        self.message = message


class CallSink(Protocol):
    """Callback-style receiver of one call's input, for services that keep no task per
    call (a proxy holds thousands of idle tunnels). ``GrpcCall.recv`` is not used then."""

    def on_message(self, call: GrpcCall, message: bytes) -> None: ...
    def on_end(self, call: GrpcCall) -> None: ...
    def on_closed(self, call: GrpcCall, error_code: int) -> None: ...


class CallHost(Protocol):
    """What a call needs from its connection (``transport.grpc.GrpcProtocol``)."""

    @property
    def conn(self) -> H2Connection:
        """The connection's engine; the call's ``stream_id`` names its stream there."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the call's futures belong to."""

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is full: the peer is not reading."""

    def schedule_flush(self) -> None:
        """Send what the engine has queued, soon (once per loop turn)."""

    def watch_drain(self, call: GrpcCall) -> None:
        """Call ``call._on_flushed()`` after each flush until it returns True."""


def _wake_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class GrpcCall:
    """One gRPC call (one HTTP/2 stream), either role.

    Memory matters here (one per tunnel): slots, and the inbox and futures are made only
    when something waits on them."""

    __slots__ = (
        "_closed_code",
        "_closed_fut",
        "_drain_cbs",
        "_eof",
        "_headers_fut",
        "_headers_seen",
        "_host",
        "_inbox",
        "_inbox_bytes",
        "_paused",
        "_waiter",
        "message",
        "metadata",
        "path",
        "sink",
        "status",
        "stream_id",
        "trailers",
    )

    def __init__(self, host: CallHost, stream_id: int, path: str, metadata: Metadata) -> None:
        self._host = host
        self.stream_id = stream_id
        self.path = path
        #: Server role: the request metadata. Client role: the response headers, once there.
        self.metadata = metadata
        #: Client role: the call's outcome, once known.
        self.status: int | None = None
        self.message = ""
        self.trailers: Metadata = []
        self._inbox: collections.deque[bytes] | None = None
        self._inbox_bytes = 0
        self._paused = False
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain_cbs: list[tuple[int, int, Callable[[], None]]] | None = None
        self._headers_fut: asyncio.Future[Metadata] | None = None
        self._headers_seen = False
        self._closed_fut: asyncio.Future[int] | None = None
        self._closed_code: int | None = None
        #: The callback-style receiver of this call's input, if any (``set_sink``). A slot,
        #: not a property: the host reads it for every message (``GrpcProtocol._dispatch``).
        self.sink: CallSink | None = None

    @property
    def headers_received(self) -> asyncio.Future[Metadata]:
        """Client role: done with the response headers (``metadata``; [] when the call
        ended without any)."""
        if self._headers_fut is None:
            self._headers_fut = self._host.loop.create_future()
            if self._headers_seen:
                self._headers_fut.set_result(self.metadata)
        return self._headers_fut

    @property
    def closed(self) -> asyncio.Future[int]:
        """Done when the stream is gone, with its RST_STREAM code (0: clean;
        ``CLOSED_LOST``: the connection was lost)."""
        if self._closed_fut is None:
            self._closed_fut = self._host.loop.create_future()
            if self._closed_code is not None:
                self._closed_fut.set_result(self._closed_code)
        return self._closed_fut

    # -- receiving --

    def set_sink(self, sink: CallSink) -> None:
        """Receive this call's input by callbacks instead of ``recv()`` (client role; a
        callback-style service's calls get their sink from ``open_call``)."""
        self.sink = sink

    async def recv(self) -> bytes | None:
        """The next message, or None once the peer finished sending."""
        while not self._inbox:
            if self._eof or self._closed_code is not None:
                return None
            self._waiter = self._host.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        assert self._inbox is not None
        msg = self._inbox.popleft()
        self._inbox_bytes -= len(msg)
        if self._paused and self._inbox_bytes < CALL_RECV_HIGH_WATER // 2:
            self._paused = False
            self._host.conn.resume_reading(self.stream_id)
            self._host.schedule_flush()
        return msg

    def _end(self) -> None:
        self._eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- sending --

    def send(self, message: bytes | bytearray | memoryview) -> None:
        """Queue one message; it goes out with the next flush."""
        try:
            if self._closed_code is not None:
                raise KeyError(self.stream_id)
            self._host.conn.send_message(self.stream_id, message)
        except (KeyError, RuntimeError):
            # The stream is gone or finished (perhaps in events not yet dispatched).
            raise GrpcError(self.status or StatusCode.CANCELLED, "the call is closed") from None
        self._host.schedule_flush()

    def send_data_packet(self, connect_id: int, payload: bytes | bytearray | memoryview) -> None:
        """Queue the message ``Packet(DATA, Data(connect_id, data=payload))``, framed by the
        engine around ``payload`` (no copy into an encoded message)."""
        try:
            if self._closed_code is not None:
                raise KeyError(self.stream_id)
            self._host.conn.send_data_packet(self.stream_id, connect_id, payload)
        except (KeyError, RuntimeError):
            raise GrpcError(self.status or StatusCode.CANCELLED, "the call is closed") from None
        self._host.schedule_flush()

    async def drain(self) -> None:
        """Wait until this call's queued output is below ``CALL_SEND_HIGH_WATER``."""
        while self.outbound_pending() >= CALL_SEND_HIGH_WATER:
            waiter: asyncio.Future[None] = self._host.loop.create_future()
            self.when_drained(functools.partial(_wake_future, waiter))
            await waiter

    def when_drained(
        self,
        callback: Callable[[], None],
        *,
        below: int = CALL_SEND_HIGH_WATER,
        unsent: bool = False,
    ) -> None:
        """Call ``callback`` once, when this call's queued output is below ``below`` (with
        ``unsent``: when what the peer does not let out now, ``unsent()``, is) or the call
        is gone (soon, if that is already so). Any number of callbacks may wait: several
        tunnels share one agent's call."""
        self._watch(below, _UNSENT if unsent else _PENDING, callback)

    def when_room(self, callback: Callable[[], None], room: int) -> None:
        """Call ``callback`` once, when a message of ``room`` bytes queued now would go out
        at once (``send_room() >= room``), or the call is gone."""
        self._watch(room, _ROOM, callback)

    def _watch(self, level: int, kind: int, callback: Callable[[], None]) -> None:
        if self._drain_cbs is None:
            self._drain_cbs = []
        self._drain_cbs.append((level, kind, callback))
        self._host.watch_drain(self)

    def outbound_pending(self) -> int:
        """Bytes of this call's output queued and not yet sent (0 once it is gone)."""
        if self._closed_code is not None:
            return 0
        try:
            return self._host.conn.outbound_pending(self.stream_id)
        except (KeyError, RuntimeError):
            return 0

    def send_blocked(self) -> bool:
        """Whether output is queued that the peer is not letting through: its HTTP/2
        window is spent, or the socket's buffer is full (the peer does not read)."""
        if self.outbound_pending() == 0:
            return False
        window = self._send_window()
        return window is not None and (window == 0 or self._host.write_paused)

    def send_room(self) -> int:
        """Bytes a message queued now could send at once: the peer's HTTP/2 window left
        after what is already queued (0 while the socket's buffer is full)."""
        if self._host.write_paused or self._closed_code is not None:
            return 0
        window = self._send_window()
        return 0 if window is None else max(0, window - self.outbound_pending())

    def unsent(self) -> int:
        """Bytes queued on this call that cannot go out now: beyond the peer's HTTP/2
        window, or all of them while the socket's buffer is full. A message queued now
        waits behind these."""
        pending = self.outbound_pending()
        if pending == 0 or self._host.write_paused:
            return pending
        window = self._send_window()
        return 0 if window is None else max(0, pending - window)

    def _send_window(self) -> int | None:
        """The peer's HTTP/2 window for this stream (None once the stream is gone)."""
        try:
            return self._host.conn.send_window(self.stream_id)
        except (KeyError, RuntimeError):
            return None

    def pause_reading(self) -> None:
        """Callback style: stop giving this stream's window back, so its peer soon stops
        sending on it (only this stream: the connection window is unaffected)."""
        if not self._paused and self._closed_code is None:
            self._paused = True
            with contextlib.suppress(KeyError, RuntimeError):
                self._host.conn.pause_reading(self.stream_id)

    def resume_reading(self) -> None:
        """Undo ``pause_reading``."""
        if self._paused:
            self._paused = False
            if self._closed_code is None:
                with contextlib.suppress(KeyError, RuntimeError):
                    self._host.conn.resume_reading(self.stream_id)
                self._host.schedule_flush()

    def receive_window(self) -> int:
        """Bytes the peer may still send on this stream without more window from us."""
        if self._closed_code is not None:
            return 0
        try:
            return self._host.conn.receive_window(self.stream_id)
        except (KeyError, RuntimeError):
            return 0

    def grant_window(self, nbytes: int) -> int:
        """Paused: let the peer send up to ``nbytes`` more now (a WINDOW_UPDATE at the
        next flush), without resuming. Returns the bytes granted (never more than it
        sent while paused)."""
        if not self._paused or self._closed_code is not None or nbytes <= 0:
            return 0
        try:
            granted = self._host.conn.grant_window(self.stream_id, nbytes)
        except (KeyError, RuntimeError):
            return 0
        if granted:
            self._host.schedule_flush()
        return granted

    def send_headers(self, metadata: Iterable[tuple[str, str]]) -> None:
        """Server role: response headers carrying metadata."""
        self._host.conn.send_headers(self.stream_id, metadata)
        self._host.schedule_flush()

    def finish(self, status: int = 0, message: str = "") -> None:
        """Server role: end the call with a status."""
        if self._closed_code is None:
            with contextlib.suppress(KeyError, RuntimeError):
                self._host.conn.send_trailers(self.stream_id, status, message)
            self._host.schedule_flush()

    def done_writing(self) -> None:
        """Client role: half-close."""
        with contextlib.suppress(KeyError, RuntimeError):
            self._host.conn.end_stream(self.stream_id)
        self._host.schedule_flush()

    def cancel(self) -> None:
        """RST_STREAM CANCEL: the peer sees CANCELLED, and so do we."""
        if self.status is None:
            self.status, self.message = StatusCode.CANCELLED, "cancelled by this side"
        self._host.conn.reset_stream(self.stream_id)
        self._host.schedule_flush()

    async def wait_status(self) -> int:
        """Client role: wait for the outcome; the status code."""
        await self.closed
        assert self.status is not None
        return self.status

    # -- events, reported by the host --

    def _on_headers(self, metadata: Metadata) -> None:
        """Client role: the response headers arrived."""
        self.metadata = metadata
        self._headers_done()

    def _on_message(self, message: bytes) -> None:
        """A whole message arrived: to the sink, or into the inbox for ``recv()``."""
        sink = self.sink
        if sink is not None:
            sink.on_message(self, message)
            return
        if self._inbox is None:
            self._inbox = collections.deque()
        self._inbox.append(message)
        self._inbox_bytes += len(message)
        if not self._paused and self._inbox_bytes >= CALL_RECV_HIGH_WATER:
            self._paused = True
            self._host.conn.pause_reading(self.stream_id)
        self._wake()

    def _on_end(self) -> None:
        """Server role: the client half-closed (``recv()`` returns None once the inbox is
        empty)."""
        self._end()
        if self.sink is not None:
            self.sink.on_end(self)

    def _on_outcome(self, status: int, message: str, trailers: Metadata) -> None:
        """The call's outcome: the server's trailers (client role), or the failure this
        side sent (server role)."""
        self.status = status
        self.message = message
        self.trailers = trailers
        self._headers_done()
        self._end()

    def _on_closed(self, code: int, status: int | None, message: str) -> None:
        """The stream is gone, with RST_STREAM ``code`` (``CLOSED_LOST``: the connection
        was lost). ``status`` and ``message`` become the outcome if none is known yet (None
        leaves it unknown). The call's one teardown; later calls do nothing."""
        if self._closed_code is not None:
            return
        if self.status is None and status is not None:
            self.status = status
            self.message = message
        self._end()
        fut = self._headers_fut
        if fut is not None and not fut.done():
            if code == CLOSED_LOST:
                # No headers will come: whoever waits for them learns why.
                fut.set_exception(GrpcError(StatusCode.UNAVAILABLE, self.message))
                fut.exception()  # retrieved: nobody may be waiting
            else:
                fut.set_result(self.metadata)
        self._headers_seen = True
        self._closed_code = code
        closed = self._closed_fut
        if closed is not None and not closed.done():
            closed.set_result(code)
        if self.sink is not None:
            self.sink.on_closed(self, code)
        self._on_flushed()  # a closed call has nothing pending: its drain callbacks run

    def _on_flushed(self) -> bool:
        """The host flushed: run the drain callbacks whose condition holds (all of them,
        once closed). True when none are left waiting."""
        waiting = self._drain_cbs
        if waiting is None:
            return True
        pending = self.outbound_pending()
        unsent = -1  # measured when some callback asks for it
        ready: list[Callable[[], None]] = []
        keep: list[tuple[int, int, Callable[[], None]]] = []
        closed = self._closed_code is not None
        for entry in waiting:
            level, kind, callback = entry
            if kind == _PENDING:
                done = pending < level
            elif kind == _UNSENT:
                if unsent < 0:
                    unsent = self.unsent() if pending else 0
                done = unsent < level
            else:
                done = closed or self.send_room() >= level
            if done:
                ready.append(callback)
            else:
                keep.append(entry)
        self._drain_cbs = keep or None
        for callback in ready:
            callback()
        return self._drain_cbs is None

    def _headers_done(self) -> None:
        self._headers_seen = True
        fut = self._headers_fut
        if fut is not None and not fut.done():
            fut.set_result(self.metadata)


class CallbackService(Protocol):
    """A service in callback style: ``open_call`` returns the call's sink."""

    def open_call(self, call: GrpcCall) -> CallSink: ...


#: A coroutine run as a task per call, or a callback-style service.
Handler = Callable[[GrpcCall], Awaitable[None]] | CallbackService
