"""Golden cases of the Packet codec and gRPC framing helpers, on both twins.

Hex strings are the wire bytes (spaces for reading). Every round-trip case is also checked
against the official runtime, so a golden value cannot drift from protobuf itself.
"""

from __future__ import annotations

from types import ModuleType

import pytest
from google.protobuf.message import DecodeError

from konnectivity_fast.wire.errors import (
    CodecError,
    NestingError,
    TagError,
    TruncatedError,
    Utf8Error,
    VarintError,
)
from konnectivity_fast.wire.packets import (
    PAYLOAD_FIELD_OF,
    PAYLOAD_FIELDS,
    PAYLOAD_OF_TYPE,
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
)
from tests.support.oracle import against_official, from_official, official_encode, outcome, pb2

T = PacketType
INT64_MAX, INT64_MIN = (1 << 63) - 1, -(1 << 63)


def h(text: str | bytes) -> bytes:
    """Wire bytes from spaced hex (bytes pass through, for inputs built in code)."""
    return text if isinstance(text, bytes) else bytes.fromhex(text.replace(" ", ""))


def varint(value: int) -> str:
    out = []
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(f"{byte | 0x80 if value else byte:02x}")
        if not value:
            return " ".join(out)


def nested_groups(depth: int) -> bytes:
    """``depth`` nested unknown groups of field 1 (start 0b ... end 0c)."""
    return b"\x0b" * depth + b"\x0c" * depth


# ------------------------------------------------------------------------ round trips

ROUND_TRIP: list[tuple[str, Packet, str]] = [
    ("nothing", Packet(), ""),
    ("type only", Packet(T.DATA), "08 04"),
    ("empty oneof member", Packet(T.DIAL_REQ, DialRequest()), "12 00"),
    ("empty drain", Packet(T.DRAIN, Drain()), "08 06 42 00"),
    (
        "dial request",
        Packet(T.DIAL_REQ, DialRequest("tcp", "10.0.0.1:443", 42)),
        "12 15 0a 03 746370 12 0c 31302e302e302e313a343433 18 2a",
    ),
    ("dial response", Packet(T.DIAL_RSP, DialResponse("", 7, 42)), "08 01 1a 04 10 07 18 2a"),
    (
        "dial response error",
        Packet(T.DIAL_RSP, DialResponse("refused", 0, 9)),
        "08 01 1a 0b 0a 07 72656675736564 18 09",
    ),
    ("close request", Packet(T.CLOSE_REQ, CloseRequest(7)), "08 02 2a 02 08 07"),
    ("close response", Packet(T.CLOSE_RSP, CloseResponse("", 7)), "08 03 32 02 10 07"),
    (
        "close response error",
        Packet(T.CLOSE_RSP, CloseResponse("no", 300)),
        "08 03 32 07 0a 02 6e6f 10 ac 02",
    ),
    ("close dial", Packet(T.DIAL_CLS, CloseDial(42)), "08 05 3a 02 08 2a"),
    ("data", Packet(T.DATA, Data(7, data=b"hello")), "08 04 22 09 08 07 1a 05 68656c6c6f"),
    ("data error", Packet(T.DATA, Data(1, error="x")), "08 04 22 05 08 01 12 01 78"),
    ("data, id 0", Packet(T.DATA, Data(0, data=b"\x00")), "08 04 22 03 1a 01 00"),
    ("data, empty", Packet(T.DATA, Data()), "08 04 22 00"),
    (
        "data 200 bytes",
        Packet(T.DATA, Data(1, data=b"\xff" * 200)),
        "08 04 22 cd 01 08 01 1a c8 01" + "ff" * 200,
    ),
    (
        "negative connectID",
        Packet(T.DATA, Data(-1)),
        "08 04 22 0b 08 ff ff ff ff ff ff ff ff ff 01",
    ),
    (
        "max int64",
        Packet(T.DIAL_CLS, CloseDial(INT64_MAX)),
        "08 05 3a 0a 08 ff ff ff ff ff ff ff ff 7f",
    ),
    (
        "min int64",
        Packet(T.DIAL_CLS, CloseDial(INT64_MIN)),
        "08 05 3a 0b 08 80 80 80 80 80 80 80 80 80 01",
    ),
    ("negative enum", Packet(-1), "08 ff ff ff ff ff ff ff ff ff 01"),
    ("min int32 enum", Packet(-(1 << 31)), "08 80 80 80 80 f8 ff ff ff ff 01"),
    ("max int32 enum", Packet((1 << 31) - 1), "08 ff ff ff ff 07"),
    ("unknown enum", Packet(7, CloseRequest(1)), "08 07 2a 02 08 01"),
    ("payload not matching type", Packet(T.DATA, CloseRequest(1)), "08 04 2a 02 08 01"),
    (
        "unicode",
        Packet(T.DIAL_REQ, DialRequest(address="h\u00e9\U0001f600:1")),
        "12 0b 12 09 68 c3a9 f09f9880 3a31",
    ),
    # flow.v1's FlowCredit: type 100 (64), member 100 (tag 100 << 3 | 2 = 802: a2 06).
    (
        "flow credit",
        Packet(T.FLOW_CREDIT, FlowCredit(7, 65536)),
        "08 64 a2 06 06 08 07 10 80 80 04",
    ),
    ("flow credit, empty", Packet(T.FLOW_CREDIT, FlowCredit()), "08 64 a2 06 00"),
    ("flow credit, connectID 0", Packet(T.FLOW_CREDIT, FlowCredit(0, 1)), "08 64 a2 06 02 10 01"),
    ("flow credit, no bytes", Packet(T.FLOW_CREDIT, FlowCredit(5, 0)), "08 64 a2 06 02 08 05"),
    (
        "flow credit, negative",
        Packet(T.FLOW_CREDIT, FlowCredit(-1, INT64_MIN)),
        "08 64 a2 06 16 08 ff ff ff ff ff ff ff ff ff 01 10 80 80 80 80 80 80 80 80 80 01",
    ),
    (
        "flow credit, max int64",
        Packet(T.FLOW_CREDIT, FlowCredit(INT64_MAX, INT64_MAX)),
        "08 64 a2 06 14 08 ff ff ff ff ff ff ff ff 7f 10 ff ff ff ff ff ff ff ff 7f",
    ),
    (
        "flow credit, 32-bit values",
        Packet(T.FLOW_CREDIT, FlowCredit(1 << 32, (1 << 31) - 1)),
        "08 64 a2 06 0c 08 80 80 80 80 10 10 ff ff ff ff 07",
    ),
    ("flow credit type only", Packet(T.FLOW_CREDIT), "08 64"),
    ("flow credit without a type", Packet(payload=FlowCredit(3, 4)), "a2 06 04 08 03 10 04"),
    ("flow credit under DATA", Packet(T.DATA, FlowCredit(1, 2)), "08 04 a2 06 04 08 01 10 02"),
    (
        "data under FLOW_CREDIT",
        Packet(T.FLOW_CREDIT, Data(1, data=b"A")),
        "08 64 22 05 08 01 1a 01 41",
    ),
]


