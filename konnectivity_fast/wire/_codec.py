"""The pure-Python twin of the Packet codec and gRPC framing: the readable specification.

The compiled twin (``konnectivity_fast._wire``) implements the same API and must give the
same result for every input: the same ``Packet``, the same bytes, or the same ``CodecError``
subclass. ``konnectivity_fast.wire.codec`` documents the API; this module documents the
rules, in code. Field numbers come from ``konnectivity.proto`` beside this module.

Decoding follows protobuf-go (``proto.Unmarshal``), because every upstream peer is Go:

- One pass, left to right; the first problem met raises. Fields may come in any order.
- Unknown fields of every wire type are skipped, groups included. A known field number with
  the wrong wire type is unknown, and skipped.
- A scalar seen twice: the last one wins (explicit zero values included). The same oneof
  member seen twice: the second is merged field by field into the first. A different
  member replaces it, and a later return to the first member starts from empty.
- ``type`` is an int32 enum: the low 32 bits of the varint, sign-extended. ``int64`` fields
  are the varint's 64 bits as two's complement.
- Strings must be UTF-8 (``Utf8Error``); bytes fields are not checked.

Where protobuf-go and upb (the official Python runtime's C core) differ, we follow Go
(the tests check every other verdict against upb):

- A 10-byte varint whose last byte is above 1 is a ``VarintError``: Go's
  ``protowire.ConsumeVarint`` reports an overflow; upb drops the extra bits and accepts.
- Inside a skipped group, tags are read like Go's ``protowire.ConsumeTag``: field number 0
  is a ``TagError`` (upb skips it) and numbers up to 2**31-1 are accepted (upb stops at
  2**29-1, the limit that applies to every message's own fields).
- Overlong tags and lengths are accepted up to 10 bytes (upb reads them as 32-bit values
  and rejects more than 5 bytes).
- Groups may nest ``MAX_GROUP_NESTING + 1`` deep (upb stops near 100).
"""

from __future__ import annotations

from collections.abc import Callable

from konnectivity_fast.wire.errors import (
    CompressedMessageError,
    GrpcFramingError,
    InvalidFlagError,
    MessageTooLargeError,
    NestingError,
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
    FlowCredit,
    Packet,
    PacketType,
    Payload,
)

#: grpc-go's default limit on a received message (``defaultServerMaxReceiveMessageSize``,
#: 4 MiB); upstream proxy-server and proxy-agent do not change it, so neither do we.
DEFAULT_MAX_RECEIVE_MESSAGE_SIZE = 4 * 1024 * 1024

#: protobuf-go's ``protowire.DefaultRecursionLimit``: how deep skipped unknown groups may
#: nest. Go counts down from this value per group and fails below zero, so at most
#: ``MAX_GROUP_NESTING + 1`` groups can be open at once; the next start-group is an error.
MAX_GROUP_NESTING = 10000

# Wire types (the low 3 bits of a tag).
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

_MAX_FIELD = (1 << 29) - 1  # protobuf's largest field number; Go checks it per message
_MAX_GROUP_FIELD = (1 << 31) - 1  # Go's ConsumeTag (used inside groups) only needs int32
_U64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_MAX_PREFIXED_LENGTH = (1 << 32) - 1  # the gRPC prefix holds a 4-byte length

#: Packet's oneof member ``FlowCredit flowCredit = 100`` (konnectivity-fast's flow.v1
#: extension); upstream's members are 2..8.
_FLOW_CREDIT_MEMBER = 100

_PREFIX_SIZE = 5  # gRPC message prefix: 1 flag byte, 4-byte big-endian length
_FLAG_COMPRESSED = 1

Buffer = bytes | bytearray | memoryview


# --------------------------------------------------------------------------- primitives


