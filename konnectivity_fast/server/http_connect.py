"""The HTTP-CONNECT frontend (``--mode=http-connect``; upstream's pkg/server/tunnel.go
``Tunnel.ServeHTTP``).

One ``HttpConnectProtocol`` per client connection (HTTP/1.1, plain on a Unix socket or
TLS on TCP). It parses requests incrementally, answers anything but CONNECT with 405 (the
connection stays usable, as upstream's un-hijacked handler), and for a CONNECT asks the
``ProxyServer``'s router to dial the request-target. The router's effects reach us through
``ProxyServer._apply`` (``Frontend.conn`` is this protocol):

- ``TunnelEstablished``: write ``200 Connection Established``, then relay. Each client
  read becomes one DATA message on the agent's stream (framed around the payload); bytes
  pipelined after the CONNECT headers are sent first, once established.
- ``SendToFrontend`` (DATA only): write its payload (a zero-copy ``peek_data`` view).
- ``CloseFrontend``: write the response upstream writes for its ``CloseReason``, close.

Client EOF or disconnect is reported with ``Router.remove_frontend``: DIAL_CLS for a pending
dial, CLOSE_REQ for a tunnel. Unlike upstream (which reads nothing from the client before
the dial completes) we keep reading while the dial is pending, so a client that leaves then
is noticed at once; an EOF (even a half-close) then counts as leaving, since upstream has
no half-close propagation either.

Backpressure (``server.buffering``): client -> agent, the client socket stops being read
while the agent call's queued output is at ``CALL_SEND_HIGH_WATER`` or above, and resumes
when it drains. Agent -> client, the agent's DATA is always written: a client that falls
behind is charged to its ``TunnelBuffer`` (the transport tells us with ``pause_writing``),
and only a spent budget pauses the agent's stream, so a stalled client does not hold up the
other tunnels of its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from email.utils import formatdate
from typing import cast

from konnectivity_fast.metrics import server as metrics
from konnectivity_fast.server.buffering import (
    TUNNEL_WRITE_HIGH_WATER,
    TUNNEL_WRITE_LOW_WATER,
    TunnelBuffer,
)
from konnectivity_fast.server.flow import FlowTunnel
from konnectivity_fast.server.listeners import DEFAULT_TLS, TlsSettings
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.transport.accept import Listener, listen_unix
from konnectivity_fast.transport.call import CALL_SEND_HIGH_WATER, GrpcCall, GrpcError
from konnectivity_fast.transport.gotls import start_sniffing_tls_server
from konnectivity_fast.transport.grpc import listen_backlog
from konnectivity_fast.transport.httphead import (
    POST_TOLERANCE,
    HeadError,
    head_end,
    leading_blank_bytes,
    parse_head,
)
from konnectivity_fast.transport.loop import resume_writing_at
from konnectivity_fast.tunnel import CloseReason, Frontend
from konnectivity_fast.tunnel.events import Message
from konnectivity_fast.wire.codec import peek_data
from konnectivity_fast.wire.contract import ERR_IO_TIMEOUT, ERR_TOO_MANY_OPEN_FILES, FrontendMode
from konnectivity_fast.wire.packets import Data, Packet, PacketType

__all__ = [
    "HTTP11_ALPN",
    "MAX_HEADER_BYTES",
    "READ_HEADER_TIMEOUT",
    "HttpConnectProtocol",
    "dial_error_status",
    "start_http_connect_tcp",
    "start_http_connect_uds",
]

log = logging.getLogger(__name__)

#: Go's ``http.DefaultMaxHeaderBytes`` (1 MiB) plus the 4096 bytes of slack its reader
#: allows: a request line and headers longer than this get 431, as from Go's server.
MAX_HEADER_BYTES = (1 << 20) + 4096
#: Upstream's ``ReadHeaderTimeout`` (cmd/server/app/server.go): a request's headers must
#: arrive within this.
READ_HEADER_TIMEOUT = 60.0
#: Client bytes buffered while the dial is pending before we stop reading the socket.
PENDING_LIMIT = 1 << 20
#: How long a rejected request's connection is drained before closing (Go's
#: ``rstAvoidanceDelay``).
LINGER = 0.5
#: The socket's permissions (upstream creates it under umask 0007: cmd/server/app/server.go
#: getUDSListener, as for the gRPC frontend socket).
UDS_MODE = 0o770
HTTP11_ALPN = "http/1.1"

_DATA = int(PacketType.DATA)

RESPONSE_200 = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_TEXT = b"Content-Type: text/plain; charset=utf-8\r\n"
_ERROR_HEADERS = b"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
BODY_405 = b"this proxy only supports CONNECT passthrough\n"
_STATUS_TEXT = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def dial_error_status(error: str) -> int:
    """The status upstream answers an agent's dial error with (pkg/server/server.go
    mapDialErrorToHTTPStatus)."""
    low = error.lower()
    if ERR_IO_TIMEOUT in low or "deadline exceeded" in low or "timeout" in low:
        return 504
    if ERR_TOO_MANY_OPEN_FILES in low:
        return 503
    return 502


def close_response(reason: CloseReason, error: str) -> bytes | None:
    """What upstream writes before closing a tunnel for ``reason`` (None: nothing)."""
    if reason is CloseReason.NO_AGENT:
        return (
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n\r\n"
            b"currently no tunnels available: " + error.encode()
        )
    if reason is CloseReason.DIAL_ERROR:
        code = dial_error_status(error)
        return (
            f"HTTP/1.1 {code} {_STATUS_TEXT[code]}\r\nConnection: close\r\n".encode()
            + _TEXT
            + b"\r\n"
            + error.encode()
        )
    if reason is CloseReason.DIAL_TIMEOUT:
        return (
            b"HTTP/1.1 504 Gateway Timeout\r\n"
            + _TEXT
            + b"\r\nBackend dial timeout: "
            + error.encode()
            + b"\r\n"
        )
    if reason is CloseReason.DIAL_BACKEND_GONE:
        return (
            b"HTTP/1.1 502 Bad Gateway\r\n"
            + _TEXT
            + b"\r\nBackend context error: "
            + error.encode()
            + b"\r\n"
        )
    return None  # DIAL_CLOSED, CLOSE_RSP, BACKEND_GONE: just close


def _go_error(status: str) -> bytes:
    """Go's server's reply to a request it cannot read, then it closes."""
    return b"HTTP/1.1 " + status.encode() + _ERROR_HEADERS + status.encode()


def _response_405(head: bool, close: bool, http10: bool = False) -> bytes:
    """``http.Error(w, ..., 405)`` as Go's server writes it: its status line in the request's
    HTTP version, ``Connection`` last, and only when it says something the version does
    not imply (close for HTTP/1.1, keep-alive for HTTP/1.0)."""
    version = b"HTTP/1.0" if http10 else b"HTTP/1.1"
    lines = [
        version + b" 405 Method Not Allowed\r\n",
        _TEXT,
        b"X-Content-Type-Options: nosniff\r\n",
    ]
    lines.append(f"Date: {formatdate(usegmt=True)}\r\n".encode())
    lines.append(f"Content-Length: {len(BODY_405)}\r\n".encode())
    if close and not http10:
        lines.append(b"Connection: close\r\n")
    elif http10 and not close:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    if not head:
        lines.append(BODY_405)
    return b"".join(lines)


# Connection states.
_HEADERS, _DIALING, _RELAY, _DISCARD, _CLOSED = range(5)


class HttpConnectProtocol(asyncio.Protocol):
    """One client connection of the HTTP-CONNECT frontend."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.frontend: Frontend | None = None
        self._state = _HEADERS
        self._buf = bytearray()  # request bytes not yet parsed / pipelined tunnel bytes
        self._skip = 0  # request body bytes still to discard after a 405
        self._scanned = 0  # bytes of ``_buf`` already searched for the end of a head
        self._after_post = False  # the last request was a POST (Go's leniency after one)
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._counted = False  # in the http_connections gauge
        self._held = False  # waiting for the agent call to drain (``when_drained``)
        self.buffer = TunnelBuffer(self._backlog, self._abandon)
        self.flow: FlowTunnel | None = None  # flow.v1 with its agent (server/flow.py)
        self._credit_paused = False
        self._on_emptied: Callable[[], None] | None = None
        # Reading stopped: the client does not read our answers (``pause_writing``).
        self._answers_unread = False

    # --- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(TUNNEL_WRITE_HIGH_WATER, TUNNEL_WRITE_LOW_WATER)
        self._arm_header_timer()

    def pause_writing(self) -> None:
        self.buffer.blocked = True
        if self._state != _RELAY and self.transport is not None:
            # A client that sends requests without reading our answers (405s to pipelined
            # requests) is not read either until it catches up, as Go's server serves one
            # request at a time: what it makes us hold is the transport's high-water mark.
            self._answers_unread = True
            self.transport.pause_reading()

    def _backlog(self) -> int:
        transport = self.transport
        return 0 if transport is None else transport.get_write_buffer_size()

    def _abandon(self) -> None:
        """The client stalled with its budget spent: close the tunnel, dropping what it
        did not read (CLOSE_REQ to the agent)."""
        frontend = self.frontend
        if frontend is not None and not frontend.closed:
            self.server._remove_frontend(frontend)
        self._close()
        if self.transport is not None:
            self.transport.abort()

    def resume_writing(self) -> None:
        self.server.budget.release(self.buffer)
        emptied, self._on_emptied = self._on_emptied, None
        if emptied is not None:
            emptied()
        if self._answers_unread:
            self._answers_unread = False
            transport = self.transport
            if not self._paused and transport is not None and not transport.is_closing():
                transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _RELAY:
            self._send_data(data)
        elif state == _HEADERS:
            self._buf += data
            self._parse()
        elif state == _DIALING:
            self._buf += data
            if len(self._buf) >= PENDING_LIMIT and self.transport is not None:
                self._pause()

    def eof_received(self) -> bool:
        # Upstream has no half-close: the read loop ends, CLOSE_REQ (or, pending, DIAL_CLS).
        self._leave()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    # --- request parsing ------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._timer = self.server.loop.call_later(READ_HEADER_TIMEOUT, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self._state == _HEADERS:
            self._close()

    def _parse(self) -> None:
        """Read request heads as Go's server does (``transport.httphead``)."""
        while self._state == _HEADERS:
            buf = self._buf
            if self._skip:
                n = min(self._skip, len(buf))
                del buf[:n]
                self._skip -= n
                if self._skip:
                    return
            if self._after_post:  # Go skips up to 4 CR/LF after a POST, nowhere else
                if len(buf) < POST_TOLERANCE:
                    return
                del buf[: leading_blank_bytes(buf)]
                self._after_post = False
            end = head_end(buf, self._scanned)
            if end < 0:
                self._scanned = len(buf)
                if len(buf) > MAX_HEADER_BYTES:
                    self._reject(_go_error("431 Request Header Fields Too Large"))
                return
            if end > MAX_HEADER_BYTES + 4:
                self._reject(_go_error("431 Request Header Fields Too Large"))
                return
            head = bytes(buf[:end])
            del buf[:end]
            self._scanned = 0
            self._request(head)

    def _request(self, head: bytes) -> None:
        try:
            parsed = parse_head(head)
        except HeadError as exc:
            self._reject(_go_error(exc.status))
            return
        self._after_post = parsed.method == "POST"
        headers = {name.lower(): values[0] for name, values in parsed.headers.items()}
        if parsed.method != "CONNECT":
            version = b"HTTP/1.0" if parsed.version == (1, 0) else b"HTTP/1.1"
            self._not_connect(parsed.method, version, headers)
            return
        self._connect(parsed.target)

    def _not_connect(self, method: str, version: bytes, headers: dict[str, str]) -> None:
        """405; keep-alive continues unless the request's body cannot be skipped."""
        self._open_gauge()
        connection = headers.get("connection", "").lower()
        close = "close" in connection or (version == b"HTTP/1.0" and "keep-alive" not in connection)
        length = headers.get("content-length")
        if "transfer-encoding" in headers:
            close = True
        elif length is not None:
            if not length.isdigit():
                self._close_gauge()
                self._reply_and_close(_go_error("400 Bad Request"))
                return
            self._skip = int(length)
        response = _response_405(method == "HEAD", close, version == b"HTTP/1.0")
        self._close_gauge()
        if close:
            self._reply_and_close(response)
            return
        assert self.transport is not None
        self.transport.write(response)
        self._arm_header_timer()

    def _connect(self, target: str) -> None:
        self._cancel_header_timer()
        self._open_gauge()
        self._state = _DIALING
        server = self.server
        frontend = server.router.add_frontend(FrontendMode.HTTP_CONNECT, self)
        self.frontend = frontend
        server._apply(server.router.dial_http_connect(frontend, target, server.loop.time()))
        if self._state == _DIALING and len(self._buf) >= PENDING_LIMIT:
            self._pause()

    # --- effects (called by ProxyServer._apply) -------------------------------------------

    def tunnel_established(self, connect_id: int) -> None:
        transport = self.transport
        if self._state != _DIALING or transport is None or transport.is_closing():
            return
        transport.write(RESPONSE_200)
        self._state = _RELAY
        pending = self._buf
        self._buf = bytearray()
        if pending:
            self._send_data(bytes(pending))
        if self._paused and self._state == _RELAY:
            self._resume_when_drained()

    def write_agent_data(self, message: Message, agent: GrpcCall | None) -> None:
        """A DATA message from the agent for this tunnel: write its payload (``agent``: the
        call it came from, charged if this client is behind)."""
        transport = self.transport
        if self._state != _RELAY or transport is None:
            return
        data: bytes | memoryview
        if isinstance(message, Packet):
            payload = message.payload
            if not isinstance(payload, Data):
                return
            data = payload.data
        else:
            peeked = peek_data(message)
            if peeked is None:
                return
            data = peeked[1]
        if not len(data):
            return
        transport.write(data)
        if self.frontend is not None:
            self.frontend.bytes_down += len(data)
        if agent is None:
            return
        flow = self.server.flow
        if agent in flow.agents and self.frontend is not None:
            # flow.v1: its window bounds it, not a budget
            flow.received(self.flow_tunnel(agent, self.frontend.connect_id), len(data))
        elif self.buffer.blocked:
            self.server.budget.charge(self.buffer, len(data), agent)

    def close_frontend(self, reason: CloseReason, error: str) -> None:
        response = close_response(reason, error)
        if response is None:
            self._close()
        else:
            self._reply_and_close(response)

    # --- relaying -------------------------------------------------------------------------

    def _send_data(self, data: bytes) -> None:
        frontend = self.frontend
        assert frontend is not None
        backend = self.server.router.route_frontend_data(frontend, frontend.connect_id)
        if backend is None:
            return  # the tunnel is ending
        frontend.bytes_up += len(data)
        call: GrpcCall = backend.conn
        metrics.observe_packet(metrics.SEGMENT_TO_AGENT, _DATA)
        try:
            call.send_data_packet(frontend.connect_id, data)
        except GrpcError as exc:  # upstream logs it; the stream's end cleans up
            metrics.observe_stream_error(metrics.SEGMENT_TO_AGENT, exc.status, _DATA)
            log.debug("DATA on stream %d dropped: %s", call.stream_id, exc)
        flow = self.server.flow
        if call in flow.agents:
            flow.sent(self.flow_tunnel(call, frontend.connect_id), len(data))
        if not self._paused and call.outbound_pending() >= CALL_SEND_HIGH_WATER:
            self._pause()
            self._resume_when_drained()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()

    def _resume_when_drained(self) -> None:
        frontend = self.frontend
        backend = frontend.backend if frontend is not None else None
        if backend is None or self._held:
            return
        self._held = True
        call: GrpcCall = backend.conn
        call.when_drained(self._agent_drained)

    def _agent_drained(self) -> None:
        self._held = False
        self._maybe_resume()

    def _maybe_resume(self) -> None:
        if (
            self._paused
            and not self._held
            and not self._credit_paused
            and not self._answers_unread
            and self._state == _RELAY
            and self.transport is not None
        ):
            self._paused = False
            with contextlib.suppress(RuntimeError):
                self.transport.resume_reading()

    # --- flow.v1: server/flow.py's FlowSource ---------------------------------------------

    def flow_tunnel(self, agent: GrpcCall, connect_id: int) -> FlowTunnel:
        """This tunnel's flow.v1 state with ``agent``, made by the first DATA or credit
        either way (the connection is established: its ID is known)."""
        tunnel = self.flow
        if tunnel is None:
            tunnel = self.flow = self.server.flow.tunnel(agent, connect_id, self)
            if self.transport is not None:
                # resume_writing now reports every emptied queue (when_drained_to moves
                # the level).
                self.transport.set_write_buffer_limits(0, 0)
        return tunnel

    def flow_backlog(self) -> int:
        return self._backlog()

    def when_drained_to(self, level: int, callback: Callable[[], None]) -> None:
        self._on_emptied = callback
        if self.transport is not None:
            # pause_writing, while the queue is above ``level``, only marks the buffer
            # blocked, which a flow.v1 tunnel never charges.
            resume_writing_at(self.transport, level)

    def pause_for_credit(self) -> None:
        self._credit_paused = True
        self._pause()

    def resume_for_credit(self) -> None:
        self._credit_paused = False
        self._maybe_resume()

    def flow_breached(self) -> None:
        self._abandon()

    @property
    def source_paused(self) -> bool:
        """The admin listing's "paused": the client's socket is not read (its agent is
        behind, or the dial is pending with ``PENDING_LIMIT`` bytes buffered)."""
        return self._paused

    # --- ending ---------------------------------------------------------------------------

    def _leave(self) -> None:
        """The client is gone (EOF or disconnect): tell the router, close the socket."""
        frontend = self.frontend
        if frontend is not None and not frontend.closed:
            self.server._remove_frontend(frontend)
        self._close()

    def _reject(self, response: bytes) -> None:
        """A request Go's server cannot read: reply, half-close and keep discarding input
        until the client closes or ``LINGER`` passes (Go's ``closeWriteAndWait``), so the
        client is not reset before it reads the reply."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._reply_and_close(response)
            return
        self._state = _DISCARD
        self._buf = bytearray()
        self._cancel_header_timer()
        transport.write(response)
        transport.write_eof()
        self._timer = self.server.loop.call_later(LINGER, self._close)

    def _reply_and_close(self, response: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
        self._close()

    def _close(self) -> None:
        self._state = _CLOSED
        self._buf = bytearray()
        self.server.budget.release(self.buffer)
        if self.flow is not None:
            self.server.flow.close(self.flow)
            self.flow = None
            self._on_emptied = None
        self._cancel_header_timer()
        self._close_gauge()
        if self.transport is not None:
            self.transport.close()

    def _open_gauge(self) -> None:
        if not self._counted:
            self._counted = True
            metrics.http_connection_opened()

    def _close_gauge(self) -> None:
        if self._counted:
            self._counted = False
            metrics.http_connection_closed()


# --- listeners ------------------------------------------------------------------------------


async def start_http_connect_uds(server: ProxyServer, path: str) -> Listener:
    """The HTTP-CONNECT frontend on a Unix socket: plain HTTP/1.1, mode 0770 (upstream's
    cmd/server/app/server.go runUDSFrontendServer)."""
    listener = await listen_unix(
        "frontend", lambda: HttpConnectProtocol(server), path, backlog=listen_backlog()
    )
    os.chmod(path, UDS_MODE)
    return listener


async def start_http_connect_tcp(
    server: ProxyServer,
    *,
    host: str | None,
    port: int,
    cert_file: str,
    key_file: str,
    client_ca_file: str | None,
    tls_settings: TlsSettings = DEFAULT_TLS,
) -> Listener:
    """The HTTP-CONNECT frontend on TCP with mTLS: HTTP/1.1 only (ALPN ``http/1.1``), client
    certificates required and verified against ``client_ca_file`` (upstream's
    cmd/server/app/server.go runMTLSFrontendServer); plain HTTP answered as Go's TLS
    server answers it."""
    ctx = tls_settings.server_context(cert_file, key_file, client_ca_file, alpn=(HTTP11_ALPN,))
    # Plain HTTP sent to this port gets Go's 400 (transport.gotls).
    return await start_sniffing_tls_server(
        "frontend",
        lambda: HttpConnectProtocol(server),
        host,
        port,
        context=ctx,
        backlog=listen_backlog(),
        handshake_timeout=READ_HEADER_TIMEOUT,
    )
