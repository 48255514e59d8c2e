"""asyncio adapter for the compiled HTTP/2 engine: one ``GrpcProtocol`` per connection.

``GrpcProtocol`` is an ``asyncio.BufferedProtocol``: the loop reads straight into a buffer
this object owns, which is handed whole to ``H2Connection.receive_data``; the events come
back and are dispatched to ``GrpcCall`` objects; output from every call is written in one
``transport.write`` per loop turn (``_schedule_flush``). The code runs on uvloop and on the
stdlib loop alike; nothing here imports uvloop.

The engine is typed by its stub (``konnectivity_fast/_wire.pyi``, kept exact by stubtest),
so mypy checks every call into it here. ``GrpcProtocol`` is the ``CallHost`` of its calls: it
reports each stream's events to the call's event methods (a message goes straight to the
call's public ``sink`` when it has one) and never touches a call's private state.

Invariants:
- A ``GrpcCall`` exists from the stream's first event until ``EV_CLOSED``, or until the
  connection is closing or gone (every call then ends as lost); its ``closed`` future is
  then done and it is forgotten.
- Keepalive and ping enforcement run in the engine; this adapter only arms one timer at
  ``H2Connection.get_timer()``.
- A peer that does not read stops being read (grpc-go's throttle): while the transport's
  writing is paused and the engine owes the peer ``MAX_QUEUED_RESPONSE_FRAMES`` frames or
  more (ACKs, resets, headers: the answers its own frames made), its socket is not read;
  reading resumes once the output drains. Queued DATA never stops reading, so two peers
  that both send more than they read cannot deadlock.
- A connection the engine wants closed is closed whether or not the peer reads: reading
  stops at once, and the socket is aborted after ``CLOSE_TIMEOUT`` if its output does not
  drain.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

from konnectivity_fast._compiled import require_compiled
from konnectivity_fast.transport.accept import Listener, listen_tcp, listen_unix
from konnectivity_fast.transport.buffers import zeroed_buffer
from konnectivity_fast.transport.call import (
    CALL_RECV_HIGH_WATER,
    CALL_SEND_HIGH_WATER,
    CLOSED_LOST,
    CallbackService,
    CallHost,
    CallSink,
    GrpcCall,
    GrpcError,
    Handler,
    Metadata,
)
from konnectivity_fast.transport.ratelog import RateLimitedLog
from konnectivity_fast.wire.errors import StatusCode

# The HTTP/2 engine has no pure twin: a missing or stale build fails here with how to fix
# it (KONNECTIVITY_FAST_PURE=1 chooses only the codec), before the import below could load
# an unchecked one. The names come from the stub, so mypy checks their use.
require_compiled()
from konnectivity_fast._wire import (  # noqa: E402
    DEFAULT_STREAM_WINDOW,
    EV_ABORTED,
    EV_CLOSED,
    EV_END,
    EV_ERROR,
    EV_GOAWAY,
    EV_HEADERS,
    EV_MESSAGE,
    EV_REQUEST,
    EV_TRAILERS,
    H2_CANCEL,
    H2_NO_ERROR,
    H2Connection,
    H2Event,
)

#: The receive window each stream of our connections gives its peer: the most a peer may
#: send on a paused stream (the engine's default; no listener changes it).
STREAM_WINDOW = DEFAULT_STREAM_WINDOW

__all__ = [
    "CALL_RECV_HIGH_WATER",
    "CALL_SEND_HIGH_WATER",
    "CLOSED_LOST",
    "STREAM_WINDOW",
    "CallHost",
    "CallSink",
    "CallbackService",
    "GrpcCall",
    "GrpcError",
    "GrpcProtocol",
    "GrpcServer",
    "Handler",
    "Metadata",
    "connect",
    "listen_backlog",
    "serve",
]

log = logging.getLogger(__name__)
# A peer that breaks the protocol or floods us gets one line, a stream of such peers a few.
_log_connection_error = RateLimitedLog(log)

# Seconds a closing connection may take to flush before it is aborted.
CLOSE_TIMEOUT = 5.0
# Frames other than DATA the engine may owe a peer whose socket is full before we stop
# reading it: grpc-go's maxQueuedTransportResponseFrames (internal/transport/controlbuf.go),
# after which its server stops reading frames until its writer catches up. What a peer that
# does not read can make us hold is this many small frames, not one per frame it sends.
MAX_QUEUED_RESPONSE_FRAMES = 50
# Seconds an accepted connection has to finish its TLS handshake and send the HTTP/2 client
# preface and SETTINGS: grpc-go's ConnectionTimeout default. Idle half-open peers are
# reaped instead of holding an fd forever. Read at each accept (tests shorten it).
CONNECTION_TIMEOUT = 120.0
# The client preface (24 bytes) and a SETTINGS frame header (9): once this much was taken by
# the engine without error, the peer speaks HTTP/2 and the connection timeout is cleared.
_PREFACE_AND_SETTINGS = 24 + 9
# Fallback listen backlog when the kernel's somaxconn cannot be read: Go listens with
# somaxconn, so a burst of kube-apiserver dials (one connection each) is not refused with
# EAGAIN as asyncio's default of 100 would be.
DEFAULT_LISTEN_BACKLOG = 4096


def listen_backlog() -> int:
    """The backlog Go's ``net.Listen`` uses: ``/proc/sys/net/core/somaxconn``."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(1, min(int(f.read().strip()), 65535))
    except (OSError, ValueError):
        return DEFAULT_LISTEN_BACKLOG