@pytest.mark.parametrize(
    ("packet", "wire"), [c[1:] for c in ROUND_TRIP], ids=[c[0] for c in ROUND_TRIP]
)
def test_round_trip(codec: ModuleType, packet: Packet, wire: str) -> None:
    assert codec.encode_packet(packet).hex() == h(wire).hex()
    assert codec.decode_packet(h(wire)) == packet
    assert official_encode(packet) == h(wire)  # the golden value is protobuf's own


def test_decoded_data_is_bytes(codec: ModuleType) -> None:
    for buf in (
        h("22 03 1a 01 41"),
        bytearray(h("22 03 1a 01 41")),
        memoryview(h("22 03 1a 01 41")),
    ):
        payload = codec.decode_packet(buf).payload
        assert type(payload.data) is bytes
        assert payload.data == b"A"


def test_decode_accepts_buffers(codec: ModuleType) -> None:
    wire = h("ffff 08 04 22 03 1a 01 41 ffff")
    expected = Packet(T.DATA, Data(data=b"A"))
    assert codec.decode_packet(memoryview(wire)[2:-2]) == expected
    assert codec.decode_packet(bytearray(wire[2:-2])) == expected


def test_encode_accepts_data_buffers(codec: ModuleType) -> None:
    wire = h("08 04 22 03 1a 01 41")
    for data in (bytearray(b"A"), memoryview(b"xAx")[1:2]):
        assert codec.encode_packet(Packet(T.DATA, Data(data=data))) == wire  # type: ignore[arg-type]


# ------------------------------------------------------------------------ decode only