def _pull_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a varint at ``pos``: (value as an unsigned 64-bit int, position after it).

    Like Go's ``protowire.ConsumeVarint``: at most 10 bytes, and the 10th may only hold the
    64th bit (0 or 1). Overlong encodings (``80 00``) are fine.
    """
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise TruncatedError(f"varint runs past the end of its message at offset {pos}")
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise VarintError(f"varint overflows 64 bits at offset {pos - 1}")
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _to_int64(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


def _to_int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def _pull_length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Read a length prefix and check its bytes fit: (start of the value, its end)."""
    length, pos = _pull_varint(buf, pos, end)
    if length > end - pos:
        raise TruncatedError(f"length {length} at offset {pos} runs past the end of its message")
    return pos, pos + length


def _pull_string(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    start, stop = _pull_length(buf, pos, end)
    try:
        return buf[start:stop].decode("utf-8"), stop
    except UnicodeDecodeError:
        raise Utf8Error(f"string field at offset {start} is not valid UTF-8") from None


def _pull_tag(buf: bytes, pos: int, end: int, max_field: int) -> tuple[int, int, int]:
    """Read a tag: (field number, wire type, position after it). Rejects field number 0 and
    numbers above ``max_field``; the wire type is checked by the caller."""
    tag, pos = _pull_varint(buf, pos, end)
    field = tag >> 3
    if field == 0 or field > max_field:
        raise TagError(f"invalid field number {field} before offset {pos}")
    return field, tag & 7, pos


def _skip_value(buf: bytes, field: int, wire: int, pos: int, end: int) -> int:
    """Skip the value of an unknown field (or a known one with the wrong wire type) and
    return the position after it. Groups are walked with an explicit stack, not recursion."""
    if wire == _VARINT:
        return _pull_varint(buf, pos, end)[1]
    if wire == _LEN:
        return _pull_length(buf, pos, end)[1]
    if wire in (_I64, _I32):
        size = 8 if wire == _I64 else 4
        if end - pos < size:
            raise TruncatedError(f"fixed-size value at offset {pos} runs past the end")
        return pos + size
    if wire == _EGROUP:
        raise TagError(f"end-group for field {field} without a start, before offset {pos}")
    if wire != _SGROUP:
        raise TagError(f"wire type {wire} does not exist (before offset {pos})")
    open_groups = [field]
    while open_groups:
        inner, inner_wire, pos = _pull_tag(buf, pos, end, _MAX_GROUP_FIELD)
        if inner_wire == _EGROUP:
            if inner != open_groups[-1]:
                raise TagError(
                    f"end-group for field {inner} closes the group of field {open_groups[-1]}"
                )
            open_groups.pop()
        elif inner_wire == _SGROUP:
            if len(open_groups) > MAX_GROUP_NESTING:
                raise NestingError(f"groups nested deeper than {MAX_GROUP_NESTING}")
            open_groups.append(inner)
        else:
            pos = _skip_value(buf, inner, inner_wire, pos, end)
    return pos


# ----------------------------------------------------------------------- sub-messages
# Each _pull_* parses one occurrence of a payload message in buf[pos:end]. ``prev`` is the
# payload decoded so far: when it is the same message (so the same oneof member, each class
# being one member), this occurrence merges into it; otherwise it starts from empty.


def _pull_dial_request(buf: bytes, pos: int, end: int, prev: Payload | None) -> DialRequest:
    base = prev if isinstance(prev, DialRequest) else DialRequest()
    protocol, address, random = base.protocol, base.address, base.random
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _LEN:  # string protocol = 1
            protocol, pos = _pull_string(buf, pos, end)
        elif field == 2 and wire == _LEN:  # string address = 2
            address, pos = _pull_string(buf, pos, end)
        elif field == 3 and wire == _VARINT:  # int64 random = 3
            value, pos = _pull_varint(buf, pos, end)
            random = _to_int64(value)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return DialRequest(protocol, address, random)


def _pull_dial_response(buf: bytes, pos: int, end: int, prev: Payload | None) -> DialResponse:
    base = prev if isinstance(prev, DialResponse) else DialResponse()
    error, connect_id, random = base.error, base.connect_id, base.random
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _LEN:  # string error = 1
            error, pos = _pull_string(buf, pos, end)
        elif field == 2 and wire == _VARINT:  # int64 connectID = 2
            value, pos = _pull_varint(buf, pos, end)
            connect_id = _to_int64(value)
        elif field == 3 and wire == _VARINT:  # int64 random = 3
            value, pos = _pull_varint(buf, pos, end)
            random = _to_int64(value)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return DialResponse(error, connect_id, random)


def _pull_close_request(buf: bytes, pos: int, end: int, prev: Payload | None) -> CloseRequest:
    connect_id = prev.connect_id if isinstance(prev, CloseRequest) else 0
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _VARINT:  # int64 connectID = 1
            value, pos = _pull_varint(buf, pos, end)
            connect_id = _to_int64(value)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return CloseRequest(connect_id)


def _pull_close_response(buf: bytes, pos: int, end: int, prev: Payload | None) -> CloseResponse:
    base = prev if isinstance(prev, CloseResponse) else CloseResponse()
    error, connect_id = base.error, base.connect_id
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _LEN:  # string error = 1
            error, pos = _pull_string(buf, pos, end)
        elif field == 2 and wire == _VARINT:  # int64 connectID = 2
            value, pos = _pull_varint(buf, pos, end)
            connect_id = _to_int64(value)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return CloseResponse(error, connect_id)


def _pull_close_dial(buf: bytes, pos: int, end: int, prev: Payload | None) -> CloseDial:
    random = prev.random if isinstance(prev, CloseDial) else 0
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _VARINT:  # int64 random = 1
            value, pos = _pull_varint(buf, pos, end)
            random = _to_int64(value)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return CloseDial(random)


def _pull_drain(buf: bytes, pos: int, end: int, prev: Payload | None) -> Drain:
    while pos < end:  # no fields: everything is unknown, but must still be well formed
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        pos = _skip_value(buf, field, wire, pos, end)
    return Drain()


def _pull_flow_credit(buf: bytes, pos: int, end: int, prev: Payload | None) -> FlowCredit:
    base = prev if isinstance(prev, FlowCredit) else FlowCredit()
    connect_id, credit = base.connect_id, base.bytes
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _VARINT:  # int64 connectID = 1
            value, pos = _pull_varint(buf, pos, end)
            connect_id = _to_int64(value)
        elif field == 2 and wire == _VARINT:  # int64 bytes = 2
            value, pos = _pull_varint(buf, pos, end)
            credit = _to_int64(value)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return FlowCredit(connect_id, credit)


class _DataSlot:
    """A ``Data`` payload being decoded, plus where its ``data`` bytes lie in the buffer
    (what ``peek_data`` returns a view of)."""

    __slots__ = ("connect_id", "data_end", "data_start", "error")

    def __init__(self) -> None:
        self.connect_id = 0
        self.error = ""
        self.data_start = 0
        self.data_end = 0

    def pull(self, buf: bytes, pos: int, end: int) -> None:
        """Merge one occurrence of the ``data`` member (buf[pos:end]) into this slot."""
        while pos < end:
            field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
            if field == 1 and wire == _VARINT:  # int64 connectID = 1
                value, pos = _pull_varint(buf, pos, end)
                self.connect_id = _to_int64(value)
            elif field == 2 and wire == _LEN:  # string error = 2
                self.error, pos = _pull_string(buf, pos, end)
            elif field == 3 and wire == _LEN:  # bytes data = 3 (not UTF-8 checked)
                self.data_start, pos = _pull_length(buf, pos, end)
                self.data_end = pos
            else:
                pos = _skip_value(buf, field, wire, pos, end)

    def value(self, buf: bytes) -> Data:
        return Data(self.connect_id, self.error, buf[self.data_start : self.data_end])


#: Packet's ``oneof payload`` members by field number, but 4 (``Data data = 4``), which is
#: decoded into a ``_DataSlot``.
_PULL_MEMBER: dict[int, Callable[[bytes, int, int, Payload | None], Payload]] = {
    2: _pull_dial_request,  # DialRequest dialRequest = 2
    3: _pull_dial_response,  # DialResponse dialResponse = 3
    5: _pull_close_request,  # CloseRequest closeRequest = 5
    6: _pull_close_response,  # CloseResponse closeResponse = 6
    7: _pull_close_dial,  # CloseDial closeDial = 7
    8: _pull_drain,  # Drain drain = 8
    _FLOW_CREDIT_MEMBER: _pull_flow_credit,  # FlowCredit flowCredit = 100 (flow.v1)
}


def _as_bytes(buf: Buffer) -> bytes:
    return buf if isinstance(buf, bytes) else bytes(buf)


def _pull_packet(buf: bytes) -> tuple[int, Payload | _DataSlot | None]:
    """Parse a whole Packet: (type, payload), with a ``Data`` payload left as a slot."""
    packet_type = 0
    payload: Payload | _DataSlot | None = None  # the oneof member decoded so far
    pos, end = 0, len(buf)
    while pos < end:
        field, wire, pos = _pull_tag(buf, pos, end, _MAX_FIELD)
        if field == 1 and wire == _VARINT:  # PacketType type = 1 (an int32 enum)
            value, pos = _pull_varint(buf, pos, end)
            packet_type = _to_int32(value)
        elif wire == _LEN and (2 <= field <= 8 or field == _FLOW_CREDIT_MEMBER):
            # oneof payload: upstream's members 2..8, and flowCredit = 100
            start, pos = _pull_length(buf, pos, end)
            if field == 4:  # Data data = 4
                slot = payload if isinstance(payload, _DataSlot) else _DataSlot()
                slot.pull(buf, start, pos)
                payload = slot
            else:
                prev = None if isinstance(payload, _DataSlot) else payload
                payload = _PULL_MEMBER[field](buf, start, pos, prev)
        else:
            pos = _skip_value(buf, field, wire, pos, end)
    return packet_type, payload


# --------------------------------------------------------------------------- decoding


def decode_packet(buf: Buffer) -> Packet:
    """Decode one serialized ``Packet`` (the payload of one gRPC message)."""
    data = _as_bytes(buf)
    packet_type, payload = _pull_packet(data)
    if isinstance(payload, _DataSlot):
        return Packet(packet_type, payload.value(data))
    return Packet(packet_type, payload)


def peek_packet(buf: Buffer) -> tuple[int, int]:
    """(type, connectID of the payload), as ``decode_packet`` would give them; the
    connectID is 0 for payloads without one and for no payload."""
    packet = decode_packet(buf)
    payload = packet.payload
    if isinstance(payload, DialResponse | Data | CloseRequest | CloseResponse | FlowCredit):
        return packet.type, payload.connect_id
    return packet.type, 0


def _byte_view(buf: Buffer) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def peek_data(buf: Buffer) -> tuple[int, memoryview] | None:
    """For a DATA packet with a ``Data`` payload: (connectID, a view of the data bytes inside
    ``buf``). ``None`` for any other valid packet; malformed input raises like decode."""
    packet_type, payload = _pull_packet(_as_bytes(buf))
    if packet_type != PacketType.DATA or not isinstance(payload, _DataSlot):
        return None
    return payload.connect_id, _byte_view(buf)[payload.data_start : payload.data_end]


# --------------------------------------------------------------------------- encoding


def _varint(value: int) -> bytes:
    """Encode an unsigned 64-bit value (callers pass negatives masked to 64 bits)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int64(value: int) -> int:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"{value} does not fit an int64 field")
    return value & _U64  # negative: two's complement, always 10 bytes on the wire


def _put_int64(out: bytearray, key: int, value: int) -> None:
    """Append an int64 field (``key`` is its one-byte tag), omitted when zero (proto3)."""
    if value:
        out.append(key)
        out += _varint(_int64(value))


def _put_string(out: bytearray, key: int, value: str) -> None:
    if not isinstance(value, str):
        raise TypeError(f"string field needs a str, not {type(value).__name__}")
    if value:
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise Utf8Error("string field cannot be encoded as UTF-8") from None
        out.append(key)
        out += _varint(len(raw))
        out += raw


def _put_bytes(out: bytearray, key: int, value: bytes) -> None:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"bytes field needs bytes, not {type(value).__name__}")
    raw = _byte_view(value)
    if raw.nbytes:
        out.append(key)
        out += _varint(raw.nbytes)
        out += raw


def _push_payload(payload: Payload) -> tuple[int, bytes]:
    """Serialize a payload message: (its field number in Packet, its bytes). Tags are
    ``field << 3 | wire type``; every field number inside a payload is below 16, so those
    tags are one byte (the member tag of ``flowCredit = 100`` in Packet takes two)."""
    out = bytearray()
    kind = type(payload)
    if kind is Data:
        assert isinstance(payload, Data)
        _put_int64(out, 0x08, payload.connect_id)  # connectID = 1, varint
        _put_string(out, 0x12, payload.error)  # error = 2, length-delimited
        _put_bytes(out, 0x1A, payload.data)  # data = 3, length-delimited
        return 4, bytes(out)
    if kind is DialRequest:
        assert isinstance(payload, DialRequest)
        _put_string(out, 0x0A, payload.protocol)  # protocol = 1
        _put_string(out, 0x12, payload.address)  # address = 2
        _put_int64(out, 0x18, payload.random)  # random = 3
        return 2, bytes(out)
    if kind is DialResponse:
        assert isinstance(payload, DialResponse)
        _put_string(out, 0x0A, payload.error)  # error = 1
        _put_int64(out, 0x10, payload.connect_id)  # connectID = 2
        _put_int64(out, 0x18, payload.random)  # random = 3
        return 3, bytes(out)
    if kind is CloseRequest:
        assert isinstance(payload, CloseRequest)
        _put_int64(out, 0x08, payload.connect_id)  # connectID = 1
        return 5, bytes(out)
    if kind is CloseResponse:
        assert isinstance(payload, CloseResponse)
        _put_string(out, 0x0A, payload.error)  # error = 1
        _put_int64(out, 0x10, payload.connect_id)  # connectID = 2
        return 6, bytes(out)
    if kind is CloseDial:
        assert isinstance(payload, CloseDial)
        _put_int64(out, 0x08, payload.random)  # random = 1
        return 7, bytes(out)
    if kind is Drain:
        return 8, b""
    if kind is FlowCredit:
        assert isinstance(payload, FlowCredit)
        _put_int64(out, 0x08, payload.connect_id)  # connectID = 1
        _put_int64(out, 0x10, payload.bytes)  # bytes = 2
        return _FLOW_CREDIT_MEMBER, bytes(out)
    raise TypeError(f"not a Packet payload: {kind.__name__}")


def encode_packet(packet: Packet) -> bytes:
    """protobuf-go's canonical encoding of ``packet``: type (1) unless 0, then the payload
    member (2..8 or 100), which is written whenever it is set, even when empty."""
    out = bytearray()
    packet_type = packet.type
    if not _INT32_MIN <= packet_type <= _INT32_MAX:
        raise ValueError(f"packet type {packet_type} does not fit the int32 enum")
    if packet_type:
        out.append(0x08)  # type = 1, varint; a negative enum is sign-extended to 10 bytes
        out += _varint(packet_type & _U64)
    if packet.payload is not None:
        field, body = _push_payload(packet.payload)
        out += _varint(field << 3 | _LEN)  # one byte for 2..8, two for 100
        out += _varint(len(body))
        out += body
    return bytes(out)


# ----------------------------------------------------------------------- gRPC framing


def message_prefix(length: int) -> bytes:
    """gRPC's 5-byte message prefix: flag 0 (not compressed), then the big-endian length."""
    if not 0 <= length <= _MAX_PREFIXED_LENGTH:
        raise ValueError(f"gRPC message length {length} does not fit 4 bytes")
    return b"\x00" + length.to_bytes(4, "big")


def frame_message(msg: Buffer) -> bytes:
    """``msg`` with its gRPC prefix."""
    view = _byte_view(msg)
    return message_prefix(view.nbytes) + view.tobytes()


def data_header(connect_id: int, length: int) -> bytes:
    """Everything of the framed ``Packet(DATA, Data(connect_id, data=p))`` that comes before
    the ``length`` bytes of ``p``, so the payload can be sent after it without a copy."""
    if length < 0:
        raise ValueError(f"negative payload length {length}")
    data = bytearray()
    _put_int64(data, 0x08, connect_id)  # Data.connectID = 1
    body_size = len(data)
    if length:  # Data.data = 3 is omitted when empty, like any proto3 default
        data.append(0x1A)
        data += _varint(length)
        body_size = len(data) + length
    size = _varint(body_size)
    # Packet.type = 1 is DATA (4); Packet.data = 4 is length-delimited (tag 0x22).
    head = b"\x08\x04\x22" + size
    return message_prefix(len(head) + body_size) + head + bytes(data)


class MessageReader:
    """Reassembles gRPC length-prefixed messages from a stream of byte chunks.

    The 5-byte prefix is checked as soon as it is complete: first the length against
    ``max_message_size`` (grpc-go checks it first, too), then the flag (0 is the only value
    accepted: we negotiate no compression). An error is sticky: every later ``feed``
    raises it again. At most ``max_message_size + 5`` bytes are ever buffered.
    """

    __slots__ = ("_body", "_error", "_head", "_need", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_RECEIVE_MESSAGE_SIZE) -> None:
        if max_message_size < 0:
            raise ValueError(f"negative max_message_size {max_message_size}")
        self.max_message_size = max_message_size
        self._head = bytearray()  # the prefix being read (< 5 bytes) ...
        self._body = bytearray()  # ... or the body being read, once the prefix is whole
        self._need = -1  # bytes the current body still lacks; -1 while reading a prefix
        self._error: GrpcFramingError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered of a message not yet complete (its prefix included)."""
        return len(self._head) + len(self._body)

    def _check_prefix(self) -> int:
        flag = self._head[0]
        length = int.from_bytes(self._head[1:5], "big")
        if length > self.max_message_size:
            raise MessageTooLargeError(
                f"grpc: received message larger than max ({length} vs. {self.max_message_size})"
            )
        if flag == _FLAG_COMPRESSED:
            raise CompressedMessageError(
                "grpc: compressed flag set with identity or empty encoding"
            )
        if flag != 0:
            raise InvalidFlagError(f"grpc: received unexpected payload format {flag}")
        return length

    def feed(self, data: Buffer) -> list[bytes]:
        """Add a chunk; return the messages it completes (their bodies, without prefix).
        Messages completed earlier in a chunk that then raises are discarded with it."""
        if self._error is not None:
            raise self._error
        view = _byte_view(data)
        pos, end = 0, view.nbytes
        messages: list[bytes] = []
        try:
            while pos < end or self._need == 0:
                if self._need < 0:  # reading a prefix
                    take = min(_PREFIX_SIZE - len(self._head), end - pos)
                    self._head += view[pos : pos + take]
                    pos += take
                    if len(self._head) < _PREFIX_SIZE:
                        break
                    self._need = self._check_prefix()
                    continue
                take = min(self._need, end - pos)
                if take == self._need and not self._body:  # whole body in this chunk
                    messages.append(view[pos : pos + take].tobytes())
                else:
                    self._body += view[pos : pos + take]
                    if take == self._need:
                        messages.append(bytes(self._body))
                        self._body.clear()
                pos += take
                self._need -= take
                if self._need == 0:
                    self._head.clear()
                    self._need = -1
        except GrpcFramingError as exc:
            self._error = exc
            self._head.clear()
            self._body.clear()
            raise
        return messages
