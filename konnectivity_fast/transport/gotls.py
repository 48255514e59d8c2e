"""A TLS listener for HTTP/1 that answers plain HTTP the way Go's ``net/http`` does.

Go's HTTPS server reads the first TLS record header of a connection (5 bytes). When it is
not a handshake (or alert) record, the handshake fails; when those 5 bytes are also the
start of an HTTP request (``GET /``, ``HEAD ``, ``POST ``, ``PUT /``, ``OPTIO``), it first
writes ``HTTP/1.0 400 Bad Request`` and "Client sent an HTTP request to an HTTPS server."
(crypto/tls ``RecordHeaderError``, net/http ``tlsRecordHeaderLooksLikeHTTP``). Anything else
that is not TLS is closed without a word (no TLS alert either).

asyncio's TLS servers cannot do that: they hand the first bytes to OpenSSL, and uvloop
starts reading a connection before its protocol could pause it. So this listener (a
``transport.accept.Listener``, which accepts connections itself) peeks at the first bytes
with ``MSG_PEEK`` (nothing is consumed from a TLS client), and only then passes the socket
to ``loop.connect_accepted_socket`` with the TLS context, or answers and closes it.

Invariants: a connection is either handed to TLS untouched or closed by us; every sniffed
socket is closed when the server closes; the sniffing phase is bounded by the handshake
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from konnectivity_fast.transport.accept import Listener, listen_tcp

__all__ = [
    "PLAIN_HTTP_REPLY",
    "SniffingTlsListener",
    "looks_like_http",
    "start_sniffing_tls_server",
]

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


def looks_like_http(header: bytes) -> bool:
    """Go's test: are these first 5 bytes the start of a plain HTTP request?"""
    return header[:RECORD_HEADER] in _HTTP_STARTS


class _Sniff:
    """One accepted connection until it is known to speak TLS (or not)."""

    def __init__(self, server: SniffingTlsListener, sock: socket.socket) -> None:
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


class SniffingTlsListener(Listener):
    """A TLS ``Listener`` (``transport.accept``: its accept loop, its waits when descriptors
    run out) whose connections are sniffed before they are handed to TLS."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = asyncio.get_running_loop()
        # Sniffing counts against the handshake's time (the module's invariants).
        timeout = self._ssl_args.get("ssl_handshake_timeout")
        assert timeout is not None, "a sniffing listener needs a handshake timeout"
        self.handshake_timeout = float(timeout)
        self.sniffing: set[_Sniff] = set()

    def _start_connection(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()  # the client already left
            return
        self.sniffing.add(_Sniff(self, conn))

    def hand_over(self, sock: socket.socket) -> None:
        """A TLS client: the loop's TLS transport takes the socket, as if it had accepted
        it (the protocol's ``connection_made`` comes after the handshake)."""
        super()._start_connection(sock)

    def close(self) -> None:
        super().close()
        for sniff in list(self.sniffing):
            sniff.close()


async def start_sniffing_tls_server(
    name: str,
    factory: Callable[[], asyncio.BaseProtocol],
    host: str | None,
    port: int,
    *,
    context: ssl.SSLContext,
    backlog: int,
    handshake_timeout: float,
) -> SniffingTlsListener:
    """Listen on ``host:port`` for TLS, answering plain HTTP as Go does (module doc)."""
    listener = await listen_tcp(
        name,
        factory,
        host,
        port,
        backlog=backlog,
        ssl=context,
        ssl_handshake_timeout=handshake_timeout,
        listener_class=SniffingTlsListener,
    )
    assert isinstance(listener, SniffingTlsListener)
    return listener
