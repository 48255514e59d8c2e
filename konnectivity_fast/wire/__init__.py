"""The wire layer: Konnectivity ``Packet`` values, their protobuf codec and gRPC framing.

``packets`` holds the values, ``errors`` the error classes, ``codec`` the codec API of the
twin chosen at import, ``_codec`` the pure-Python twin. This package imports neither twin
itself, so the compiled core can import ``packets`` while it loads. ``contract`` holds the
names and texts both programs agree on beyond the packets (service paths, metadata keys,
agent identifiers, strategy and mode names, extension negotiation), over ``gotext``'s ports
of Go's text functions; import them from their modules.
"""

from __future__ import annotations

from konnectivity_fast.wire.errors import (
    CodecError,
    CompressedMessageError,
    GrpcFramingError,
    InvalidFlagError,
    MessageTooLargeError,
    NestingError,
    StatusCode,
    TagError,
    TruncatedError,
    Utf8Error,
    VarintError,
)
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    Packet,
    PacketType,
    Payload,
)

__all__ = [
    "CloseDial",
    "CloseRequest",
    "CloseResponse",
    "CodecError",
    "CompressedMessageError",
    "Data",
    "DialRequest",
    "DialResponse",
    "Drain",
    "GrpcFramingError",
    "InvalidFlagError",
    "MessageTooLargeError",
    "NestingError",
    "Packet",
    "PacketType",
    "Payload",
    "StatusCode",
    "TagError",
    "TruncatedError",
    "Utf8Error",
    "VarintError",
]