GROUP_16 = "83 01"  # start group, field 16 (16 << 3 | 3 needs two bytes)
END_16 = "84 01"
DECODE: list[tuple[str, str | bytes, Packet]] = [
    ("enum 2**32+4 keeps the low 32 bits", "08 84 80 80 80 10", Packet(4)),
    ("enum with bit 31 set is negative", "08 80 80 80 80 08", Packet(-(1 << 31))),
    (
        "int64 from a 10-byte varint, 10th byte 1",
        "2a 0b 08 80 80 80 80 80 80 80 80 80 01",
        Packet(payload=CloseRequest(INT64_MIN)),
    ),
    ("overlong varint 80 00", "08 80 00", Packet(0)),
    ("overlong varint 84 00", "08 84 00", Packet(4)),
    ("overlong tag", "88 80 80 80 80 80 80 80 80 00 04", Packet(4)),
    ("unknown varint", "08 04 78 96 01", Packet(4)),
    ("unknown fixed64", "79 0102030405060708 08 04", Packet(4)),
    ("unknown length-delimited", "7a 02 abcd 08 04", Packet(4)),
    ("unknown fixed32", "7d 01020304 08 04", Packet(4)),
    ("unknown empty group", "7b 7c 08 04", Packet(4)),
    ("unknown group with fields", "7b 08 07 12 01 ff 79 0102030405060708 7c 08 04", Packet(4)),
    ("nested groups", f"7b {GROUP_16} 7b 7c 08 01 {END_16} 7c 08 04", Packet(4)),
    ("group reusing a known number", "0b 08 07 0c", Packet(0)),
    ("field 2**29-1", f"{varint(((1 << 29) - 1) << 3)} 00 08 04", Packet(4)),
    ("reserved field 19000", f"{varint(19000 << 3 | 2)} 00 08 04", Packet(4)),
    ("field 9 (dest in newer upstream)", "4a 02 08 01 08 04", Packet(4)),
    (
        "group field number up to 2**31-1 (Go)",
        f"0b {varint(((1 << 31) - 1) << 3)} 00 0c 08 04",
        Packet(4),
    ),
    (
        "unknown fields in a payload",
        "22 0e 78 01 7a 01 00 7b 7c 7d 00000000 08 05",
        Packet(payload=Data(5)),
    ),
    ("unknown fields in drain", "42 05 08 01 12 01 ff", Packet(payload=Drain())),
    ("type with wire type 2", "0a 01 04", Packet(0)),
    ("payload with wire type 0", "08 04 20 05", Packet(4)),
    ("payload as a group", "08 04 23 08 05 24", Packet(4)),
    ("payload with fixed32", "08 04 25 00000000", Packet(4)),
    ("int64 with wire type 2", "22 03 0a 01 07", Packet(payload=Data())),
    ("bytes with wire type 0", "22 02 18 05", Packet(payload=Data())),
    ("string with wire type 0", "12 02 10 05", Packet(payload=DialRequest())),
    ("last type wins", "08 01 08 04", Packet(4)),
    ("last scalar wins in a payload", "22 04 08 05 08 07", Packet(payload=Data(7))),
    ("merge", "22 02 08 05 22 03 1a 01 41", Packet(payload=Data(5, data=b"A"))),
    ("merge, last data wins", "22 03 1a 01 41 22 03 1a 01 42", Packet(payload=Data(data=b"B"))),
    ("merge, explicit zero wins", "22 02 08 05 22 02 08 00", Packet(payload=Data(0))),
    ("merge, explicit empty wins", "22 03 1a 01 41 22 02 1a 00", Packet(payload=Data())),
    (
        "merge dial request",
        "12 02 18 01 12 05 0a 03 746370",
        Packet(payload=DialRequest("tcp", "", 1)),
    ),
    ("merge dial response", "1a 02 10 01 1a 03 0a 01 78", Packet(payload=DialResponse("x", 1))),
    ("merge close response", "32 02 10 01 32 03 0a 01 78", Packet(payload=CloseResponse("x", 1))),
    ("merge close request", "2a 02 08 01 2a 00", Packet(payload=CloseRequest(1))),
    ("merge close dial", "3a 02 08 01 3a 00", Packet(payload=CloseDial(1))),
    ("replace", "22 02 08 05 2a 02 08 07", Packet(payload=CloseRequest(7))),
    ("replace by empty", "22 02 08 05 42 00", Packet(payload=Drain())),
    (
        "return to first member starts fresh",
        "22 02 08 05 2a 02 08 07 22 03 1a 01 41",
        Packet(payload=Data(data=b"A")),
    ),
    ("return after drain starts fresh", "12 02 18 01 42 00 12 00", Packet(payload=DialRequest())),
    ("explicit defaults", "08 00 22 06 08 00 12 00 1a 00 08 00", Packet(0, Data())),
    ("fields in reverse order", "22 05 1a 01 41 08 05 08 04", Packet(4, Data(5, data=b"A"))),
    ("bytes are not UTF-8 checked", "22 03 1a 01 ff", Packet(payload=Data(data=b"\xff"))),
    # flow.v1's FlowCredit (member 100, tag a2 06), by the same rules as upstream's members.
    ("flow credit in reverse order", "a2 06 04 10 04 08 03", Packet(payload=FlowCredit(3, 4))),
    (
        "unknown fields around and inside flow credit",
        "78 01 a2 06 10 18 05 08 03 7a 01 00 7b 7c 10 04 7d 00000000 08 64 7a 02 abcd",
        Packet(T.FLOW_CREDIT, FlowCredit(3, 4)),
    ),
    ("flow credit member with wire type 0", "08 64 a0 06 05", Packet(T.FLOW_CREDIT)),
    ("flow credit member as a group", "a3 06 08 05 a4 06 08 64", Packet(T.FLOW_CREDIT)),
    ("flow credit member with fixed64", "a1 06 0102030405060708", Packet()),
    ("flow credit member with fixed32", "a5 06 01020304", Packet()),
    ("flow credit int64 with wire type 2", "a2 06 03 12 01 07", Packet(payload=FlowCredit())),
    (
        "flow credit int64 with fixed64",
        "a2 06 09 11 0102030405060708",
        Packet(payload=FlowCredit()),
    ),
    ("overlong flow credit member tag", "a2 86 80 00 02 08 01", Packet(payload=FlowCredit(1))),
    (
        "flow credit from 10-byte varints",
        "a2 06 16 08 80 80 80 80 80 80 80 80 80 01 10 ff ff ff ff ff ff ff ff ff 01",
        Packet(payload=FlowCredit(INT64_MIN, -1)),
    ),
    ("last scalar wins in flow credit", "a2 06 04 10 05 10 07", Packet(payload=FlowCredit(0, 7))),
    ("merge flow credit", "a2 06 02 08 05 a2 06 02 10 07", Packet(payload=FlowCredit(5, 7))),
    (
        "merge flow credit, explicit zero wins",
        "a2 06 04 08 05 10 07 a2 06 02 10 00",
        Packet(payload=FlowCredit(5, 0)),
    ),
    ("merge flow credit, empty", "a2 06 04 08 05 10 07 a2 06 00", Packet(payload=FlowCredit(5, 7))),
    (
        "data replaced by flow credit",
        "22 02 08 05 a2 06 02 10 07",
        Packet(payload=FlowCredit(0, 7)),
    ),
    ("flow credit replaced by data", "a2 06 02 08 05 22 02 1a 00", Packet(payload=Data())),
    ("flow credit replaced by drain", "a2 06 04 08 05 10 07 42 00", Packet(payload=Drain())),
    (
        "return to flow credit starts fresh",
        "a2 06 02 10 07 2a 02 08 01 a2 06 02 08 05",
        Packet(payload=FlowCredit(5, 0)),
    ),
    ("field 100 inside a payload is unknown", "22 04 a2 06 01 00", Packet(payload=Data())),
    ("field 100 inside a group is unknown", "0b a2 06 00 0c", Packet()),
    ("10001 nested groups (Go's limit)", nested_groups(10001), Packet()),
    (
        "10001 nested groups in a payload",
        b"\x42\xa2\x9c\x01" + nested_groups(10001),
        Packet(payload=Drain()),
    ),
]


