"""Listening sockets whose connections we accept ourselves, so that running out of file
descriptors is survived the way Go survives it.

When ``accept`` fails for lack of descriptors (EMFILE, ENFILE) or of kernel memory, Go's
accept loops (grpc-go ``server.go`` ``Server.Serve``, net/http's ``Server.Serve``) wait
5 ms, then twice as long each time up to 1 s, and try again, leaving the connections in the
kernel's backlog meanwhile: they are served as soon as descriptors free up. libuv, under
uvloop, instead accepts and closes every waiting connection at once (its "EMFILE trick"),
without a word: clients are reset, and an agent reconnecting then backs off for seconds.
``Listener`` does what Go does, waiting at most ``ACCEPT_RETRY_MAX``, and says so in the
log, in grpc-go's words with the listener and the descriptor limit added, at a bounded
rate (``ratelog``): ``Accept error: accept tcp 127.0.0.1:8091: accept4: too many open
files; retrying in 5ms (agent listener, open files limit 1024)``. Each failure is also
reported to the process's observer (``set_exhaustion_observer``: the programs count them in
``konnectivity_fast_accept_exhausted_total``).

Each accepted socket becomes a transport through ``loop.connect_accepted_socket`` (TLS
handshake included, in a task of its own); the listener keeps the sockets' creation as
``loop.create_server`` and ``create_unix_server`` do it (one socket per address of the host,
``SO_REUSEADDR``, IPv6-only IPv6 sockets, a stale Unix socket file replaced, Go's backlog).

Sockets bound by another process can be handed over (``adopt_sockets``): a listener asked
for an address that has one listens on it instead of binding, so that the proxy-server's
worker processes (``--workers``) accept from the sockets their supervisor bound once.
``bind_tcp`` and ``bind_unix`` are the binding half of ``listen_tcp`` and ``listen_unix``.

Invariants: a listener accepts only while started and not closed; while it waits after an
exhaustion its socket is not watched at all (no busy loop); every handshake task is kept
until it ends and cancelled by ``close()``; an accepted socket is owned by its transport
from the moment ``connect_accepted_socket`` runs, or closed here if that never happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import ssl as ssl_module
import stat
from collections.abc import Callable
from typing import Any

from konnectivity_fast.transport.ratelog import RateLimitedLog

__all__ = [
    "ACCEPTS_PER_WAKEUP",
    "ACCEPT_RETRY_FIRST",
    "ACCEPT_RETRY_MAX",
    "Listener",
    "adopt_sockets",
    "bind_tcp",
    "bind_unix",
    "listen_tcp",
    "listen_unix",
    "set_exhaustion_observer",
]

log = logging.getLogger(__name__)

#: Go's first wait after a failed accept (grpc-go server.go Serve, net/http Server.Serve).
ACCEPT_RETRY_FIRST = 0.005
#: The longest wait between two tries. Go waits up to 1 s; a quarter of that brings back a
#: connection that waited in the backlog (an agent reconnecting) well within a second of
#: the descriptors' release, for four failed accept calls a second while exhausted.
ACCEPT_RETRY_MAX = 0.25
#: Connections accepted per wake-up of the loop before the others get a turn (asyncio's
#: own loop accepts up to its backlog argument, libuv until the queue is empty).
ACCEPTS_PER_WAKEUP = 128
#: accept() errors that mean "no resources now": wait and retry, the connection waits.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ProtocolFactory = Callable[[], asyncio.BaseProtocol]
#: Told of every accept that failed for lack of resources: (listener name, errno name).
ExhaustionObserver = Callable[[str, str], None]

# The process's observer, if any (its metric: transport/ imports no metrics, the programs
# set it).
_observers: list[ExhaustionObserver] = []


#: The address of a listening socket, as the listener is asked for it: ("tcp", host, port)
#: (host "" for every interface) or ("unix", path, 0).
SocketKey = tuple[str, str, int]

# Sockets bound elsewhere and handed to this process, by the address they were bound for;
# each is taken by the first listener asked for that address.
_adopted: dict[SocketKey, list[socket.socket]] = {}


def adopt_sockets(key: SocketKey, sockets: list[socket.socket]) -> None:
    """Have the next listener asked for ``key`` listen on ``sockets`` (bound, listening)
    instead of binding its own."""
    _adopted[key] = sockets


def set_exhaustion_observer(observer: ExhaustionObserver | None) -> None:
    """Have ``observer`` told of each failed accept from now on (None: nobody)."""
    _observers[:] = [] if observer is None else [observer]


def _go_duration(seconds: float) -> str:
    """Go's ``time.Duration`` text for the waits used here (``5ms``, ``1s``)."""
    millis = round(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def _open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _address(sock: socket.socket) -> tuple[str, str]:
    """Go's network name and address text of a listening socket."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return "unix", str(name)
    host, port = name[0], name[1]
    return "tcp", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Listener:
    """Listening sockets and the accepting of their connections: the part of
    ``asyncio.Server`` the programs use (``sockets``, ``close``, ``wait_closed``)."""

    def __init__(
        self,
        name: str,
        sockets: list[socket.socket],
        factory: ProtocolFactory,
        *,
        ssl: ssl_module.SSLContext | None = None,
        ssl_handshake_timeout: float | None = None,
        ssl_shutdown_timeout: float | None = None,
    ) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._sockets = sockets
        self._factory = factory
        self._ssl = ssl
        self._ssl_args: dict[str, Any] = {}
        if ssl is not None:
            self._ssl_args = {
                "ssl": ssl,
                "ssl_handshake_timeout": ssl_handshake_timeout,
                "ssl_shutdown_timeout": ssl_shutdown_timeout,
            }
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retry: dict[int, float] = {}  # fd -> the wait after its last failed accept
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._exhausted_since: dict[int, float] = {}
        self._closed = False
        # TCP sockets get TCP_NODELAY as uvloop's own servers set it (read once: the
        # socket's ``family`` property builds an enum each time).
        self._tcp = bool(sockets) and sockets[0].family != socket.AF_UNIX
        # Accept errors come in bursts (every retry while exhausted): a few lines per
        # listener and interval, the rest counted.
        self._log_error = RateLimitedLog(log, logging.ERROR)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    def is_serving(self) -> bool:
        return not self._closed

    def start(self) -> None:
        for sock in self._sockets:
            sock.setblocking(False)
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop listening and cancel handshakes in progress (established connections are
        their owners' to end, as with ``asyncio.Server``)."""
        if self._closed:
            return
        self._closed = True
        for sock in self._sockets:
            fd = sock.fileno()
            timer = self._timers.pop(fd, None)
            if timer is not None:
                timer.cancel()
            else:
                self._loop.remove_reader(fd)
            sock.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    # -- accepting --

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited: nothing to do
            except OSError as exc:
                self._accept_failed(sock, exc)
                return
            self._accepted(sock)
            self._start_connection(conn)

    def _accepted(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._retry.pop(fd, None) is not None:
            since = self._exhausted_since.pop(fd, self._loop.time())
            network, address = _address(sock)
            log.info(
                "Accepting again on %s listener %s %s after %.1fs without resources",
                self.name,
                network,
                address,
                self._loop.time() - since,
            )

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        """Log it, stop watching the socket, and look again after Go's growing wait."""
        fd = sock.fileno()
        delay = self._retry.get(fd)
        delay = ACCEPT_RETRY_FIRST if delay is None else min(2 * delay, ACCEPT_RETRY_MAX)
        self._retry[fd] = delay
        self._exhausted_since.setdefault(fd, self._loop.time())
        network, address = _address(sock)
        text = os.strerror(exc.errno) if exc.errno else str(exc)
        self._log_error(
            "Accept error: accept %s %s: accept4: %s; retrying in %s (%s listener, open "
            "files limit %d)",
            network,
            address,
            text[:1].lower() + text[1:],
            _go_duration(delay),
            self.name,
            _open_files_limit(),
        )
        if exc.errno not in _EXHAUSTED:
            log.debug("unexpected accept error on %s listener: %r", self.name, exc)
        for observe in _observers:
            observe(self.name, errno.errorcode.get(exc.errno or 0, str(exc.errno)))
        self._loop.remove_reader(fd)
        self._timers[fd] = self._loop.call_later(delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._timers.pop(sock.fileno(), None)
        if self._closed:
            return
        self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._accept(sock)

    def _start_connection(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            conn.close()  # the client already left
            return
        started: list[bool] = []
        task = self._loop.create_task(self._connect(conn, started))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before it ran never handed the socket to a transport.
        task.add_done_callback(lambda _: None if started else conn.close())

    async def _connect(self, conn: socket.socket, started: list[bool]) -> None:
        started.append(True)
        # From here the transport owns the socket (uvloop detaches it when it closes): it
        # must not be closed here, even on failure, or a reused descriptor could be.
        try:
            await self._loop.connect_accepted_socket(self._factory, conn, **self._ssl_args)
        except (OSError, TimeoutError) as exc:
            # A failed TLS handshake, or a client gone before it began.
            log.debug("%s listener: connection not set up: %r", self.name, exc)


def bind_tcp(host: str | None, port: int, *, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address of ``host`` (None: all interfaces), as
    ``listen_tcp`` binds them."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return _bind_all(infos, backlog)


def _bind_all(infos: list[Any], backlog: int) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"error while attempting to bind on address {address!r}: "
                    f"{(exc.strerror or '').lower()}",
                ) from None
            sock.listen(backlog)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def listen_tcp(
    name: str,
    factory: ProtocolFactory,
    host: str | None,
    port: int,
    *,
    backlog: int,
    ssl: ssl_module.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
    listener_class: type[Listener] = Listener,
) -> Listener:
    """Listen on every address of ``host`` (None: all interfaces) as
    ``loop.create_server`` would, and start accepting (with ``listener_class``: a
    ``Listener`` that does more per connection, such as ``transport.gotls``'s)."""
    sockets = _adopted.pop(("tcp", host or "", port), None)
    if sockets is None:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        sockets = _bind_all(infos, backlog)
    else:
        for sock in sockets:
            sock.listen(backlog)  # the adopting listener's backlog, not the binder's
    listener = listener_class(
        name,
        sockets,
        factory,
        ssl=ssl,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout,
    )
    listener.start()
    return listener


def bind_unix(path: str, *, backlog: int) -> socket.socket:
    """A listening Unix socket at ``path``, as ``listen_unix`` binds it (a stale socket
    file there is replaced, any other file is an error)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
            raise
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


async def listen_unix(
    name: str,
    factory: ProtocolFactory,
    path: str,
    *,
    backlog: int,
    ssl: ssl_module.SSLContext | None = None,
    ssl_handshake_timeout: float | None = None,
    ssl_shutdown_timeout: float | None = None,
) -> Listener:
    """Listen on the Unix socket ``path`` as ``loop.create_unix_server`` would (a stale
    socket file there is replaced, any other file is an error), and start accepting."""
    adopted = _adopted.pop(("unix", path, 0), None)
    if adopted is None:
        sock = bind_unix(path, backlog=backlog)
    else:
        (sock,) = adopted
        sock.listen(backlog)
    listener = Listener(
        name,
        [sock],
        factory,
        ssl=ssl,
        ssl_handshake_timeout=ssl_handshake_timeout,
        ssl_shutdown_timeout=ssl_shutdown_timeout,
    )
    listener.start()
    return listener
