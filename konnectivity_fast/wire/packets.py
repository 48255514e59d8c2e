"""The Konnectivity ``Packet`` and its payloads, as plain Python values.

These mirror the messages of our ``konnectivity.proto`` (beside this module), which
describes upstream's wire format: field numbers, proto3 semantics, no package. Names are
the upstream concepts in Python spelling (``connectID`` -> ``connect_id``). Beyond
upstream, one packet type and payload belong to konnectivity-fast's ``flow.v1`` extension
(``PacketType.FLOW_CREDIT``, ``FlowCredit``), sent only on streams that negotiated it
(``contract.Extension``).

Invariants:
- Values are immutable and compare by content, so a decoded packet can be compared with
  the packet that was encoded, across both codec twins.
- ``Packet.type`` is a plain ``int``: proto3 enums are open, and a peer may send a number
  this version does not know. Known numbers compare equal to their ``PacketType`` member.
- A payload is present or absent independently of ``type``; a packet whose payload does not
  match its type is representable (peers send such things) and is rejected by the layers
  above, never by the codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias


class PacketType(IntEnum):
    """``PacketType`` of the wire format. The zero value is DIAL_REQ, so an unset type reads
    as a dial request."""

    DIAL_REQ = 0
    DIAL_RSP = 1
    CLOSE_REQ = 2
    CLOSE_RSP = 3
    DATA = 4
    DIAL_CLS = 5
    DRAIN = 6
    # konnectivity-fast's extension flow.v1, only on streams that negotiated it. Upstream's
    # numbers grow by one from 0; 100 leaves them room.
    FLOW_CREDIT = 100


@dataclass(frozen=True, slots=True)
class DialRequest:
    """Field numbers: protocol=1, address=2 ("host:port"), random=3 (the dial ID)."""

    protocol: str = ""
    address: str = ""
    random: int = 0


@dataclass(frozen=True, slots=True)
class DialResponse:
    """Field numbers: error=1, connectID=2, random=3 (echoed from the request)."""

    error: str = ""
    connect_id: int = 0
    random: int = 0


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """Field numbers: connectID=1."""

    connect_id: int = 0


@dataclass(frozen=True, slots=True)
class CloseResponse:
    """Field numbers: error=1, connectID=2."""

    error: str = ""
    connect_id: int = 0


@dataclass(frozen=True, slots=True)
class CloseDial:
    """Field numbers: random=1 (the dial being abandoned)."""

    random: int = 0


@dataclass(frozen=True, slots=True)
class Drain:
    """No fields: an agent's hint that it is going away."""


@dataclass(frozen=True, slots=True)
class Data:
    """Field numbers: connectID=1, error=2 (never used by upstream), data=3."""

    connect_id: int = 0
    error: str = ""
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class FlowCredit:
    """konnectivity-fast's ``flow.v1`` extension (not upstream's): ``bytes`` more DATA
    payload bytes may be sent for connection ``connect_id`` toward the sender of this
    packet. Field numbers: connectID=1, bytes=2. Its member number in ``Packet`` is 100."""

    connect_id: int = 0
    bytes: int = 0  # the wire name; shadows the builtin inside this class body only


Payload: TypeAlias = (
    DialRequest
    | DialResponse
    | Data
    | CloseRequest
    | CloseResponse
    | CloseDial
    | Drain
    | FlowCredit
)

#: The ``oneof payload`` members by field number of ``Packet``.
PAYLOAD_FIELDS: dict[int, type[Payload]] = {
    2: DialRequest,
    3: DialResponse,
    4: Data,
    5: CloseRequest,
    6: CloseResponse,
    7: CloseDial,
    8: Drain,
    100: FlowCredit,  # flow.v1, far from upstream's members so none of theirs can collide
}
PAYLOAD_FIELD_OF: dict[type[Payload], int] = {cls: num for num, cls in PAYLOAD_FIELDS.items()}

#: The payload class each packet type carries.
PAYLOAD_OF_TYPE: dict[PacketType, type[Payload]] = {
    PacketType.DIAL_REQ: DialRequest,
    PacketType.DIAL_RSP: DialResponse,
    PacketType.CLOSE_REQ: CloseRequest,
    PacketType.CLOSE_RSP: CloseResponse,
    PacketType.DATA: Data,
    PacketType.DIAL_CLS: CloseDial,
    PacketType.DRAIN: Drain,
    PacketType.FLOW_CREDIT: FlowCredit,
}


@dataclass(frozen=True, slots=True)
class Packet:
    """Field numbers: type=1, then the ``payload`` oneof (2..8 and 100, see
    ``PAYLOAD_FIELDS``)."""

    type: int = PacketType.DIAL_REQ
    payload: Payload | None = None

    def payload_matches_type(self) -> bool:
        """True when the payload is the one upstream reads for this type."""
        expected = PAYLOAD_OF_TYPE.get(self.type)  # type: ignore[call-overload]
        return expected is not None and isinstance(self.payload, expected)
