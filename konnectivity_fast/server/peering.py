"""Server peering, the asyncio side (ours, beyond upstream; docs/high-availability.md,
"Server peering"): the streams this server opens to its peers, where peers come from, and
the start-up of the whole (the listener itself is ``server.peer_listener``).

When no agent here can take a dial, ``tunnel.peering.PeeringRouter`` emits ``ForwardDial``
and ``PeerForwarder.forward`` offers the dial to the peers, one at a time, in random order:

1. a connection to the peer (one HTTP/2 connection per peer, kept and shared by every
   forwarded dial; TCP + mTLS, made within ``PEER_CONNECT_TIMEOUT``; a peer that could
   not be reached is skipped for ``PEER_RETRY_AFTER``);
2. a ``/ProxyService/Proxy`` stream on it with ``kf-forwarded-from: <our server ID>``, and
   DIAL_REQ with the frontend's protocol and address and the peer backend's own random;
3. the peer's first packet must be that dial's DIAL_RSP. ``No agent available`` (or a
   failure to connect, a refused certificate, a stream that ends first) moves on to the
   next peer; any other answer is the dial's (``PeeringRouter.peer_answered``), and the
   stream then carries the tunnel: ``_PeerStream`` relays it as an agent stream is
   relayed (``server.proxy``), with the same buffering toward the frontend
   (``server.buffering``: the peer stream is rationed or paused like an agent stream) and
   the same backpressure toward the peer (``CALL_SEND_HIGH_WATER`` pauses the frontend).
   When every peer failed, the frontend gets upstream's ``No agent available`` at once.

We verify the peers we dial against the peer CA (``peer_client_context``), as the peer
listener (``server.peer_listener``) verifies the servers that dial it.

Peers come from a ``PeerSource``, a function returning server ID -> address (read at each
forwarded dial, so a source may change at run time); ``static_peers`` wraps
``--peer-endpoints`` and ``union_peers`` combines sources (the first naming an ID wins).
Our own server ID is always left out.

Invariants:
- One forwarding task per forwarded dial, at most one attempt (stream) at a time; it ends
  once the dial is answered, cancelled or refused by every peer.
- A stream opened here ends when the router forgets its ``PeerBackend`` (``EndPeer``: a
  half-close, after a DIAL_CLS when the dial was still unanswered), or with its connection.
- Nothing here blocks the loop; a peer that does not answer costs its own dial only.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Mapping
from random import Random
from typing import Any, Protocol

from konnectivity_fast.metrics import peering as peer_metrics
from konnectivity_fast.server.listeners import TlsSettings
from konnectivity_fast.server.peer_listener import start_peer_listener
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.server.startup import check_tls_files, host_port, listen_error
from konnectivity_fast.transport import tls
from konnectivity_fast.transport.call import GrpcCall, GrpcError
from konnectivity_fast.transport.grpc import GrpcProtocol, GrpcServer, connect
from konnectivity_fast.tunnel import Backend, PeerBackend, PeeringRouter, PendingDial
from konnectivity_fast.tunnel.peering import is_no_agent
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.codec import decode_packet, encode_packet, peek_packet
from konnectivity_fast.wire.contract import PROXY_PATH
from konnectivity_fast.wire.endpoints import MD_FORWARDED_FROM, Address, parse_address
from konnectivity_fast.wire.errors import CodecError
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)

__all__ = [
    "PEER_CONNECT_TIMEOUT",
    "PEER_RETRY_AFTER",
    "PeerForwarder",
    "PeerSource",
    "PeeringRunOptions",
    "parse_peer_endpoints",
    "peer_advertised",
    "peer_client_context",
    "start_peer_listener",
    "start_peering",
    "static_peers",
    "union_peers",
]

log = logging.getLogger(__name__)

#: Server ID -> the address of its peer listener.
PeerSource = Callable[[], Mapping[str, Address]]

# A TCP + TLS handshake inside a control plane takes milliseconds; a peer that has not
# answered in 5 s is down or cut off, and the next one is tried while the client (whose own
# dial timeouts are 10 s and more) still waits.
PEER_CONNECT_TIMEOUT = 5.0
# A peer that could not be reached is skipped for this long, so that a down (or black-holed)
# peer costs one failed attempt, not one per dial, while a restarted one is back within
# seconds. The client then gets its answer from the other peers, at once.
PEER_RETRY_AFTER = 5.0

_DATA = int(PacketType.DATA)
_DIAL_RSP = int(PacketType.DIAL_RSP)


def parse_peer_endpoints(text: str) -> dict[str, Address]:
    """``--peer-endpoints``: ``<server id>=<host:port>`` items joined by commas (empty
    items ignored); raises ``ValueError`` naming the first bad item."""
    peers: dict[str, Address] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        server_id, sep, address = item.partition("=")
        server_id = server_id.strip()
        if not sep or not server_id:
            raise ValueError(f"{item!r} is not <server id>=<host:port>")
        if server_id in peers:
            raise ValueError(f"server ID {server_id!r} is listed twice")
        peers[server_id] = parse_address(address.strip())
    return peers


def static_peers(peers: Mapping[str, Address]) -> PeerSource:
    """A source that always returns ``peers`` (``--peer-endpoints``)."""
    frozen = dict(peers)
    return lambda: frozen


def union_peers(*sources: PeerSource) -> PeerSource:
    """A source combining ``sources``; for an ID several name, the first one's address."""

    def peers() -> Mapping[str, Address]:
        found: dict[str, Address] = {}
        for source in sources:
            for server_id, address in source().items():
                found.setdefault(server_id, address)
        return found

    return peers


