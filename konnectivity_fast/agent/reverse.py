"""Node-to-control-plane tunneling, the agent's half (``node-to-cp.v1``,
docs/node-to-control-plane.md "The agent").

``LocalListeners`` listens on ``--bind-address`` at each ``--apiserver-port-mapping``'s
local port. Each accepted connection is carried over one server stream that negotiated
``node-to-cp.v1`` and is not draining (``ReverseStream``, one per such ``AgentClient``),
the one with the fewest open reverse connections, ties random:

1. ``DIAL_REQ{protocol:"tcp", address:<the mapping's host:port>, random:R}``, R non-zero
   and unique among the stream's pending dials;
2. ``DIAL_RSP{random:R, connectID:X}`` (X odd, the server's numbering): the socket becomes
   an ``Endpoint`` with X, and DATA flows both ways with forward tunnels' turn-taking
   (``endpoint``, ``sender``) and ``flow.v1``'s per-connection credit, which every reverse
   connection has whatever the stream negotiated for its forward tunnels (both ends of a
   node-to-cp.v1 stream are ours): a client that stops reading holds its own window,
   never the stream; ``DIAL_RSP{random:R, error}``: a denial (the
   allow-list or the server's cap) resets the client; a dial failure is tried once more
   on another capable server, then the client is reset;
3. the local client closes: ``CLOSE_REQ{X}`` after its last DATA; the server closes
   (``CLOSE_RSP{X}`` or ``CLOSE_REQ{X}``): what is queued is written, then the socket
   closes (a CLOSE_REQ is answered with ``CLOSE_RSP{X}``);
4. the client leaves, or no answer within ``--apiserver-port-mapping-dial-timeout``:
   ``DIAL_CLS{random:R}``; a ``DIAL_RSP`` that comes later is answered ``CLOSE_REQ{X}``.

Invariants:
- Nothing is read from a local socket before its DIAL_RSP: until then it is a bare socket
  watched for readability only, and the watch looks with ``MSG_PEEK``, which consumes
  nothing, so a retry on another server loses no byte. (A client that sent bytes and then
  left is noticed at the timeout: a peek cannot see an end behind data.)
- No reverse-direction packet is sent on a stream that did not negotiate the extension:
  a ``ReverseStream`` exists only on those (``AgentClient``).
- A local connection that is not carried is reset (RST: ``SO_LINGER`` 0), never left
  hanging; when a stream ends, exactly its reverse connections are reset.
- Every DIAL_RSP carrying a connectID ends in a carried connection or a CLOSE_REQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import TYPE_CHECKING

from konnectivity_fast.agent.endpoint import ENDPOINT_WRITE_BUDGET, Endpoint
from konnectivity_fast.agent.portmap import PortMapping
from konnectivity_fast.metrics import reverse as metrics
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.contract import is_refusal
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

if TYPE_CHECKING:
    from konnectivity_fast.agent.client import AgentClient

__all__ = [
    "DIAL_RETRIES",
    "LISTEN_BACKLOG",
    "ListenError",
    "LocalListeners",
    "NodeToCpConfig",
    "ReverseStream",
    "reset_socket",
]

log = logging.getLogger(__name__)

#: Another capable server is tried once after a dial failure: one replica with a broken
#: route to its API server should not fail the node's clients, and more tries would only
#: stretch a real outage past the clients' own timeouts.
DIAL_RETRIES = 1
#: Pending accepts per listener: node-local clients (kubelet, pods) reconnect in bursts
#: after a server restart; the kernel caps it at somaxconn anyway.
LISTEN_BACKLOG = 1024
#: Bytes the server may send on a connection between its DIAL_RSP and the moment the
#: local socket is handed to its endpoint (a few loop turns): one endpoint budget.
EARLY_DATA_LIMIT = ENDPOINT_WRITE_BUDGET
#: Seconds between refreshes of ``konnectivity_fast_agent_capable_servers`` (also set at
#: every accepted connection): servers come and go at the sync loop's pace, seconds.
CAPABLE_REFRESH_INTERVAL = 1.0
#: Seconds an accept loop waits after a failed accept (descriptors exhausted): no spin.
ACCEPT_RETRY_DELAY = 0.1
# struct linger {int l_onoff; int l_linger;}: on, 0 s: close() sends RST.
_LINGER_RESET = struct.pack("ii", 1, 0)
# Outcomes of one attempt on one server.
_OK, _DENIED, _FAILED, _TIMEOUT, _GONE, _LOST = "ok", "denied", "failed", "timeout", "gone", "lost"


class ListenError(Exception):
    """A local port could not be listened on (start-up fails with this text)."""


@dataclass(frozen=True)
class NodeToCpConfig:
    """The agent's node-to-control-plane flags, checked (cli/extensions.py)."""

    mappings: Sequence[PortMapping]
    bind_address: str = "127.0.0.1"
    dial_timeout: float = 10.0
    rng: Random = field(default_factory=Random)


def reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with RST, so its client fails at once instead of reading EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _reset_endpoint(endpoint: Endpoint) -> None:
    transport = endpoint.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    endpoint.abort()


@dataclass
class _Early:
    """DATA for a connection whose DIAL_RSP arrived but whose socket is not wrapped yet."""

    data: list[bytes | memoryview] = field(default_factory=list)
    size: int = 0
    closed: bool = False  # the server closed it meanwhile


class ReverseStream:
    """The reverse connections of one server stream that negotiated ``node-to-cp.v1``;
    the ``EndpointOwner`` of their endpoints (the stream's own calls do the sending)."""

    def __init__(self, client: AgentClient, rng: Random | None = None) -> None:
        self.client = client
        self._rng = rng or Random()
        self.endpoints: dict[int, Endpoint] = {}
        self._pending: dict[int, asyncio.Future[DialResponse]] = {}
        self._early: dict[int, _Early] = {}
        self._local_port: dict[int, str] = {}  # connectID -> its listener's port (metrics)

    @property
    def load(self) -> int:
        """Open and pending reverse connections (the server choice)."""
        return len(self.endpoints) + len(self._pending) + len(self._early)

    @property
    def over_budget(self) -> bool:
        return any(endpoint.over_budget for endpoint in self.endpoints.values())

    # -- EndpointOwner ---------------------------------------------------------------------

    @property
    def congested(self) -> bool:
        return self.client.congested

    def endpoint_data(self, endpoint: Endpoint, data: bytes) -> bool:
        return self.client.endpoint_data(endpoint, data)

    def endpoint_credit(self, endpoint: Endpoint, nbytes: int) -> None:
        self.client.endpoint_credit(endpoint, nbytes)

    def on_credit(self, connect_id: int, nbytes: int) -> None:
        """FLOW_CREDIT for a reverse connection: its client may send ``nbytes`` more."""
        endpoint = self.endpoints.get(connect_id)
        if endpoint is not None:  # else closed meanwhile: the credit is moot
            endpoint.add_credit(nbytes)

    def update_inbound(self) -> None:
        self.client.update_inbound()

    def endpoint_lost(self, endpoint: Endpoint, exc: Exception | None) -> None:
        cid = endpoint.connect_id
        if self.endpoints.get(cid) is not endpoint:
            return  # closed by the server or with the stream
        del self.endpoints[cid]
        self._closed(cid)
        sender = self.client.sender
        if sender is not None:
            sender.flush(endpoint)  # its last read goes out before the CLOSE_REQ
        log.log(V(3), "local connection %d closed (%s): CLOSE_REQ", cid, exc or "EOF")
        self.client.send_packet(Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=cid)))
        if endpoint.over_budget:
            self.client.update_inbound()

    def _closed(self, cid: int) -> None:
        port = self._local_port.pop(cid, None)
        if port is not None:
            metrics.LOCAL_CONNECTIONS.labels(port).dec()

    # -- packets from the server (AgentClient.on_message) ------------------------------------

    def on_dial_response(self, rsp: DialResponse) -> None:
        future = self._pending.pop(rsp.random, None)
        if future is not None and not future.done():
            if not rsp.error and rsp.connect_id:
                self._early[rsp.connect_id] = _Early()  # DATA may come before the socket
            future.set_result(rsp)
            return
        if rsp.connect_id and not rsp.error:
            # Late (after DIAL_CLS) or unknown: the server holds a connection nobody wants.
            log.log(V(2), "late DIAL_RSP for connection %d: CLOSE_REQ", rsp.connect_id)
            self.client.send_packet(
                Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=rsp.connect_id))
            )

    def on_data(self, connect_id: int, data: bytes | memoryview) -> bool:
        """DATA for a reverse connection; False: not one of ours."""
        endpoint = self.endpoints.get(connect_id)
        if endpoint is not None:
            endpoint.write(data)
            return True
        early = self._early.get(connect_id)
        if early is None:
            return False
        if not early.closed:
            early.data.append(data)
            early.size += len(data)
            if early.size > EARLY_DATA_LIMIT:
                early.closed = True
                early.data.clear()
        return True

    def on_close(self, connect_id: int, request: bool) -> bool:
        """The server closed a reverse connection (CLOSE_RSP, or CLOSE_REQ when
        ``request``); False: not one of ours (the caller answers as upstream)."""
        endpoint = self.endpoints.pop(connect_id, None)
        early = self._early.get(connect_id)
        if endpoint is None and early is None:
            return not request  # a CLOSE_RSP answering our CLOSE_REQ: nothing to do
        log.log(V(3), "server closed reverse connection %d", connect_id)
        if request:
            self.client.send_packet(
                Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=connect_id))
            )
        if early is not None:
            early.closed = True
            return True
        assert endpoint is not None
        self._closed(connect_id)
        sender = self.client.sender
        if sender is not None:
            sender.drop(endpoint)
        endpoint.close()  # what the server sent before goes out first
        if endpoint.over_budget:
            self.client.update_inbound()
        return True

    def lost(self) -> None:
        """The stream ended: reset exactly its reverse connections."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionResetError("the server stream ended"))
        self._pending.clear()
        for early in self._early.values():
            early.closed = True
        endpoints = list(self.endpoints.values())
        self.endpoints.clear()
        for endpoint in endpoints:
            self._closed(endpoint.connect_id)
            _reset_endpoint(endpoint)

    # -- dialing ---------------------------------------------------------------------------

    def _new_random(self) -> int:
        while True:
            value = self._rng.getrandbits(63)
            if value and value not in self._pending:
                return value

    async def carry(
        self, mapping: PortMapping, sock: socket.socket, timeout: float
    ) -> tuple[str, str]:
        """One attempt to carry ``sock`` to ``mapping`` through this stream: the outcome,
        and the server's error text. On ``_OK`` the socket belongs to its endpoint; on
        anything else it is still the caller's, unread."""
        client = self.client
        loop = asyncio.get_running_loop()
        rnd = self._new_random()
        future: asyncio.Future[DialResponse] = loop.create_future()
        self._pending[rnd] = future
        request = DialRequest(protocol="tcp", address=mapping.address, random=rnd)
        if not client.send_packet(Packet(PacketType.DIAL_REQ, request)):
            self._pending.pop(rnd, None)
            return _LOST, "the server stream ended"
        gone: asyncio.Future[None] = loop.create_future()
        fd = sock.fileno()
        loop.add_reader(fd, _peek, loop, sock, gone)
        try:
            await asyncio.wait((future, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(rnd, future)
            raise
        finally:
            loop.remove_reader(fd)
        if not future.done():
            self._abandon(rnd, future)
            return (_GONE, "the client left") if gone.done() else (_TIMEOUT, "no answer")
        if future.exception() is not None:
            return _LOST, str(future.exception())
        rsp = future.result()
        if rsp.error:
            return (_DENIED if is_refusal(rsp.error) else _FAILED), rsp.error
        return await self._establish(mapping, sock, rsp.connect_id)

    def _abandon(self, rnd: int, future: asyncio.Future[DialResponse]) -> None:
        """The client left or the wait ended: DIAL_CLS, unless the DIAL_RSP is in (then
        the connection it made is closed)."""
        if self._pending.pop(rnd, None) is not None:
            self.client.send_packet(Packet(PacketType.DIAL_CLS, CloseDial(random=rnd)))
            return
        if future.done() and future.exception() is None:
            rsp = future.result()
            if rsp.connect_id and not rsp.error:
                self._early.pop(rsp.connect_id, None)
                self.client.send_packet(
                    Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=rsp.connect_id))
                )

    async def _establish(
        self, mapping: PortMapping, sock: socket.socket, cid: int
    ) -> tuple[str, str]:
        client = self.client
        if cid % 2 == 0 or cid in self.endpoints:
            log.warning("server %s answered with connectID %d: refused", client.server_id, cid)
            self._early.pop(cid, None)
            if cid not in self.endpoints:
                client.send_packet(Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=cid)))
            return _FAILED, f"bad connectID {cid}"
        loop = asyncio.get_running_loop()
        endpoint = Endpoint(client.pool, self, cid, mapping.address, loop.time())
        endpoint.enable_flow()  # credit both ways from the DIAL_RSP, as the server counts
        try:
            await loop.connect_accepted_socket(lambda: endpoint, sock)
        except BaseException:
            self._early.pop(cid, None)
            client.send_packet(Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=cid)))
            raise
        early = self._early.pop(cid, None)
        if client.closed or early is None:  # the stream ended meanwhile
            _reset_endpoint(endpoint)
            return _OK, ""
        self.endpoints[cid] = endpoint
        port = str(mapping.local_port)
        self._local_port[cid] = port
        metrics.LOCAL_CONNECTIONS.labels(port).inc()
        for data in early.data:
            endpoint.write(data)
        if early.closed:
            self.endpoints.pop(cid, None)
            self._closed(cid)
            endpoint.close()
            return _OK, ""
        endpoint.start_reading()
        return _OK, ""