@pytest.mark.parametrize(("wire", "packet"), [c[1:] for c in DECODE], ids=[c[0] for c in DECODE])
def test_decode(codec: ModuleType, wire: str | bytes, packet: Packet) -> None:
    assert codec.decode_packet(h(wire)) == packet


# ------------------------------------------------------------------------- errors

TEN_FF = "ff ff ff ff ff ff ff ff ff"  # nine continuation bytes: the 10th comes next
ERRORS: list[tuple[str, str | bytes, type[CodecError]]] = [
    ("tag cut short", "80", TruncatedError),
    ("value missing", "08", TruncatedError),
    ("varint cut short", "08 80", TruncatedError),
    ("varint cut at 9 bytes", f"08 {TEN_FF}", TruncatedError),
    ("length missing", "12", TruncatedError),
    ("length past the end", "12 05 0a 03 74", TruncatedError),
    ("huge length", f"7a {TEN_FF} 01", TruncatedError),
    ("fixed64 cut short", "79 01020304050607", TruncatedError),
    ("fixed32 cut short", "7d 010203", TruncatedError),
    ("group never ended", "7b 08 01", TruncatedError),
    ("length past its payload", "22 02 1a 01 41", TruncatedError),
    ("varint past its payload", "22 01 08 05", TruncatedError),
    ("group past its payload", "22 01 0b 0c", TruncatedError),
    ("11-byte varint", f"08 {TEN_FF} 80 01", VarintError),
    ("10th byte 2", f"08 {TEN_FF} 02", VarintError),
    ("10th byte 7f", f"08 {TEN_FF} 7f", VarintError),
    ("10th byte continues at the end", f"08 {TEN_FF} 80", VarintError),
    ("overflowing tag", f"{TEN_FF} 02", VarintError),
    ("overflowing length", f"12 {TEN_FF} 02", VarintError),
    ("overflow in a payload", f"22 0b 08 {TEN_FF} 02", VarintError),
    ("overflow in a group", f"7b 08 {TEN_FF} 02 7c", VarintError),
    ("field 0", "00 00", TagError),
    ("field 0, bytes", "02 00", TagError),
    ("field 0 in a payload", "22 02 00 00", TagError),
    ("field 0 in a group", "7b 00 00 7c", TagError),
    ("field 2**29", f"{varint(1 << 32)} 00", TagError),
    ("field 2**29 in a payload", f"22 06 {varint(1 << 32)} 00", TagError),
    ("field 2**31 in a group", f"7b {varint(1 << 34)} 00 7c", TagError),
    ("wire type 6", "0e", TagError),
    ("wire type 7", "0f 00", TagError),
    ("wire type 6 on an unknown field", "7e", TagError),
    ("wire type 7 in a payload", "22 01 0f", TagError),
    ("wire type 6 in a group", "7b 0e 7c", TagError),
    ("stray end group", "0c", TagError),
    ("stray end group of a payload field", "24", TagError),
    ("stray end group in a payload", "22 01 0c", TagError),
    ("mismatched end group", "7b 14", TagError),
    ("mismatched nested end group", "7b 0b 7c 0c", TagError),
    ("bad UTF-8 in address", "12 03 12 01 ff", Utf8Error),
    ("bad UTF-8 in protocol", "12 03 0a 01 c3", Utf8Error),
    ("surrogate in dial response error", "1a 05 0a 03 eda080", Utf8Error),
    ("overlong UTF-8 in close response error", "32 04 0a 02 c080", Utf8Error),
    ("beyond U+10FFFF in data error", "22 06 12 04 f4908080", Utf8Error),
    ("bad UTF-8 after a merge", "12 02 18 01 12 03 0a 01 ff", Utf8Error),
    ("flow credit member tag cut short", "a2", TruncatedError),
    ("flow credit length past the end", "a2 06 05 08 01", TruncatedError),
    ("varint past its flow credit", "a2 06 01 08 05", TruncatedError),
    ("overflow in flow credit", f"a2 06 0b 10 {TEN_FF} 02", VarintError),
    ("field 0 in flow credit", "a2 06 02 00 00", TagError),
    ("wire type 7 in flow credit", "a2 06 01 0f", TagError),
    ("stray end group of the flow credit member", "a4 06", TagError),
    ("group never ended in flow credit", "a2 06 02 0b 08", TruncatedError),
    ("bad tag in flow credit after a merge", "a2 06 02 08 05 a2 06 01 0e", TagError),
    ("groups past Go's limit", nested_groups(10002), NestingError),
    (
        "groups past Go's limit in a payload",
        b"\x12\xa4\x9c\x01" + nested_groups(10002),
        NestingError,
    ),
    # The first problem met, left to right, decides.
    ("bad tag before a truncation", "0e 08", TagError),
    ("bad UTF-8 before a bad tag", "12 03 12 01 ff 0e", Utf8Error),
    ("truncation inside before a bad tag after", "22 01 08 0e", TruncatedError),
    ("bad tag inside before a truncation after", "22 01 0e 08", TagError),
    ("overflow before bad UTF-8", f"08 {TEN_FF} 02 12 03 12 01 ff", VarintError),
    ("nesting before a mismatched end", b"\x0b" * 10002 + b"\x14", NestingError),
    ("field 0 where nesting would fail", b"\x0b" * 10001 + b"\x03" + b"\x0c" * 10001, TagError),
    ("truncation where nesting would fail", b"\x0b" * 10001 + b"\x83", TruncatedError),
]