def peer_client_context(
    ca_file: str, cert_file: str, key_file: str, settings: TlsSettings
) -> ssl.SSLContext:
    """TLS toward peers: our certificate as the client's, theirs verified against
    ``ca_file``. Host names are not checked: peers are dialled at whatever address the
    operator or their lease gives (a pod IP, say), which server certificates rarely name;
    the chain to the peer CA is what admits a peer, on both ends."""
    ctx = tls.client_context(ca_file, cert_file, key_file, minimum_version=settings.minimum_version)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _PeerStream:
    """The sink of one stream this server opened to a peer: first the dial's answer, then
    the tunnel's relay (as ``server.proxy``'s agent streams)."""

    __slots__ = ("answer", "backend", "dial", "forwarder", "peer_id", "relaying")

    def __init__(
        self, forwarder: PeerForwarder, dial: PendingDial, backend: PeerBackend, peer_id: str
    ) -> None:
        self.forwarder = forwarder
        self.dial = dial
        self.backend = backend
        self.peer_id = peer_id
        self.relaying = False
        # The attempt's result (metrics.peering DIAL_*), once the peer answered or failed.
        self.answer: asyncio.Future[str] = forwarder.proxy.loop.create_future()

    def _settle(self, result: str) -> None:
        if not self.answer.done():
            self.answer.set_result(result)
            peer_metrics.dialled(result)

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        if self.relaying:
            self._relay(call, message)
            return
        if self.answer.done():
            return  # given up on (cancelled or refused): the stream is ending
        try:
            packet = decode_packet(message)
        except CodecError as exc:
            self._refuse(call, f"undecodable packet: {exc}")
            return
        payload = packet.payload
        if (
            packet.type != _DIAL_RSP
            or not isinstance(payload, DialResponse)
            or payload.random != self.backend.sent_random
        ):
            self._refuse(call, f"expected the DIAL_RSP, got packet type {packet.type}")
            return
        if is_no_agent(payload.error):
            log.log(V(3), "peer %s has no agent for %s either", self.peer_id, self.dial.address)
            self._settle(peer_metrics.DIAL_NO_AGENT)
            call.done_writing()
            return
        self._settle(peer_metrics.DIAL_OK)
        proxy = self.forwarder.proxy
        router: PeeringRouter = proxy.router  # type: ignore[assignment]
        effects = router.peer_answered(self.dial, self.peer_id, call, payload, proxy.loop.time())
        if effects is None:  # the dial was cancelled meanwhile: close what the peer opened
            if payload.connect_id and not payload.error:
                request = CloseRequest(connect_id=payload.connect_id)
                self.forwarder.send(call, Packet(PacketType.CLOSE_REQ, request))
            call.done_writing()
            return
        log.log(
            V(2),
            "dial to %s forwarded to peer %s: %s",
            self.dial.address,
            self.peer_id,
            payload.error or f"connection {payload.connect_id}",
        )
        self.relaying = True
        proxy._apply(effects)

    def _refuse(self, call: GrpcCall, why: str) -> None:
        log.info("peer %s broke the peering protocol (%s); trying the next", self.peer_id, why)
        self._settle(peer_metrics.DIAL_ERROR)
        call.cancel()

    def _relay(self, call: GrpcCall, message: bytes) -> None:
        proxy = self.forwarder.proxy
        backend = self.backend
        try:
            ptype, connect_id = peek_packet(message)
        except CodecError as exc:
            self._fail(call, str(exc))
            return
        proxy.budget.received(call)
        if ptype == _DATA:
            frontend = proxy.router.route_agent_data(backend, connect_id)
            if frontend is not None:
                proxy._to_frontend(frontend, message, _DATA, call)
                return
        try:
            packet = decode_packet(message)
        except CodecError as exc:
            self._fail(call, str(exc))
            return
        proxy._apply(proxy.router.receive_from_agent(backend, packet, proxy.loop.time(), message))

    def _fail(self, call: GrpcCall, why: str) -> None:
        log.info("peer %s sent an undecodable packet (%s): closing its stream", self.peer_id, why)
        call.cancel()
        self.forwarder.proxy._remove_backend(self.backend)

    def on_end(self, call: GrpcCall) -> None:
        pass  # server role only; a peer ends our stream with trailers (on_closed)

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        peer_metrics.stream_closed(peer_metrics.FORWARDING)
        self.forwarder._attempts.pop(self.backend, None)
        if not self.answer.done():
            log.log(V(2), "peer %s: stream ended before answering: %s", self.peer_id, call.message)
            self._settle(peer_metrics.DIAL_ERROR)
        if self.relaying:
            self.forwarder.proxy._remove_backend(self.backend)