def _peek(loop: asyncio.AbstractEventLoop, sock: socket.socket, gone: asyncio.Future[None]) -> None:
    """The pending client's socket is readable: gone (EOF or error), or it sent bytes,
    which stay in the socket (then stop watching: see the module docstring)."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data and not gone.done():
        gone.set_result(None)
    loop.remove_reader(sock.fileno())


class LocalListeners:
    """The ``--apiserver-port-mapping`` listeners of this agent and the choice of server
    stream for each connection they accept."""

    def __init__(
        self,
        config: NodeToCpConfig,
        streams: Callable[[], Sequence[ReverseStream]],
    ) -> None:
        self.config = config
        self._streams = streams
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # connections being set up
        self._warned: set[int] = set()  # local ports whose refusal was logged as a warning
        self.closed = False

    def start(self) -> None:
        """Listen on every mapping's port; raises ``ListenError`` (nothing left open)."""
        loop = asyncio.get_running_loop()
        for mapping in self.config.mappings:
            try:
                sock = self._listen(mapping.local_port)
            except OSError as exc:
                self.close()
                host = self.config.bind_address
                shown = f"[{host}]" if ":" in host else host
                reason = (
                    "address already in use"
                    if exc.errno == errno.EADDRINUSE
                    else (exc.strerror or str(exc)).lower()
                )
                raise ListenError(
                    f"failed to start listening with listen tcp {shown}:{mapping.local_port}: "
                    f"bind: {reason}"
                ) from None
            self._sockets.append(sock)
            self._accepting.append(loop.create_task(self._accept_loop(sock, mapping)))
            log.info(
                "listening on %s:%d for %s", self.config.bind_address, mapping.local_port, mapping
            )
        self._accepting.append(loop.create_task(self._refresh_capable()))

    def _listen(self, port: int) -> socket.socket:
        host = self.config.bind_address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go's listeners
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        """Stop accepting (the first SIGTERM); carried connections go on."""
        if self.closed:
            return
        self.closed = True
        for task in self._accepting:
            task.cancel()
        # Closed once the accepts are cancelled (their wake-ups are queued first), so no
        # loop watches a closed descriptor.
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.call_soon(sock.close)
        self._sockets.clear()

    async def stop(self) -> None:
        """Close the listeners and end every connection still being set up."""
        self.close()
        tasks = [*self._accepting, *self._tasks]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _accept_loop(self, listener: socket.socket, mapping: PortMapping) -> None:
        loop = asyncio.get_running_loop()
        while not self.closed:
            try:
                sock, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if self.closed:
                    return
                log.warning("accepting on port %d failed: %s", mapping.local_port, exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            sock.setblocking(False)
            task = loop.create_task(self._carry(mapping, sock))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _refresh_capable(self) -> None:
        while not self.closed:
            self.capable()
            await asyncio.sleep(CAPABLE_REFRESH_INTERVAL)

    def capable(self) -> list[ReverseStream]:
        streams = list(self._streams())
        metrics.CAPABLE_SERVERS.set(len(streams))
        return streams

    def _choose(self, exclude: set[ReverseStream]) -> ReverseStream | None:
        candidates = [s for s in self.capable() if s not in exclude]
        if not candidates:
            return None
        least = min(s.load for s in candidates)
        return self.config.rng.choice([s for s in candidates if s.load == least])

    async def _carry(self, mapping: PortMapping, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        port = str(mapping.local_port)
        start = loop.time()
        tried: set[ReverseStream] = set()
        result = metrics.ERROR
        owned = True
        try:
            for attempt in range(1 + DIAL_RETRIES):
                stream = self._choose(tried)
                if stream is None:
                    if attempt == 0:
                        result = metrics.NO_SERVER
                        log.log(V(2), "no server carries node-to-cp.v1: resetting a client")
                    break
                tried.add(stream)
                outcome, text = await stream.carry(mapping, sock, self.config.dial_timeout)
                if outcome == _OK:
                    owned = False
                    result = metrics.OK
                    metrics.LOCAL_DIAL_DURATION.labels(port).observe(loop.time() - start)
                    break
                log.log(
                    V(2),
                    "local connection on port %d through server %s: %s %s",
                    mapping.local_port,
                    stream.client.server_id,
                    outcome,
                    text,
                )
                if outcome == _DENIED:
                    result = metrics.REJECTED
                    if mapping.local_port not in self._warned:
                        # A refusal is a configuration mismatch (the mapping is not on
                        # the server's allow-list): say it once per mapping, loudly.
                        self._warned.add(mapping.local_port)
                        log.warning(
                            "server %s refuses %s: %s (check its --allowed-destination)",
                            stream.client.server_id,
                            mapping.address,
                            text,
                        )
                    break
                if outcome == _TIMEOUT:
                    result = metrics.TIMEOUT
                    break
                if outcome == _GONE:
                    break
        finally:
            if owned:
                reset_socket(sock)
            metrics.LOCAL_CONNECTIONS_TOTAL.labels(port, result).inc()