@pytest.mark.parametrize(("wire", "error"), [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_decode_error(codec: ModuleType, wire: str | bytes, error: type[CodecError]) -> None:
    buf = h(wire)
    with pytest.raises(error) as info:
        codec.decode_packet(buf)
    assert type(info.value) is error
    with pytest.raises(error):
        codec.peek_packet(buf)
    with pytest.raises(error):
        codec.peek_data(buf)


@pytest.mark.parametrize(
    "wire", [c[1] for c in DECODE + ERRORS], ids=[c[0] for c in DECODE + ERRORS]
)
def test_cases_agree_with_official(codec: ModuleType, wire: str | bytes) -> None:
    """Every decode and error case is upb's verdict too, but for a known upb-vs-Go divergence
    present in the input (``oracle.upb_divergences``)."""
    buf = h(wire)
    assert against_official(buf, outcome(codec.decode_packet, buf)) is None


def test_limits(codec: ModuleType) -> None:
    assert codec.DEFAULT_MAX_RECEIVE_MESSAGE_SIZE == 4 * 1024 * 1024
    assert codec.MAX_GROUP_NESTING == 10000


def test_known_divergences_from_upb(codec: ModuleType) -> None:
    """Where upb (the official Python runtime) and protobuf-go differ, we decode like Go."""
    official = pb2().Packet()
    tenth_byte_2 = h(f"08 {TEN_FF} 02")
    official.ParseFromString(tenth_byte_2)  # upb drops the bits past 64 ...
    assert from_official(official) == Packet(-1)
    with pytest.raises(VarintError):  # ... Go reports an overflow
        codec.decode_packet(tenth_byte_2)
    for field_0 in (h("7b 00 00 7c"), h("42 04 78 01 00 00")):  # in a group, in Drain
        official.ParseFromString(field_0)  # upb lets field number 0 pass here ...
        with pytest.raises(TagError):  # ... Go rejects it everywhere
            codec.decode_packet(field_0)
    for accepted_by_go, packet in (
        (h("88 80 80 80 80 80 80 80 80 00 04"), Packet(4)),  # a 10-byte tag
        (h("0a 80 80 80 80 80 00 08 04"), Packet(4)),  # a 6-byte length
        (h(f"0b {varint(1 << 32)} 00 0c 08 04"), Packet(4)),  # field 2**29 inside a group
        (nested_groups(101), Packet()),
    ):
        with pytest.raises(DecodeError):
            pb2().Packet().ParseFromString(accepted_by_go)
        assert codec.decode_packet(accepted_by_go) == packet


# ------------------------------------------------------------------------ encode errors


def test_encode_range_errors(codec: ModuleType) -> None:
    for packet in (
        Packet(1 << 31),
        Packet(-(1 << 31) - 1),
        Packet(T.DATA, Data(1 << 63)),
        Packet(T.DATA, Data(INT64_MIN - 1)),
        Packet(T.DIAL_REQ, DialRequest(random=1 << 64)),
        Packet(T.DIAL_RSP, DialResponse(random=1 << 63)),
        Packet(T.DIAL_RSP, DialResponse(connect_id=1 << 63)),
        Packet(T.CLOSE_REQ, CloseRequest(1 << 63)),
        Packet(T.CLOSE_RSP, CloseResponse(connect_id=1 << 63)),
        Packet(T.DIAL_CLS, CloseDial(1 << 63)),
        Packet(T.FLOW_CREDIT, FlowCredit(1 << 63)),
        Packet(T.FLOW_CREDIT, FlowCredit(INT64_MIN - 1)),
        Packet(T.FLOW_CREDIT, FlowCredit(1, 1 << 63)),
        Packet(T.FLOW_CREDIT, FlowCredit(bytes=INT64_MIN - 1)),
        Packet(T.DATA, FlowCredit(bytes=1 << 64)),
    ):
        with pytest.raises(ValueError) as info:
            codec.encode_packet(packet)
        assert not isinstance(info.value, CodecError), packet


def test_encode_type_errors(codec: ModuleType) -> None:
    for packet in (
        Packet(T.FLOW_CREDIT, FlowCredit("1")),  # type: ignore[arg-type]
        Packet(T.FLOW_CREDIT, FlowCredit(1, 1.5)),  # type: ignore[arg-type]
        Packet(T.FLOW_CREDIT, FlowCredit(bytes=b"1")),  # type: ignore[arg-type]
    ):
        with pytest.raises(TypeError):
            codec.encode_packet(packet)


def test_encode_lone_surrogate(codec: ModuleType) -> None:
    for packet in (
        Packet(T.DIAL_REQ, DialRequest(address="\ud800")),
        Packet(T.DIAL_REQ, DialRequest(protocol="a\udfff")),
        Packet(T.DIAL_RSP, DialResponse(error="\udc00")),
        Packet(T.CLOSE_RSP, CloseResponse(error="\ud800")),
        Packet(T.DATA, Data(error="\ud800")),
    ):
        with pytest.raises(Utf8Error):
            codec.encode_packet(packet)


# ------------------------------------------------------------------------ peeks

PEEK: list[tuple[str, int, int]] = [
    ("", 0, 0),
    ("08 04", 4, 0),
    ("08 04 22 02 08 07", 4, 7),
    ("08 01 1a 02 10 07", 1, 7),
    ("08 02 2a 02 08 07", 2, 7),
    ("08 03 32 02 10 07", 3, 7),
    ("08 05 3a 02 08 07", 5, 0),  # CloseDial carries a random, not a connectID
    ("12 02 18 07", 0, 0),
    ("08 06 42 00", 6, 0),
    ("08 04 2a 02 08 07", 4, 7),  # the payload's ID, whatever the type
    ("08 ff ff ff ff ff ff ff ff ff 01 22 0b 08 ff ff ff ff ff ff ff ff ff 01", -1, -1),
    ("22 02 08 05 2a 02 08 07 22 00", 0, 0),
    ("08 64 a2 06 04 08 07 10 05", 100, 7),  # FlowCredit's connectID (field 1)
    ("08 64 a2 06 02 10 05", 100, 0),  # ... absent: 0; bytes (field 2) is not an ID
    ("08 64 a2 06 0b 08 ff ff ff ff ff ff ff ff ff 01", 100, -1),
    ("08 04 a2 06 02 08 07", 4, 7),  # under another type, as for CloseRequest above
    ("a2 06 02 08 05 a2 06 02 10 09", 0, 5),  # merged: the ID of the first occurrence
    ("a2 06 02 08 05 22 02 08 07", 0, 7),  # replaced by Data
    ("22 02 08 07 a2 06 00", 0, 0),  # Data replaced by an empty FlowCredit
    ("08 64 a0 06 07", 100, 0),  # member 100 with the wrong wire type: unknown
]


@pytest.mark.parametrize(("wire", "ptype", "connect_id"), PEEK)
def test_peek_packet(codec: ModuleType, wire: str, ptype: int, connect_id: int) -> None:
    assert codec.peek_packet(h(wire)) == (ptype, connect_id)


PEEK_DATA: list[tuple[str, tuple[int, bytes] | None]] = [
    ("08 04 22 09 08 07 1a 05 68656c6c6f", (7, b"hello")),
    ("22 09 08 07 1a 05 68656c6c6f 08 04", (7, b"hello")),
    ("08 04 22 02 08 07", (7, b"")),
    ("08 04 22 00", (0, b"")),
    ("08 04 22 03 1a 01 41 22 03 1a 01 42", (0, b"B")),  # the last data field wins
    ("08 04 22 03 1a 01 41 22 02 08 05", (5, b"A")),  # merged: data from the first
    ("08 04 22 03 1a 01 41 2a 00 22 02 08 05", (5, b"")),  # replaced, then fresh
    ("08 04 22 05 1a 01 41 78 00", (0, b"A")),
    ("08 04", None),
    ("08 04 2a 02 08 07", None),
    ("08 02 22 02 08 07", None),  # a Data payload without the DATA type
    ("22 02 08 07", None),
    ("08 04 22 02 08 07 08 05", None),  # the last type wins
    ("08 84 80 80 80 10 22 02 08 07", (7, b"")),  # type 2**32+4 is DATA
    ("08 04 a2 06 02 08 07", None),  # a FlowCredit payload under the DATA type
    ("08 04 22 03 1a 01 41 a2 06 02 08 05", None),  # Data replaced by FlowCredit
    ("08 04 a2 06 02 08 05 22 03 1a 01 41", (0, b"A")),  # FlowCredit replaced: fresh Data
    ("08 64 22 02 08 07", None),  # a Data payload under FLOW_CREDIT
]


@pytest.mark.parametrize(("wire", "expected"), PEEK_DATA)
def test_peek_data(codec: ModuleType, wire: str, expected: tuple[int, bytes] | None) -> None:
    got = codec.peek_data(h(wire))
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert isinstance(got[1], memoryview)
        assert (got[0], bytes(got[1])) == expected


def test_peek_data_shares_memory(codec: ModuleType) -> None:
    wire = h("08 04 22 09 08 07 1a 05 68656c6c6f")
    buf = bytearray(b"xx" + wire)
    got = codec.peek_data(memoryview(buf)[2:])
    assert got is not None
    connect_id, view = got
    assert connect_id == 7
    assert view.obj is buf
    buf[-5] = ord("j")  # a write to the input shows through the view: no copy was made
    assert bytes(view) == b"jello"
    frozen = bytes(wire)
    got = codec.peek_data(frozen)
    assert got is not None
    assert got[1].obj is frozen
    assert got[1].readonly


# ------------------------------------------------------------------------ values


def test_payload_tables_match_the_proto() -> None:
    """packets.py's member and type tables are the .proto's, flow.v1's FlowCredit included."""
    descriptor = pb2().Packet.DESCRIPTOR
    members = {f.number: f for f in descriptor.oneofs_by_name["payload"].fields}
    assert set(members) == set(PAYLOAD_FIELDS) == {2, 3, 4, 5, 6, 7, 8, 100}
    for number, cls in PAYLOAD_FIELDS.items():
        assert members[number].message_type.name == cls.__name__
        assert PAYLOAD_FIELD_OF[cls] == number
    enum = pb2().PacketType.DESCRIPTOR.values_by_number
    assert {n: v.name for n, v in enum.items()} == {t.value: t.name for t in PacketType}
    assert T.FLOW_CREDIT == 100 and PAYLOAD_OF_TYPE[T.FLOW_CREDIT] is FlowCredit
    credit = pb2().FlowCredit.DESCRIPTOR.fields_by_name
    assert {(f.name, f.number, f.type) for f in credit.values()} == {
        ("connectID", 1, credit["connectID"].TYPE_INT64),
        ("bytes", 2, credit["bytes"].TYPE_INT64),
    }
    assert Packet(T.FLOW_CREDIT, FlowCredit(1, 2)).payload_matches_type()
    assert not Packet(T.DATA, FlowCredit(1, 2)).payload_matches_type()
    assert not Packet(T.FLOW_CREDIT, Data(1)).payload_matches_type()
    assert not Packet(T.FLOW_CREDIT).payload_matches_type()
    assert FlowCredit(3, 4) == FlowCredit(connect_id=3, bytes=4) != FlowCredit(4, 3)


# ------------------------------------------------------------------------ framing helpers


@pytest.mark.parametrize(
    ("connect_id", "length", "wire"),
    [
        (7, 5, "00 0000000d 08 04 22 09 08 07 1a 05"),
        (0, 0, "00 00000004 08 04 22 00"),
        (0, 1, "00 00000007 08 04 22 03 1a 01"),
        (1, 0, "00 00000006 08 04 22 02 08 01"),
        (-1, 0, "00 0000000f 08 04 22 0b 08 ff ff ff ff ff ff ff ff ff 01"),
        (300, 200, "00 000000d3 08 04 22 ce 01 08 ac 02 1a c8 01"),
    ],
)
def test_data_header(codec: ModuleType, connect_id: int, length: int, wire: str) -> None:
    header = codec.data_header(connect_id, length)
    assert header == h(wire)
    payload = bytes(i % 256 for i in range(length))
    framed = codec.frame_message(
        codec.encode_packet(Packet(T.DATA, Data(connect_id, data=payload)))
    )
    assert header + payload == framed


def test_data_header_errors(codec: ModuleType) -> None:
    for connect_id, length in ((1 << 63, 1), (INT64_MIN - 1, 1), (1, -1), (1, 1 << 32)):
        with pytest.raises(ValueError):
            codec.data_header(connect_id, length)


def test_message_prefix(codec: ModuleType) -> None:
    assert codec.message_prefix(0) == h("00 00000000")
    assert codec.message_prefix(0x01020304) == h("00 01020304")
    assert codec.message_prefix((1 << 32) - 1) == h("00 ffffffff")
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            codec.message_prefix(bad)


def test_frame_message(codec: ModuleType) -> None:
    assert codec.frame_message(b"") == h("00 00000000")
    assert codec.frame_message(b"abc") == h("00 00000003 616263")
    assert codec.frame_message(bytearray(b"abc")) == h("00 00000003 616263")
    assert codec.frame_message(memoryview(b"xabcx")[1:4]) == h("00 00000003 616263")
    assert type(codec.frame_message(b"a")) is bytes