class PeerForwarder:
    """Offers the dials no local agent takes to the peer servers (module docstring).

    ``proxy``: this server (its router must be a ``PeeringRouter``). ``server_id``: ours,
    sent as ``kf-forwarded-from`` and left out of the peers. ``peers``: where the peers
    are. ``ssl``: ``peer_client_context``."""

    def __init__(
        self,
        proxy: ProxyServer,
        *,
        server_id: str,
        peers: PeerSource,
        ssl: ssl.SSLContext,
        connect_timeout: float = PEER_CONNECT_TIMEOUT,
        rng: Random | None = None,
    ) -> None:
        self.proxy = proxy
        self.server_id = server_id
        self.peers = peers
        self._ssl = ssl
        self._connect_timeout = connect_timeout
        self._rng = rng or Random()
        self._connections: dict[str, tuple[Address, asyncio.Task[GrpcProtocol]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Unattached peer backends -> the stream their dial is being offered on.
        self._attempts: dict[Backend, GrpcCall] = {}
        # Peers that could not be reached -> when to try them again (PEER_RETRY_AFTER).
        self._down: dict[str, float] = {}
        self._closed = False

    # --- ProxyServer's DialForwarder ---------------------------------------------------

    def forward(self, dial: PendingDial, protocol: str) -> None:
        """Offer ``dial`` to the peers (``ForwardDial``)."""
        task = self.proxy.loop.create_task(self._forward(dial, protocol))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def end(self, backend: Backend) -> None:
        """The router forgot peer ``backend`` (``EndPeer``): end its stream."""
        call: GrpcCall | None = backend.conn
        if call is None:  # still being offered: withdraw the dial from the peer
            call = self._attempts.pop(backend, None)
            if call is None:
                return
            if isinstance(backend, PeerBackend):
                self.send(call, Packet(PacketType.DIAL_CLS, CloseDial(random=backend.sent_random)))
            sink = call.sink
            if isinstance(sink, _PeerStream) and not sink.answer.done():
                sink.answer.set_result("")  # cancelled: neither counted nor retried
        call.done_writing()

    def send(self, call: GrpcCall, packet: Packet) -> None:
        try:
            call.send(encode_packet(packet))
        except GrpcError as exc:  # the stream's end cleans up
            log.log(V(2), "peer stream %d: send dropped: %s", call.stream_id, exc)

    async def close(self) -> None:
        """Stop forwarding: cancel the attempts and close the peer connections."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        connections = [task for _, task in self._connections.values()]
        self._connections.clear()
        for connecting in connections:
            if _usable(connecting):
                connecting.result().close()
            else:
                connecting.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- one forwarded dial ------------------------------------------------------------

    def _candidates(self) -> list[tuple[str, Address]]:
        """The peers to ask, in random order: all but us and those recently unreachable."""
        now = self.proxy.loop.time()
        for peer_id, until in list(self._down.items()):
            if until <= now:
                del self._down[peer_id]
        try:
            peers = [
                (pid, addr)
                for pid, addr in self.peers().items()
                if pid != self.server_id and pid not in self._down
            ]
        except Exception:  # a broken source must not break dialling
            log.exception("reading the peer list failed")
            peers = []
        self._rng.shuffle(peers)
        return peers

    async def _forward(self, dial: PendingDial, protocol: str) -> None:
        router: PeeringRouter = self.proxy.router  # type: ignore[assignment]
        backend = dial.backend
        assert isinstance(backend, PeerBackend)
        for peer_id, address in self._candidates():
            if router.pending_dial(dial.random) is not dial or self._closed:
                return
            try:
                result = await self._attempt(dial, backend, protocol, peer_id, address)
            except Exception:  # a bug here must cost this peer, not leave the dial hanging
                log.exception("forwarding a dial to peer %s failed", peer_id)
                result = peer_metrics.DIAL_ERROR
            if result not in (peer_metrics.DIAL_NO_AGENT, peer_metrics.DIAL_ERROR):
                return  # answered, or cancelled
        log.log(V(2), "no peer has an agent for %s", dial.address)
        self.proxy._apply(router.peer_unavailable(dial))

    async def _attempt(
        self, dial: PendingDial, backend: PeerBackend, protocol: str, peer_id: str, address: Address
    ) -> str:
        try:
            proto = await self._connection(peer_id, address)
            if not _alive(proto):  # lost since (a peer refusing our certificate under
                raise ConnectionError("connection lost")  # TLS 1.3 closes it just after)
            call = proto.start_call(
                PROXY_PATH,
                [(MD_FORWARDED_FROM, self.server_id)],
                authority=str(address),
                scheme="https",
            )
        except (OSError, TimeoutError, GrpcError, ssl.SSLError) as exc:
            log.log(V(1), "peer %s at %s unreachable: %s", peer_id, address, exc or type(exc))
            peer_metrics.dialled(peer_metrics.DIAL_ERROR)
            self._down[peer_id] = self.proxy.loop.time() + PEER_RETRY_AFTER
            return peer_metrics.DIAL_ERROR
        if self.proxy.router.pending_dial(dial.random) is not dial:
            call.cancel()
            return ""
        stream = _PeerStream(self, dial, backend, peer_id)
        call.set_sink(stream)
        peer_metrics.stream_opened(peer_metrics.FORWARDING)
        self._attempts[backend] = call
        request = DialRequest(protocol=protocol, address=dial.address, random=backend.sent_random)
        self.send(call, Packet(PacketType.DIAL_REQ, request))
        try:
            return await stream.answer
        finally:
            if self._attempts.get(backend) is call:
                del self._attempts[backend]

    async def _connection(self, peer_id: str, address: Address) -> GrpcProtocol:
        """The shared connection to ``peer_id``, made (once for every waiting dial) if it
        has none or lost it."""
        entry = self._connections.get(peer_id)
        if entry is not None:
            known, task = entry
            if known == address and not (task.done() and not _usable(task)):
                return await asyncio.shield(task)
            if known != address and task.done() and _usable(task):
                task.result().close_when_idle()  # the peer moved: the old one may go
        task = self.proxy.loop.create_task(self._connect(address))
        task.add_done_callback(_retrieve)
        self._connections[peer_id] = (address, task)
        return await asyncio.shield(task)

    async def _connect(self, address: Address) -> GrpcProtocol:
        """Connect within ``connect_timeout``. Not ``asyncio.wait_for``, which waits for
        the cancelled attempt to wind down: the dial must not depend on how long a
        half-made TLS connection takes to close. A late success is closed."""
        log.log(V(2), "connecting to peer at %s", address)
        attempt = self.proxy.loop.create_task(
            connect(host=address.host, port=address.port, ssl=self._ssl, server_hostname=None)
        )
        done, _ = await asyncio.wait({attempt}, timeout=self._connect_timeout)
        if not done:
            attempt.cancel()
            attempt.add_done_callback(_close_late)
            raise TimeoutError(f"no connection within {self._connect_timeout}s")
        proto = attempt.result()
        log.log(V(3), "connected to peer at %s", address)
        return proto


def _usable(task: asyncio.Task[GrpcProtocol]) -> bool:
    """A finished connect task whose connection can take a new stream."""
    if task.cancelled() or task.exception() is not None:
        return False
    return _alive(task.result())


def _alive(proto: GrpcProtocol) -> bool:
    """A connection that can take a new stream: a stream started on a lost one would never
    end (nothing reports its loss twice)."""
    transport = proto.transport
    return (
        transport is not None
        and not transport.is_closing()
        and proto.goaway is None
        and not proto.lost.done()
    )


def _close_late(task: asyncio.Task[GrpcProtocol]) -> None:
    """A connect attempt that finished after it was given up on: close what it made."""
    if task.cancelled() or task.exception() is not None:
        return
    task.result().close()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a connect task's failure as seen (its waiters may all have gone)."""
    if not task.cancelled():
        task.exception()


# --- start-up -----------------------------------------------------------------------------


class PeeringRunOptions(Protocol):
    """The peering flags (``cli.extensions.PEER_EXTENSION_FLAGS``), checked and with the
    TLS files resolved (``cli.peering.check_peering``)."""

    server_id: str
    enable_peer_forwarding: bool
    peer_port: int
    peer_bind_address: str
    peer_endpoints: str
    peer_cert: str
    peer_key: str
    peer_ca_cert: str


# Bind addresses that name no one address: a peer could not dial them.
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def peer_advertised(options: PeeringRunOptions) -> Address | None:
    """The peer endpoint this server publishes on its Lease (the
    ``konnectivity-fast.io/peer-endpoint`` annotation, ``server.directory``): its peer
    listener at ``--peer-bind-address`` when that names one address (a pod IP, say);
    None without peering, without a listener, or bound to every address."""
    if not options.enable_peer_forwarding or not options.peer_port:
        return None
    if options.peer_bind_address in _WILDCARDS:
        return None
    return Address(options.peer_bind_address, options.peer_port)


async def start_peering(
    proxy: ProxyServer,
    options: PeeringRunOptions,
    tls_settings: TlsSettings,
    extra_peers: PeerSource | None = None,
) -> tuple[PeerForwarder, GrpcServer | None]:
    """Install a ``PeerForwarder`` on ``proxy`` (peers: ``--peer-endpoints``, then
    ``extra_peers``) and start the peer listener if ``--peer-port`` is set. Raises
    ``ValueError`` with a start-up message (bad TLS files, port in use)."""
    check_tls_files(options.peer_cert, options.peer_key, options.peer_ca_cert)
    sources = [static_peers(parse_peer_endpoints(options.peer_endpoints))]
    if extra_peers is not None:
        sources.append(extra_peers)
    forwarder = PeerForwarder(
        proxy,
        server_id=proxy.server_id,
        peers=union_peers(*sources),
        ssl=peer_client_context(
            options.peer_ca_cert, options.peer_cert, options.peer_key, tls_settings
        ),
    )
    proxy.forwarder = forwarder
    if not options.peer_port:
        return forwarder, None
    try:
        listener = await start_peer_listener(
            proxy,
            host=options.peer_bind_address or None,
            port=options.peer_port,
            cert_file=options.peer_cert,
            key_file=options.peer_key,
            ca_file=options.peer_ca_cert,
            tls_settings=tls_settings,
        )
    except OSError as exc:
        addr = host_port(options.peer_bind_address, options.peer_port)
        raise ValueError(f"failed to listen on {addr}: {listen_error('tcp', addr, exc)}") from None
    log.info("Peer listener on port %d; forwarding dials no agent here takes", options.peer_port)
    return forwarder, listener