# Seconds to wait for the peer's TLS close_notify on close. Go closes the socket right
# after sending its own; waiting long for a reply only delays teardown.
SSL_SHUTDOWN_TIMEOUT = 1.0
# Size of the buffer the loop reads into: large reads mean fewer engine calls per byte.
READ_BUFFER_SIZE = 256 << 10
# The loop reads into one buffer for all its connections: ``buffer_updated`` hands it whole
# to the engine, which copies what it keeps before returning, so no connection needs its
# own (10 000 idle connections would otherwise hold 2.5 GB). Weak: a closed loop's goes.
_READ_BUFFERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, memoryview] = (
    weakref.WeakKeyDictionary()
)


def _read_buffer(loop: asyncio.AbstractEventLoop) -> memoryview:
    view = _READ_BUFFERS.get(loop)
    if view is None:
        view = _READ_BUFFERS[loop] = zeroed_buffer(READ_BUFFER_SIZE)
    return view


class GrpcProtocol(asyncio.BufferedProtocol):
    """Drives one ``H2Connection`` over one transport."""

    #: Connections of this process that ended (cli/malloc.py trims the heap after many).
    closed_total: ClassVar[int] = 0

    def __init__(
        self,
        server: bool,
        handler: Handler | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        require_alpn_h2: bool = False,
        on_made: Callable[[GrpcProtocol], None] | None = None,
        **engine_options: Any,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.conn = H2Connection(server, now=self.loop.time(), **engine_options)
        self._handler = handler
        self._require_alpn = require_alpn_h2
        # One read buffer per loop, shared by its connections (``_read_buffer``).
        self._view = _read_buffer(self.loop)
        self._on_made = on_made
        self._setup_timer: asyncio.TimerHandle | None = None
        self._received = 0
        self._close_when_idle = False
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, GrpcCall] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._flush_scheduled = False
        self._write_paused = False
        # Reading stopped because the peer does not read what it made us owe it.
        self._throttled = False
        self._abort_timer: asyncio.TimerHandle | None = None
        # Calls with drain callbacks waiting (``GrpcCall.when_drained``), checked per flush.
        self._drain_watch: set[GrpcCall] = set()
        self._timer: asyncio.TimerHandle | None = None
        self.connected: asyncio.Future[None] = self.loop.create_future()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.goaway: tuple[int, int, bytes] | None = None
        self.error: str | None = None

    # -- asyncio.BufferedProtocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)
        if self._on_made is not None:
            self._on_made(self)
        if self.conn.server:
            self._setup_timer = self.loop.call_later(CONNECTION_TIMEOUT, self._setup_timeout)
        ssl_object = transport.get_extra_info("ssl_object")
        # grpc-go refuses TLS connections that did not negotiate h2 by ALPN.
        if (
            ssl_object is not None
            and self._require_alpn
            and ssl_object.selected_alpn_protocol() != "h2"
        ):
            log.info(
                "closing TLS connection without ALPN h2 from %s",
                transport.get_extra_info("peername"),
            )
            self.transport.abort()
            return
        self._flush()
        if not self.connected.done():
            self.connected.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._dispatch(self.conn.receive_data(self._view[:nbytes], self.loop.time()))
        if self._setup_timer is not None:
            self._received += nbytes
            if self._received >= _PREFACE_AND_SETTINGS and not self.conn.want_close:
                self._setup_timer.cancel()
                self._setup_timer = None
        self._flush()
        if (
            self._write_paused
            and not self._throttled
            and self.conn.queued_frames >= MAX_QUEUED_RESPONSE_FRAMES
            and self.transport is not None
            and not self.transport.is_closing()
        ):
            self._throttled = True
            self.transport.pause_reading()

    def _setup_timeout(self) -> None:
        self._setup_timer = None
        if self.transport is not None and not self.transport.is_closing():
            log.info(
                "closing connection from %s: no HTTP/2 preface within %ss",
                self.transport.get_extra_info("peername"),
                CONNECTION_TIMEOUT,
            )
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None
        if self._timer is not None:
            self._timer.cancel()
        if self._setup_timer is not None:
            self._setup_timer.cancel()
            self._setup_timer = None
        self._end_calls()
        # The transport (with a TLS connection, uvloop's SSL protocol and its 256 KiB read
        # buffer) must not live on in the reference cycles a connection's objects form
        # (backend <-> call <-> sink): those wait for the collector's oldest generation,
        # and agents leaving in rounds kept a server's heap growing by their buffers.
        self.transport = None
        GrpcProtocol.closed_total += 1
        if not self.connected.done():
            self.connected.set_exception(ConnectionError("connection lost before set-up"))
            self.connected.exception()
        if not self.lost.done():
            self.lost.set_result(None)

    def _end_calls(self) -> None:
        """Every call ends as lost: the connection is gone or can take no more input."""
        message = self.error or "connection lost"
        calls = list(self.calls.values())
        self.calls.clear()
        self._drain_watch.clear()
        for call in calls:
            call._on_closed(CLOSED_LOST, StatusCode.UNAVAILABLE, message)

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is full: the peer is not reading."""
        return self._write_paused

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._flush()

    # -- client role --

    def start_call(
        self,
        path: str,
        metadata: Iterable[tuple[str, str]] = (),
        authority: str = "localhost",
        scheme: str = "http",
        timeout: float | None = None,
    ) -> GrpcCall:
        try:
            stream_id = self.conn.start_request(path, metadata, authority, scheme, timeout)
        except RuntimeError as exc:
            raise GrpcError(StatusCode.UNAVAILABLE, str(exc)) from None
        call = GrpcCall(self, stream_id, path, [])
        self.calls[stream_id] = call
        self.schedule_flush()
        return call

    def close(self) -> None:
        """Graceful: GOAWAY, flush, close the transport (aborted after ``CLOSE_TIMEOUT``
        if the peer does not take what is left)."""
        if self.transport is not None and not self.transport.is_closing():
            self.conn.goaway()
            self._flush()
            self._close_transport()

    def _close_transport(self) -> None:
        """Close: reading stops now; the output left goes out, or is dropped with the
        socket after ``CLOSE_TIMEOUT`` (a peer that does not read must not hold it)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if self._abort_timer is None and not self.lost.done():
            self._abort_timer = self.loop.call_later(CLOSE_TIMEOUT, transport.abort)

    def close_when_idle(self) -> None:
        """Graceful: GOAWAY (no new streams), and close once the open streams have ended."""
        self._close_when_idle = True
        if self.transport is not None and not self.transport.is_closing():
            self.conn.goaway()
            if not self.calls:
                self.close()
            else:
                self._flush()

    async def aclose(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """``close()`` and wait until the connection is gone (aborting it after
        ``timeout``: a peer that stops reading must not hold us)."""
        self.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        except TimeoutError:
            if self.transport is not None:
                self.transport.abort()
            await self.lost

    # -- plumbing --

    def watch_drain(self, call: GrpcCall) -> None:
        """Check ``call``'s drain callbacks after each flush (and at once, soon)."""
        self._drain_watch.add(call)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._write_paused and not self.conn.want_close:
            return  # the output stays in the engine, on its streams, until the peer reads
        data = self.conn.data_to_send()
        while True:
            if data:
                transport.write(data)
            events = self.conn.take_events()
            if not events:
                break
            self._dispatch(events)
            data = self.conn.data_to_send()
        if self._drain_watch:
            self._drain_watch = {call for call in self._drain_watch if not call._on_flushed()}
        if self.conn.want_close:
            # Its calls end now, not when the socket is gone: a TLS close may wait a second
            # for the peer's close_notify, and a refused peer's calls (an agent's streams)
            # must not be chosen meanwhile.
            self._close_transport()
            self._end_calls()
            return
        self._arm_timer()
        if self._throttled and not self._write_paused:
            self._throttled = False
            transport.resume_reading()

    def _arm_timer(self) -> None:
        when = self.conn.get_timer()
        if self._timer is not None:
            if when is not None and self._timer.when() == when:
                return
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch(self.conn.handle_timer(self.loop.time()))
        self._flush()

    def _dispatch(self, events: list[H2Event]) -> None:
        calls = self.calls
        for ev in events:
            kind = ev.kind
            if kind == EV_MESSAGE:  # first: the data path
                call = calls.get(ev.stream_id)
                if call is not None:
                    data = ev.data
                    assert data is not None  # EV_MESSAGE always carries its message
                    sink = call.sink
                    if sink is None:
                        call._on_message(data)
                    else:
                        # What call._on_message does for a sink, less its frame: 3.5 % of
                        # the server's instructions per echoed 1 KiB message.
                        sink.on_message(call, data)
            elif kind == EV_REQUEST:
                self._on_request(ev)
            elif kind == EV_HEADERS:
                call = calls.get(ev.stream_id)
                if call is not None:
                    call._on_headers(ev.metadata or [])
            elif kind == EV_END:
                call = calls.get(ev.stream_id)
                if call is not None:
                    call._on_end()
            elif kind in (EV_TRAILERS, EV_ABORTED):
                call = calls.get(ev.stream_id)
                if call is not None:
                    call._on_outcome(ev.status, ev.message or "", ev.metadata or [])
            elif kind == EV_CLOSED:
                self._on_stream_closed(ev)
            elif kind == EV_GOAWAY:
                self.goaway = (ev.stream_id, ev.error_code, ev.data or b"")
            elif kind == EV_ERROR:
                self.error = ev.message
                _log_connection_error("HTTP/2 connection error: %s (%s)", ev.message, self._peer())

    def _peer(self) -> str:
        """The peer's address for a log line (a Unix socket's peer has none: its path)."""
        transport = self.transport
        if transport is None:
            return "unknown peer"
        peer = transport.get_extra_info("peername")
        if peer:
            return f"peer {peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"peer {peer}"
        return f"unix socket {transport.get_extra_info('sockname') or ''}".rstrip()

    def _on_request(self, ev: H2Event) -> None:
        path = ev.path or ""
        call = GrpcCall(self, ev.stream_id, path, ev.metadata or [])
        self.calls[ev.stream_id] = call
        if self._handler is None:
            call.finish(StatusCode.UNIMPLEMENTED, f"unknown service {path}")
            return
        open_call: Callable[[GrpcCall], CallSink] | None = getattr(self._handler, "open_call", None)
        if open_call is not None:
            call.set_sink(open_call(call))  # callback style: no task per call
            return
        task = self.loop.create_task(self._run_handler(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_handler(self, call: GrpcCall) -> None:
        handler = self._handler
        assert handler is not None and not hasattr(handler, "open_call")
        try:
            await handler(call)
        except GrpcError as exc:
            call.finish(exc.status, exc.message)
        except Exception as exc:  # a handler bug must end its call, not the connection
            log.exception("handler for %s failed", call.path)
            call.finish(StatusCode.UNKNOWN, str(exc))
        else:
            call.finish(StatusCode.OK)

    def _on_stream_closed(self, ev: H2Event) -> None:
        call = self.calls.pop(ev.stream_id, None)
        if call is None:
            return
        code = ev.error_code
        # Server role: a call the client reset ends without an outcome of ours; its handler
        # sees what grpc-go's would (CANCEL: CANCELLED). Client role: the engine reported
        # the outcome before EV_CLOSED.
        status = _reset_status(code) if self.conn.server else None
        call._on_closed(code, status, "")
        if self._close_when_idle and not self.calls:
            self.loop.call_soon(self.close)


def _reset_status(error_code: int) -> StatusCode:
    """The status of a server-role call whose stream closed with ``error_code``."""
    if error_code == H2_CANCEL:
        return StatusCode.CANCELLED
    return StatusCode.OK if error_code == H2_NO_ERROR else StatusCode.INTERNAL


def _ssl_args(ssl: Any) -> dict[str, Any]:
    if ssl is None:
        return {}
    return {"ssl": ssl, "ssl_shutdown_timeout": SSL_SHUTDOWN_TIMEOUT}


class GrpcServer:
    """A listening socket and the connections it accepted. ``close()`` ends both: Python
    3.11's ``asyncio.Server.close`` leaves accepted connections open."""

    def __init__(self) -> None:
        self.server: Listener | None = None
        self.connections: set[GrpcProtocol] = set()

    @property
    def sockets(self) -> tuple[Any, ...]:
        assert self.server is not None
        return tuple(self.server.sockets)

    def _track(self, proto: GrpcProtocol) -> None:
        """Called from ``connection_made``: a TLS connection whose handshake fails never
        gets there (nor to ``connection_lost``), so it must not be tracked before."""
        self.connections.add(proto)
        proto.lost.add_done_callback(lambda _: self.connections.discard(proto))

    def close(self) -> None:
        """Stop listening; send GOAWAY on every connection and close it."""
        if self.server is not None:
            self.server.close()
        for proto in list(self.connections):
            proto.close()

    def stop_gracefully(self) -> None:
        """Stop listening; GOAWAY on every connection, each closed once its streams end
        (grpc-go's GracefulStop)."""
        if self.server is not None:
            self.server.close()
        for proto in list(self.connections):
            proto.close_when_idle()

    def abort(self) -> None:
        """Stop listening and drop every connection at once (grpc-go's Stop)."""
        if self.server is not None:
            self.server.close()
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abort()

    async def wait_stopped(self) -> None:
        """Wait, without a bound, until every connection is gone and the listener closed."""
        while self.connections:
            await asyncio.wait([p.lost for p in self.connections])
        if self.server is not None:
            await self.server.wait_closed()

    async def wait_closed(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait for every connection to go, aborting those still there after ``timeout``."""
        pending = [p.lost for p in self.connections]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for proto in list(self.connections):
                if proto.transport is not None:
                    proto.transport.abort()
            if late:
                await asyncio.wait(late, timeout=timeout)
        if self.server is not None:
            await self.server.wait_closed()


async def serve(
    handler: Handler,
    *,
    path: str | None = None,
    host: str | None = None,
    port: int = 0,
    ssl: Any = None,
    name: str = "grpc",
    **engine_options: Any,
) -> GrpcServer:
    """Listen for gRPC on a Unix socket (h2c) or TCP (h2 over ``ssl``, or h2c without).
    ``name``: the listener's name in log lines (``transport.accept``)."""
    loop = asyncio.get_running_loop()
    result = GrpcServer()

    def factory() -> GrpcProtocol:
        return GrpcProtocol(
            True,
            handler,
            loop=loop,
            require_alpn_h2=ssl is not None,
            on_made=result._track,
            **engine_options,
        )

    args = _ssl_args(ssl)
    if ssl is not None:
        args["ssl_handshake_timeout"] = CONNECTION_TIMEOUT
    backlog = listen_backlog()
    if path is not None:
        result.server = await listen_unix(name, factory, path, backlog=backlog, **args)
    else:
        result.server = await listen_tcp(name, factory, host, port, backlog=backlog, **args)
    return result


async def connect(
    *,
    path: str | None = None,
    host: str | None = None,
    port: int | None = None,
    ssl: Any = None,
    server_hostname: str | None = None,
    **engine_options: Any,
) -> GrpcProtocol:
    """Open a client connection; returns once the transport is up."""
    loop = asyncio.get_running_loop()

    def factory() -> GrpcProtocol:
        return GrpcProtocol(
            False, None, loop=loop, require_alpn_h2=ssl is not None, **engine_options
        )

    if path is not None:
        _, proto = await loop.create_unix_connection(
            factory, path, server_hostname=server_hostname, **_ssl_args(ssl)
        )
    else:
        if host is None or port is None:
            raise ValueError("connect() needs path, or host and port")
        _, proto = await loop.create_connection(
            factory, host, port, server_hostname=server_hostname, **_ssl_args(ssl)
        )
    await proto.connected
    return proto
