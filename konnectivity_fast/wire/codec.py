"""The codec API, from the twin chosen at import.

Two twins implement the same codec API:

- ``konnectivity_fast.wire._codec`` (pure Python): the readable specification and the test
  oracle;
- ``konnectivity_fast._wire`` (Cython over C, built by ``setup.py``): the fast one, which
  also holds the HTTP/2 engine.

This module re-exports the twin chosen at import (``IMPLEMENTATION``): the compiled one,
unless ``KONNECTIVITY_FAST_PURE=1`` (see ``konnectivity_fast._compiled``).

The codec API (identical in both twins):

``encode_packet(packet) -> bytes``
    protobuf-go's canonical encoding: fields in number order, proto3 defaults omitted, a set
    oneof member always emitted (even when empty), negative int64/enum as 10-byte varints.
``decode_packet(buf) -> Packet``
    Accepts any field order, skips unknown fields (a known number with the wrong wire type is
    unknown), last value wins, a repeated message field merges, a different oneof member
    replaces. Rejects what Go rejects, with a ``CodecError`` subclass.
``peek_packet(buf) -> (type, connect_id)``
    The type and the payload's connectID (0 for payloads without one), equal to what
    ``decode_packet`` would give, without building the payload; raises as it would.
``peek_data(buf) -> (connect_id, memoryview) | None``
    For a DATA packet with a ``Data`` payload, its connectID and a view of its bytes inside
    ``buf`` (no copy); ``None`` for any other valid packet.
``data_header(connect_id, length) -> bytes``
    The gRPC prefix and Packet/Data tags such that ``data_header(c, len(p)) + p`` is the
    framed message of ``Packet(DATA, Data(c, data=p))``: a DATA message without copying ``p``.
``frame_message(msg) -> bytes`` / ``message_prefix(length) -> bytes``
    gRPC's 5-byte length prefix (flag 0, big-endian length).
``MessageReader(max_message_size=DEFAULT_MAX_RECEIVE_MESSAGE_SIZE)``
    Reassembles gRPC messages from chunks: ``feed(chunk) -> list[bytes]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from konnectivity_fast._compiled import IMPLEMENTATION, codec_module

if TYPE_CHECKING:
    # Both twins have one API: mypy checks its callers against the compiled core's stub,
    # which stubtest keeps exact (the pure twin is held to it by the differential tests).
    import konnectivity_fast._wire as _codec
else:
    _codec = codec_module()
encode_packet = _codec.encode_packet
decode_packet = _codec.decode_packet
peek_packet = _codec.peek_packet
peek_data = _codec.peek_data
data_header = _codec.data_header
frame_message = _codec.frame_message
message_prefix = _codec.message_prefix
MessageReader = _codec.MessageReader
DEFAULT_MAX_RECEIVE_MESSAGE_SIZE: int = _codec.DEFAULT_MAX_RECEIVE_MESSAGE_SIZE

__all__ = [
    "DEFAULT_MAX_RECEIVE_MESSAGE_SIZE",
    "IMPLEMENTATION",
    "MessageReader",
    "data_header",
    "decode_packet",
    "encode_packet",
    "frame_message",
    "message_prefix",
    "peek_data",
    "peek_packet",
]
