"""``AgentClient``: one connection and one ``/AgentService/Connect`` stream to one
proxy-server replica (upstream's pkg/agent/client.go ``Client``: ``Connect`` and ``Serve``).

``connect()`` opens a fresh TCP+TLS connection (so a load balancer may pick another
replica each time), offers ALPN ``--alpn-proto`` values then ``h2`` and requires that one
was picked, as grpc-go does, sends ``agentid``, ``agentidentifiers`` and (with a token path)
``authorization: Bearer <token read now>``, and ``kf-capabilities`` when it offers
extensions (``ClientConfig.extensions``), then waits for the server's response headers
and reads ``serverid`` and ``servercount`` from them, with upstream's error texts. The
extensions the server echoed back that we offered are this stream's
(``AgentClient.extensions``, ``wire.contract``); an upstream server echoes none.

After that the client is a ``CallSink``: packets are handled as they arrive, with no task
per stream or per tunnel (the packet rules of upstream's ``Client.Serve``):

- DIAL_REQ: a new connectID (1, 2, ... per stream, a failed dial uses one up; 2, 4, ...
  when ``node-to-cp.v1`` was negotiated, so the server's odd reverse IDs never collide),
  a dial task,
  then DIAL_RSP; the endpoint is registered before the DIAL_RSP is sent and read only
  after it.
- DATA: written to the endpoint (docs/data-path.md explains the buffering), or
  ``CLOSE_RSP{"unrecognized connectID"}`` when there is none; connectID 0 is ignored.
- CLOSE_REQ: ``CLOSE_RSP{""}`` and the endpoint closes, or ``CLOSE_RSP{"Unknown
  connectID"}``.
- DIAL_CLS, DRAIN, CLOSE_RSP, DIAL_RSP and unknown types: ignored, as upstream (a DRAIN
  is remembered: ``server_draining``).
- With ``node-to-cp.v1`` negotiated, the stream also carries node-to-control-plane
  connections (``reverse.ReverseStream``, ``self.reverse``): DIAL_RSP, and DATA, CLOSE_RSP
  and CLOSE_REQ for the server's (odd) connectIDs go there.

A backend that closes gets an unsolicited ``CLOSE_RSP{""}`` after all its DATA (both go
through the same ordered stream queue). When the stream or connection ends, exactly this
stream's endpoints are aborted and its pending dials cancelled; the owner hears of it once
through ``on_removed``. A probe every ``--probe-interval`` drops a connection that is no
longer usable (GOAWAY received, transport closing), as upstream's READY check does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable

from konnectivity_fast.agent.connect import (
    CONNECT_TIMEOUT,
    HEADERS_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    MIN_KEEPALIVE_TIME,
    ClientConfig,
    ConnectError,
    check_alpn,
    parse_server_headers,
    status_text,
)
from konnectivity_fast.agent.endpoint import Endpoint, EndpointPool, dial
from konnectivity_fast.agent.reverse import ReverseStream
from konnectivity_fast.agent.sender import FairSender
from konnectivity_fast.metrics import agent as metrics
from konnectivity_fast.transport.call import GrpcCall, GrpcError
from konnectivity_fast.transport.dialerr import DialError
from konnectivity_fast.transport.grpc import CLOSE_TIMEOUT, SSL_SHUTDOWN_TIMEOUT, GrpcProtocol
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.codec import decode_packet, encode_packet, peek_data, peek_packet
from konnectivity_fast.wire.contract import (
    CONNECT_PATH,
    ERR_UNRECOGNIZED_CONNECT_ID,
    NO_EXTENSIONS,
    Extension,
    ExtensionSet,
    negotiate_extensions,
    unmarshal_error,
)
from konnectivity_fast.wire.errors import CodecError, StatusCode
from konnectivity_fast.wire.packets import (
    CloseRequest,
    CloseResponse,
    DialRequest,
    DialResponse,
    Drain,
    FlowCredit,
    Packet,
    PacketType,
)

__all__ = ["AgentClient"]

log = logging.getLogger(__name__)

# Upstream's agent's CLOSE_RSP error for a CLOSE_REQ of a connectID it does not know.
ERR_UNKNOWN_CONNECT_ID = "Unknown connectID"

_DATA = int(PacketType.DATA)
_DIAL_REQ = int(PacketType.DIAL_REQ)
_CLOSE_REQ = int(PacketType.CLOSE_REQ)
_FLOW_CREDIT = int(PacketType.FLOW_CREDIT)
_DIAL_RSP = int(PacketType.DIAL_RSP)
_CLOSE_RSP = int(PacketType.CLOSE_RSP)
_DRAIN = int(PacketType.DRAIN)


class AgentClient:
    """One proxy-server connection of this agent. Not reusable: one ``connect()``."""

    def __init__(
        self,
        config: ClientConfig,
        pool: EndpointPool,
        on_removed: Callable[[AgentClient], None] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self._on_removed = on_removed
        self.loop = asyncio.get_running_loop()
        self.proto: GrpcProtocol | None = None
        self.call: GrpcCall | None = None
        self.sender: FairSender | None = None
        self.server_id = ""
        self.server_count = 0
        # The Connect response headers (the agent's discovery reads ours beyond upstream's).
        self.response_headers: list[tuple[str, str]] = []
        # Negotiated on this stream once connected: an extension is used only if in here.
        self.extensions: ExtensionSet = NO_EXTENSIONS
        #: flow.v1 was negotiated: per-tunnel credit (tunnel/flow.py) on this stream.
        self.flow = False
        self.endpoints: dict[int, Endpoint] = {}
        self._dials: set[asyncio.Task[None]] = set()
        self._next_id = 0
        self._id_step = 1  # 2 with node-to-cp.v1: even forward IDs
        #: node-to-cp.v1 was negotiated: this stream's node-to-control-plane connections.
        self.reverse: ReverseStream | None = None
        #: The server sent DRAIN: no new node-to-control-plane connection through it.
        self.server_draining = False
        self._probe: asyncio.TimerHandle | None = None
        self._inbound_paused = False
        self.drain_sent = False
        self.closed = False
        self.done: asyncio.Future[None] = self.loop.create_future()

    # -- connecting ------------------------------------------------------------------------

    async def connect(self) -> int:
        """Open the connection and the stream; the server's count. Raises
        ``ConnectError``; the client is closed then."""
        try:
            return await self._connect()
        except ConnectError:
            self.close("connect failed")
            raise
        except BaseException:
            self.close("connect interrupted")
            raise

    async def _connect(self) -> int:
        cfg = self.config
        metadata = cfg.metadata()
        keepalive = max(cfg.keepalive_time, MIN_KEEPALIVE_TIME) if cfg.keepalive_time > 0 else 0.0
        loop = self.loop

        def factory() -> GrpcProtocol:
            # ALPN is checked below: grpc-go accepts any protocol the server picked.
            return GrpcProtocol(
                False,
                None,
                loop=loop,
                require_alpn_h2=False,
                keepalive_time=keepalive,
                keepalive_timeout=KEEPALIVE_TIMEOUT,
                keepalive_without_streams=True,
            )

        target = f"{cfg.host}:{cfg.port}"
        try:
            _, proto = await asyncio.wait_for(
                loop.create_connection(
                    factory,
                    cfg.host,
                    cfg.port,
                    ssl=cfg.ssl_context,
                    server_hostname=cfg.server_name or cfg.host,
                    ssl_shutdown_timeout=SSL_SHUTDOWN_TIMEOUT,
                ),
                CONNECT_TIMEOUT,
            )
        except TimeoutError:
            raise ConnectError(f"connecting to {target}: timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"connecting to {target}: {exc}") from None
        self.proto = proto
        proto.lost.add_done_callback(lambda _: self.close("connection lost"))
        try:
            await proto.connected
        except ConnectionError as exc:
            raise ConnectError(f"connecting to {target}: {exc}") from None
        check_alpn(proto, target)
        try:
            call = proto.start_call(
                CONNECT_PATH, metadata, authority=cfg.server_name or cfg.host, scheme="https"
            )
        except GrpcError as exc:
            raise ConnectError(f"opening the Connect stream: {exc.message}") from None
        self.call = call
        self.sender = FairSender(call, self._send_data)
        call.set_sink(self)
        try:
            headers = await asyncio.wait_for(asyncio.shield(call.headers_received), HEADERS_TIMEOUT)
        except TimeoutError:
            raise ConnectError(
                f"no response headers from {target} within {HEADERS_TIMEOUT:g}s"
            ) from None
        except GrpcError as exc:
            raise ConnectError(status_text(exc.status, exc.message)) from None
        if not headers and call.status is not None:
            raise ConnectError(status_text(call.status, call.message))
        self.server_id, self.server_count = parse_server_headers(headers)
        self.response_headers = headers
        self.extensions = negotiate_extensions(headers, cfg.extensions)
        self.flow = Extension.FLOW in self.extensions
        if Extension.NODE_TO_CP in self.extensions:
            self._id_step = 2
            self.reverse = ReverseStream(self)
        if self.extensions:
            log.log(
                V(2),
                "server %s: extensions %s",
                self.server_id,
                ",".join(sorted(self.extensions)),
            )
        if self.closed:
            raise ConnectError(f"the connection to {target} ended")
        return self.server_count

    def start(self) -> None:
        """Accepted into the client set: serve, probe, join the endpoint budget."""
        self.pool.owners.add(self)
        self._arm_probe()

    # -- state -----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """grpc-go's READY: connected, no GOAWAY, the stream open."""
        proto = self.proto
        return (
            not self.closed
            and proto is not None
            and proto.transport is not None
            and not proto.transport.is_closing()
            and proto.goaway is None
            and not proto.lost.done()
        )

    def _arm_probe(self) -> None:
        if not self.closed and self.config.probe_interval > 0:
            self._probe = self.loop.call_later(self.config.probe_interval, self._on_probe)

    def _on_probe(self) -> None:
        self._probe = None
        if not self.ready:
            log.info("connection to server %s is not ready any more: closing it", self.server_id)
            self.close("not ready")
            return
        self._arm_probe()

    # -- sending ---------------------------------------------------------------------------

    def _send(self, packet: Packet) -> bool:
        call = self.call
        if call is None or self.closed:
            return False
        metrics.observe_packet(metrics.SEGMENT_FROM_AGENT, int(packet.type))
        try:
            call.send(encode_packet(packet))
        except GrpcError as exc:
            # The stream is gone (grpc-go's io.EOF from Send): its end cleans up.
            log.log(V(5), "send to server %s dropped: %s", self.server_id, exc)
            return False
        return True

    def send_packet(self, packet: Packet) -> bool:
        """Queue ``packet`` on the stream; False when the stream is gone."""
        return self._send(packet)

    def send_drain(self) -> None:
        """Tell the server this agent is going away (once per stream)."""
        if not self.drain_sent and not self.closed:
            self.drain_sent = True
            log.info("sending DRAIN to server %s", self.server_id)
            self._send(Packet(PacketType.DRAIN, Drain()))

    # -- EndpointOwner ---------------------------------------------------------------------

    @property
    def congested(self) -> bool:
        sender = self.sender
        return sender is not None and sender.congested

    def endpoint_data(self, endpoint: Endpoint, data: bytes) -> bool:
        sender = self.sender
        if sender is None or self.closed:
            return True
        return sender.offer(endpoint, data)

    def _send_data(self, connect_id: int, data: bytes) -> None:
        call = self.call
        if call is None or self.closed:
            return
        metrics.observe_packet(metrics.SEGMENT_FROM_AGENT, _DATA)
        with contextlib.suppress(GrpcError):  # the stream's end aborts the endpoint
            call.send_data_packet(connect_id, data)

    def endpoint_lost(self, endpoint: Endpoint, exc: Exception | None) -> None:
        cid = endpoint.connect_id
        if self.endpoints.get(cid) is not endpoint:
            return  # closed by CLOSE_REQ or with the stream: already answered
        del self.endpoints[cid]
        if self.sender is not None:
            self.sender.flush(endpoint)  # its last read goes out before its CLOSE_RSP
        metrics.endpoint_connection_closed()
        log.log(
            V(3) if exc is None else V(2),
            "connection %d to the backend closed (%s)",
            cid,
            exc or "EOF",
        )
        self._send(Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=cid)))
        if endpoint.over_budget:
            self.update_inbound()

    @property
    def pending_dials(self) -> int:
        """Dials in progress (the admin listing)."""
        return len(self._dials)

    @property
    def inbound_paused(self) -> bool:
        """The server stream is not read: a backend is over its budget, or the process's
        (the admin listing)."""
        return self._inbound_paused

    def update_inbound(self) -> None:
        call = self.call
        if call is None:
            return
        pause = (
            self.pool.exhausted
            or any(ep.over_budget for ep in self.endpoints.values())
            or (self.reverse is not None and self.reverse.over_budget)
        )
        if pause == self._inbound_paused:
            return
        self._inbound_paused = pause
        if pause:
            # Upstream's words for its full per-connection queue, under the same flag.
            level = logging.WARNING if self.config.warn_on_channel_limit else V(2)
            log.log(
                level,
                "Data channel on agent is full: pausing the stream from server %s",
                self.server_id,
            )
            call.pause_reading()
        else:
            call.resume_reading()

    # -- CallSink --------------------------------------------------------------------------

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        if self.closed:
            return
        try:
            ptype, connect_id = peek_packet(message)
        except CodecError as exc:
            self._recv_failed(StatusCode.INTERNAL, unmarshal_error(exc))
            return
        if ptype == _FLOW_CREDIT and (self.flow or self.reverse is not None):
            self._on_flow_credit(message, connect_id)
            return
        metrics.observe_packet(metrics.SEGMENT_TO_AGENT, ptype)
        if ptype == _DATA:
            self._on_data(message, connect_id)
        elif ptype == _DIAL_REQ:
            self._on_dial_request(message)
        elif ptype == _CLOSE_REQ:
            self._on_close_request(message)
        elif ptype == _DRAIN:
            self.server_draining = True
            log.log(V(2), "server %s is draining", self.server_id)
        elif self.reverse is not None and ptype in (_DIAL_RSP, _CLOSE_RSP):
            self._on_reverse(message, ptype)
        else:
            log.log(V(5), "ignoring packet of type %d from server %s", ptype, self.server_id)

    def on_end(self, call: GrpcCall) -> None:
        pass  # the outcome (trailers) follows; on_closed ends the client

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        status = call.status
        if (
            status is not None
            and status != StatusCode.OK
            and not self.closed
            and status != StatusCode.CANCELLED
        ):
            metrics.observe_stream_error_no_packet(metrics.SEGMENT_TO_AGENT, status)
            metrics.observe_server_failure_deprecated(metrics.DIRECTION_FROM_SERVER)
            log.error(
                "stream to server %s ended: %s", self.server_id, status_text(status, call.message)
            )
        self.close("stream ended")

    def _recv_failed(self, status: int, message: str) -> None:
        metrics.observe_stream_error_no_packet(metrics.SEGMENT_TO_AGENT, status)
        metrics.observe_server_failure_deprecated(metrics.DIRECTION_FROM_SERVER)
        log.error("receiving from server %s failed: %s", self.server_id, message)
        self.close("bad input")

    # -- packets ---------------------------------------------------------------------------

    def _on_data(self, message: bytes, connect_id: int) -> None:
        data = peek_data(message)
        if data is None:
            log.log(V(2), "DATA packet without payload from server %s", self.server_id)
            return
        if connect_id == 0:
            log.error("Received packet missing ConnectID from frontend")
            return
        endpoint = self.endpoints.get(connect_id)
        if endpoint is None:
            if self.reverse is not None and self.reverse.on_data(connect_id, data[1]):
                return
            self._send(
                Packet(
                    PacketType.CLOSE_RSP,
                    CloseResponse(error=ERR_UNRECOGNIZED_CONNECT_ID, connect_id=connect_id),
                )
            )
            return
        endpoint.write(data[1])

    def _decode(self, message: bytes, expected: type) -> object | None:
        try:
            payload = decode_packet(message).payload
        except CodecError as exc:
            self._recv_failed(StatusCode.INTERNAL, unmarshal_error(exc))
            return None
        if not isinstance(payload, expected):
            # Upstream's Go agent crashes here; one bad packet is dropped instead.
            log.error(
                "packet from server %s has no %s payload: ignored",
                self.server_id,
                expected.__name__,
            )
            return None
        return payload

    def _on_reverse(self, message: bytes, ptype: int) -> None:
        reverse = self.reverse
        assert reverse is not None
        if ptype == _DIAL_RSP:
            rsp = self._decode(message, DialResponse)
            if isinstance(rsp, DialResponse):
                reverse.on_dial_response(rsp)
            return
        close = self._decode(message, CloseResponse)
        if isinstance(close, CloseResponse):
            reverse.on_close(close.connect_id, request=False)

    def _on_flow_credit(self, message: bytes, connect_id: int) -> None:
        credit = self._decode(message, FlowCredit)
        if not isinstance(credit, FlowCredit):
            return
        if self.reverse is not None and connect_id & 1:
            # Reverse connections always have credit; forward ones with flow.v1 only.
            self.reverse.on_credit(connect_id, credit.bytes)
            return
        endpoint = self.endpoints.get(connect_id)
        if endpoint is not None:  # else: closed meanwhile, the credit is moot
            endpoint.add_credit(credit.bytes)

    def endpoint_credit(self, endpoint: Endpoint, nbytes: int) -> None:
        call = self.call
        if call is None or self.closed:
            return
        packet = Packet(PacketType.FLOW_CREDIT, FlowCredit(endpoint.connect_id, nbytes))
        with contextlib.suppress(GrpcError):  # the stream's end aborts the endpoint
            call.send(encode_packet(packet))

    def _on_dial_request(self, message: bytes) -> None:
        req = self._decode(message, DialRequest)
        if not isinstance(req, DialRequest):
            return
        self._next_id += self._id_step
        task = self.loop.create_task(self._dial(req, self._next_id))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, req: DialRequest, connect_id: int) -> None:
        log.log(
            V(3),
            "dialing %s %s for server %s (connectID %d)",
            req.protocol,
            req.address,
            self.server_id,
            connect_id,
        )
        start = self.loop.time()
        try:
            endpoint = await dial(
                req.protocol,
                req.address,
                lambda: Endpoint(self.pool, self, connect_id, req.address, start),
            )
        except DialError as exc:
            metrics.observe_dial_failure(
                metrics.DIAL_FAILURE_TIMEOUT if exc.timeout else metrics.DIAL_FAILURE_UNKNOWN
            )
            log.log(V(2), "dial %s failed: %s", req.address, exc.text)
            self._send(Packet(PacketType.DIAL_RSP, DialResponse(error=exc.text, random=req.random)))
            return
        if self.closed:
            endpoint.abort()
            return
        metrics.observe_dial_latency(self.loop.time() - start)
        if self.flow:
            endpoint.enable_flow()
        self.endpoints[connect_id] = endpoint
        metrics.endpoint_connection_opened()
        if not self._send(
            Packet(PacketType.DIAL_RSP, DialResponse(connect_id=connect_id, random=req.random))
        ):
            self.endpoints.pop(connect_id, None)
            metrics.endpoint_connection_closed()
            endpoint.abort()
            return
        endpoint.start_reading()

    def _on_close_request(self, message: bytes) -> None:
        req = self._decode(message, CloseRequest)
        if not isinstance(req, CloseRequest):
            return
        cid = req.connect_id
        endpoint = self.endpoints.pop(cid, None)
        log.log(V(3), "CLOSE_REQ for connection %d from server %s", cid, self.server_id)
        if endpoint is None and self.reverse is not None and self.reverse.on_close(cid, True):
            return
        if endpoint is None:
            self._send(
                Packet(
                    PacketType.CLOSE_RSP,
                    CloseResponse(error=ERR_UNKNOWN_CONNECT_ID, connect_id=cid),
                )
            )
            return
        metrics.endpoint_connection_closed()
        if self.sender is not None:
            self.sender.drop(endpoint)
        self._send(Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=cid)))
        endpoint.close()
        if endpoint.over_budget:
            self.update_inbound()

    # -- closing ---------------------------------------------------------------------------

    def close(self, reason: str = "closed") -> None:
        """End the stream and the connection; abort this stream's endpoints and dials."""
        if self.closed:
            return
        self.closed = True
        log.log(V(2), "closing connection to server %s: %s", self.server_id or "?", reason)
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None
        self.pool.owners.discard(self)
        endpoints = list(self.endpoints.values())
        self.endpoints.clear()
        if self.sender is not None:
            self.sender.clear()
        for endpoint in endpoints:
            metrics.endpoint_connection_closed()
            endpoint.abort()
        for task in list(self._dials):
            task.cancel()
        if self.reverse is not None:
            self.reverse.lost()
        if self.call is not None:
            with contextlib.suppress(KeyError, RuntimeError, GrpcError):
                self.call.cancel()
        if self.proto is not None:
            self.proto.close()
            if self.proto.transport is not None:
                # A graceful close waits for the peer; bound it as aclose() does.
                self.loop.call_later(CLOSE_TIMEOUT, self.proto.transport.abort)
        if not self.done.done():
            self.done.set_result(None)
        if self._on_removed is not None:
            self._on_removed(self)
