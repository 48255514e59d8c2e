"""What the router sends that it makes itself: upstream's error strings (those of
pkg/server/server.go ``serveRecvFrontend``, ``sendDialRequestToBackend`` and
``startPendingDialTimeout``, and ours where upstream checks nothing), the packets carrying
them, and how a received packet is passed on unchanged.

A missing or mismatched payload reads as the zero value of the expected one
(``payload_of``), never as an error: upstream would crash on it (it reads payloads without
checking they are there, e.g. in ``serveRecvFrontend``)."""

from __future__ import annotations

from typing import TypeVar

from konnectivity_fast.tunnel.events import Message, RawMessage, SendToFrontend
from konnectivity_fast.tunnel.records import Frontend
from konnectivity_fast.wire.contract import ERR_UNRECOGNIZED_CONNECT_ID
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    DialResponse,
    Packet,
    PacketType,
    Payload,
)

__all__ = [
    "ERR_BACKEND_GONE",
    "ERR_BACKEND_NOT_INITIALIZED",
    "ERR_BACKEND_UNINITIALIZED",
    "ERR_CLOSE_REQ_FAILED",
    "ERR_DIAL_TIMEOUT",
    "ERR_DUPLICATE_DIAL",
    "ERR_FOREIGN_CONNECT_ID",
    "ERR_MISMATCHED_IDS",
    "ERR_NO_AGENT",
    "ERR_TOO_MANY_DIALS",
    "close_req",
    "close_rsp",
    "dial_cls",
    "dial_rsp",
    "forward",
    "payload_of",
    "reply",
]

# Upstream's error strings (pkg/server/server.go).
ERR_NO_AGENT = "No agent available"
ERR_DIAL_TIMEOUT = "timed out waiting for backend dial"
# What upstream answers when the chosen agent stream ends during a dial (the DIAL_REQ send
# under a timeout, or the HTTP-CONNECT wait); we use it for every dial lost with its agent.
ERR_BACKEND_GONE = "context canceled"
ERR_BACKEND_NOT_INITIALIZED = "backend not initialized"
ERR_BACKEND_UNINITIALIZED = "backend uninitialized"
ERR_MISMATCHED_IDS = "mismatched connection IDs"
ERR_CLOSE_REQ_FAILED = "CLOSE_REQ to backend failed"
# Ours, for conditions upstream does not check (see the module docstring).
ERR_DUPLICATE_DIAL = "dial ID already in use"
ERR_TOO_MANY_DIALS = "too many dials on one stream"
# A frontend's DATA or CLOSE_REQ for a connectID that is not one of its own connections.
# Upstream forwards it, so one stream could write into (or close) another stream's tunnel
# on the same agent; a konnectivity-client only ever uses the connectID of its DIAL_RSP.
# The text is the one upstream's agent answers DATA for an unknown connectID with.
ERR_FOREIGN_CONNECT_ID = ERR_UNRECOGNIZED_CONNECT_ID


P = TypeVar("P", bound=Payload)


def payload_of(packet: Packet, cls: type[P]) -> P:
    """The payload a packet of this type carries; a missing or mismatched payload reads as
    the zero value (upstream would crash: a nil payload dereferenced)."""
    payload = packet.payload
    return payload if isinstance(payload, cls) else cls()


def forward(packet: Packet, payload: Payload, raw: RawMessage | None) -> Message:
    """A received packet to pass on unchanged: its raw bytes when given and the payload was
    as expected, else a normalised Packet."""
    if packet.payload is not payload:
        return Packet(packet.type, payload)
    return packet if raw is None else raw


def dial_rsp(random: int, error: str) -> Packet:
    return Packet(PacketType.DIAL_RSP, DialResponse(error=error, random=random))


def close_req(connect_id: int) -> Packet:
    return Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id=connect_id))


def close_rsp(connect_id: int, error: str) -> Packet:
    return Packet(PacketType.CLOSE_RSP, CloseResponse(error=error, connect_id=connect_id))


def dial_cls(random: int) -> Packet:
    return Packet(PacketType.DIAL_CLS, CloseDial(random=random))


def reply(frontend: Frontend, message: Packet) -> SendToFrontend:
    """The server's own answer to a frontend (not timed as a connection write)."""
    return SendToFrontend(frontend, message, via_connection=False)
