"""A TLS listener for HTTP/1 that answers plain HTTP the way Go's ``net/http`` does.

Go's HTTPS server reads the first TLS record header of a connection (5 bytes). When it is
not a handshake (or alert) record, the handshake fails; when those 5 bytes are also the
start of an HTTP request (``GET /``, ``HEAD ``, ``POST ``, ``PUT /``, ``OPTIO``), it first
writes ``HTTP/1.0 400 Bad Request`` and "Client sent an HTTP request to an HTTPS server."
(crypto/tls ``RecordHeaderError``, net/http ``tlsRecordHeaderLooksLikeHTTP``). Anything else
that is not TLS is closed without a word (no TLS alert either).

asyncio's TLS servers cannot do that: they hand the first bytes to OpenSSL, and uvloop
starts reading a connection before its protocol could pause it. So this listener accepts
connections itself, peeks at the first bytes with ``MSG_PEEK`` (nothing is consumed from a
TLS client), and only then passes the socket to ``loop.connect_accepted_socket`` with the
TLS context, or answers and closes it.

Invariants: a connection is either handed to TLS untouched or closed by us; every sniffed
socket is closed when the server closes; the sniffing phase is bounded by the handshake
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

__all__ = ["PLAIN_HTTP_REPLY", "SniffingTlsServer", "looks_like_http", "start_sniffing_tls_server"]

log = logging.getLogger(__name__)

#: What Go writes to a plain HTTP request on a TLS port, then it closes.
PLAIN_HTTP_REPLY = (
    b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
)
#: A TLS record header: type (1), version (2), length (2). Go decides on these 5 bytes.
RECORD_HEADER = 5
# The record types a client's first record may have (Go: handshake or alert).
_TLS_FIRST_TYPES = (0x15, 0x16)
# Go's tlsRecordHeaderLooksLikeHTTP.
_HTTP_STARTS = frozenset((b"GET /", b"HEAD ", b"POST ", b"PUT /", b"OPTIO"))
#: Bytes already received that are read and dropped before closing a non-TLS client.
DRAIN_BYTES = 64 << 10
#: Seconds the accept loop pauses after running out of file descriptors (as asyncio does).
ACCEPT_RETRY_DELAY = 1.0


def looks_like_http(header: bytes) -> bool:
    """Go's test: are these first 5 bytes the start of a plain HTTP request?"""
    return header[:RECORD_HEADER] in _HTTP_STARTS


class _Sniff:
    """One accepted connection until it is known to speak TLS (or not)."""

    def __init__(self, server: SniffingTlsServer, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.seen = b""  # bytes consumed from a client that is not speaking TLS
        loop = server.loop
        self.timer = loop.call_later(server.handshake_timeout, self.close)
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            if not self.seen:
                first = self.sock.recv(RECORD_HEADER, socket.MSG_PEEK)
                if first and first[0] in _TLS_FIRST_TYPES:
                    self._to_tls()
                    return
            # Not TLS: read (not peek) the rest of the 5 bytes, so a slow client cannot
            # keep the reader busy; this connection will never be handed to TLS.
            data = self.sock.recv(RECORD_HEADER - len(self.seen))
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.seen += data
        if len(self.seen) < RECORD_HEADER:
            return
        # Go's TLS reader took what had arrived with its first read: drain it likewise, so
        # that closing sends a FIN, not a reset that could destroy the reply in flight.
        with contextlib.suppress(OSError):
            self.sock.recv(DRAIN_BYTES)
        if looks_like_http(self.seen):
            with contextlib.suppress(OSError):
                self.sock.send(PLAIN_HTTP_REPLY)
        self.close()

    def _detach(self) -> None:
        self.timer.cancel()
        self.server.loop.remove_reader(self.sock.fileno())
        self.server.sniffing.discard(self)

    def _to_tls(self) -> None:
        self._detach()
        self.server.hand_over(self.sock)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self._detach()
            self.sock.close()


class SniffingTlsServer(asyncio.Server):
    """The listening sockets, their accept loop and the connections being sniffed.

    Only what callers of an ``asyncio.Server`` here use is provided (``sockets``,
    ``close``, ``wait_closed``, ``is_serving``); asyncio's own serving machinery is not."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: list[socket.socket],
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        handshake_timeout: float,
    ) -> None:
        super().__init__(loop, [], factory, context, 0, handshake_timeout)
        self.loop = loop
        self.listeners = listeners
        self.factory = factory
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.sniffing: set[_Sniff] = set()
        self.handshakes: set[asyncio.Task[Any]] = set()
        self._open = True
        for sock in listeners:
            loop.add_reader(sock.fileno(), self._accept, sock)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self.listeners)

    def is_serving(self) -> bool:
        return self._open

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE and friends: pause accepting for a while
                log.error("accept failed on %s: %s", listener.getsockname(), exc)
                self.loop.remove_reader(listener.fileno())
                self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accept, listener)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sniffing.add(_Sniff(self, sock))

    def _resume_accept(self, listener: socket.socket) -> None:
        if self._open:
            self.loop.add_reader(listener.fileno(), self._accept, listener)

    def hand_over(self, sock: socket.socket) -> None:
        """A TLS client: the loop's TLS transport takes the socket, as if it had accepted
        it (the protocol's ``connection_made`` comes after the handshake)."""
        task = self.loop.create_task(self._handshake(sock))
        self.handshakes.add(task)
        task.add_done_callback(self.handshakes.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(
                self.factory,
                sock,
                ssl=self.context,
                ssl_handshake_timeout=self.handshake_timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            sock.close()
        except asyncio.CancelledError:  # the server closed during the handshake
            sock.close()
            raise

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        for listener in self.listeners:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(listener.fileno())
            listener.close()
        for sniff in list(self.sniffing):
            sniff.close()
        for task in list(self.handshakes):
            task.cancel()

    async def wait_closed(self) -> None:
        if self.handshakes:
            await asyncio.gather(*self.handshakes, return_exceptions=True)


def _listeners(host: str | None, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets as asyncio's ``create_server`` makes them: one per address of
    ``host`` (every interface, IPv4 and IPv6, when empty)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    listeners: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            listeners.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError:
        for sock in listeners:
            sock.close()
        raise
    return listeners


async def start_sniffing_tls_server(
    factory: Callable[[], asyncio.Protocol],
    host: str | None,
    port: int,
    *,
    context: ssl.SSLContext,
    backlog: int,
    handshake_timeout: float,
) -> SniffingTlsServer:
    """Listen on ``host:port`` for TLS, answering plain HTTP as Go does (module doc)."""
    loop = asyncio.get_running_loop()
    return SniffingTlsServer(
        loop, _listeners(host, port, backlog), factory, context, handshake_timeout
    )
