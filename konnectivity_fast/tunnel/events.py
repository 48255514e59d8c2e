"""The effects the router asks its adapter to carry out, and the metric events it reports.

The router (``tunnel.router``) never touches a socket: each call returns a list of these
values, in the order they must happen. The adapter performs them in that order:

- ``SendToAgent`` / ``SendToFrontend``: write ``message`` on the stream. ``bytes`` (or a
  buffer) is a received message forwarded unchanged, framed as it came; a ``Packet`` is
  one the router made (or one it had to normalise), to encode with the wire codec. For an
  HTTP-CONNECT frontend, ``SendToFrontend`` only ever carries DATA: write its payload.
- ``TunnelEstablished``: HTTP-CONNECT only: write the 200 line, then relay.
- ``CloseFrontend``: HTTP-CONNECT only: answer per ``reason`` and close the socket. The
  router has already forgotten the frontend. (The router never ends a gRPC ``Proxy``
  stream: upstream keeps reading until the client closes it.)
- ``RetireBackend``: end the agent's ``Connect`` call with status OK (it will reconnect),
  then report the stream gone with ``Router.remove_backend`` as for any stream end.
- ``ForwardDial`` (server peering, ``tunnel.peering``): no agent here takes the dial; ask
  the peer servers, then report the outcome (``PeeringRouter.peer_answered`` or
  ``peer_unavailable``).
- ``EndPeer``: a peer stream carries nothing any more: send its ``final`` messages, then
  half-close it (if it was opened).
- ``DialFailure``, ``DialDuration``, ``ConnectionDuration``: metric observations, named
  after upstream's ``dial_failure_count{reason}`` and ``dial_duration_seconds``
  (pkg/server/metrics/metrics.go) and the ``connection_duration_seconds`` of its later
  main branch (v0.36.0 registers none, so the adapter drops that one).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, TypeAlias

from konnectivity_fast.wire.packets import Packet

if TYPE_CHECKING:
    from konnectivity_fast.tunnel.records import Backend, Frontend, PendingDial

__all__ = [
    "CloseFrontend",
    "CloseReason",
    "ConnectionDuration",
    "DialDuration",
    "DialFailure",
    "DialFailureReason",
    "Effect",
    "EndPeer",
    "ForwardDial",
    "Message",
    "RawMessage",
    "RetireBackend",
    "SendToAgent",
    "SendToFrontend",
    "TunnelEstablished",
]

#: A received Packet message as it came off the wire (without the gRPC prefix).
RawMessage: TypeAlias = bytes | bytearray | memoryview
#: What a send effect carries: raw bytes to forward, or a Packet to encode.
Message: TypeAlias = Packet | RawMessage


class DialFailureReason(StrEnum):
    """The ``reason`` label values of ``dial_failure_count``."""

    NO_AGENT = "no_agent"
    ERROR_RESPONSE = "error_response"
    UNRECOGNIZED_RESPONSE = "unrecognized_response"
    SEND_RSP = "send_rsp"  # for adapters: the router cannot see a failed frontend write
    BACKEND_CLOSE = "backend_close"
    BACKEND_DIAL_TIMEOUT = "backend_dial_timeout"
    FRONTEND_CLOSE = "frontend_close"


class CloseReason(Enum):
    """Why an HTTP-CONNECT tunnel is closed, and what upstream writes first (pkg/server/
    tunnel.go ``Tunnel.ServeHTTP``, pkg/server/server.go ``ProxyClientConnection.send``).
    ``CloseFrontend.error`` holds the text named here."""

    #: ``500 Internal Server Error``, body ``currently no tunnels available: <error>``, no
    #: trailing newline. ``error`` is ``No agent available``.
    NO_AGENT = "no_agent"
    #: The agent's DIAL_RSP error: status by substring of ``error`` (504 for ``i/o timeout``,
    #: ``deadline exceeded`` or ``timeout``; 503 for ``too many open files``; else 502),
    #: ``Connection: close``, body ``<error>``.
    DIAL_ERROR = "dial_error"
    #: The agent sent DIAL_CLS: close with no response at all.
    DIAL_CLOSED = "dial_closed"
    #: ``504 Gateway Timeout``, body ``Backend dial timeout: <error>\r\n``; ``error`` is
    #: ``timed out waiting for backend dial``.
    DIAL_TIMEOUT = "dial_timeout"
    #: The chosen agent stream ended before answering: ``502 Bad Gateway``, body
    #: ``Backend context error: <error>\r\n``; ``error`` is ``context canceled``.
    DIAL_BACKEND_GONE = "dial_backend_gone"
    #: An established tunnel: the agent sent CLOSE_RSP. Close the socket.
    CLOSE_RSP = "close_rsp"
    #: An established tunnel: its agent stream ended. Close the socket.
    BACKEND_GONE = "backend_gone"


@dataclass(frozen=True, slots=True)
class SendToAgent:
    backend: Backend
    message: Message


@dataclass(frozen=True, slots=True)
class SendToFrontend:
    """``via_connection``: what an agent sent, forwarded, or the CLOSE_RSP telling of its
    loss (upstream writes these through the connection record and times them in
    ``frontend_write_duration_seconds``: pkg/server/server.go
    ``ProxyClientConnection.send``); False for the server's own answers (no agent,
    uninitialized backend, mismatched IDs, dial timeout, ...), which upstream writes to the
    stream directly."""

    frontend: Frontend
    message: Message
    via_connection: bool = True


@dataclass(frozen=True, slots=True)
class TunnelEstablished:
    frontend: Frontend
    connect_id: int


@dataclass(frozen=True, slots=True)
class CloseFrontend:
    frontend: Frontend
    reason: CloseReason
    error: str = ""


@dataclass(frozen=True, slots=True)
class RetireBackend:
    backend: Backend


@dataclass(frozen=True, slots=True)
class ForwardDial:
    """``dial`` (pending on a ``PeerBackend`` not yet attached) must be offered to the peer
    servers with ``protocol`` and ``dial.address``."""

    dial: PendingDial
    protocol: str


@dataclass(frozen=True, slots=True)
class EndPeer:
    """The router forgot ``backend``, a peer stream: send it ``final`` (in order), then end
    it (``conn`` None: never opened; ``final`` is then empty)."""

    backend: Backend
    final: tuple[Message, ...] = ()


@dataclass(frozen=True, slots=True)
class DialFailure:
    reason: DialFailureReason


@dataclass(frozen=True, slots=True)
class DialDuration:
    """From the DIAL_REQ to its successful DIAL_RSP."""

    seconds: float


@dataclass(frozen=True, slots=True)
class ConnectionDuration:
    """From the DIAL_REQ to the connection's removal by a CLOSE_RSP or an agent loss."""

    seconds: float


Effect: TypeAlias = (
    SendToAgent
    | SendToFrontend
    | TunnelEstablished
    | CloseFrontend
    | RetireBackend
    | ForwardDial
    | EndPeer
    | DialFailure
    | DialDuration
    | ConnectionDuration
)
