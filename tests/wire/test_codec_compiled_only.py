"""Tests of the compiled codec twin alone (``konnectivity_fast._wire``, csrc/codec.pxi and
csrc/framing.pxi): what its C-level fast paths make visible from Python.

- ``peek_data`` returns a view into the caller's buffer (no copy), shaped like a slice;
- no call leaves a buffer export behind, on success or on error (a leaked export would make
  the caller's bytearray impossible to resize, and pin its memory);
- the import-time shortcuts (slots filled directly, views narrowed in place) are active, and
  what they build is indistinguishable from the ordinary constructors;
- ``data_header`` is small and does no work proportional to the payload;
- deep unknown groups move the C parser's group stack to the heap and back;
- error texts, which the pure twin words the same way;
- ``MessageReader`` copies each body once and holds no more than the limit allows;
- a hypothesis differential test against the official protobuf runtime that does not
  involve the pure twin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
import tracemalloc
from array import array
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.wire.errors import (
    CodecError,
    CompressedMessageError,
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
)
from tests.support.oracle import against_official, load_twin, official_encode, outcome, pb2

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
#: The largest DATA header: prefix 5, 08 04, 22 + 5-byte length, 08 + 10-byte negative
#: connectID, 1a + 5-byte length (KF_DATA_HEADER_MAX in csrc/framing.pxi).
DATA_HEADER_MAX = 30


@pytest.fixture(scope="module")
def C() -> ModuleType:
    """The compiled twin (the shared tests' ``codec`` fixture runs both twins)."""
    try:
        return load_twin("compiled")
    except ImportError as exc:
        pytest.fail(f"the compiled codec twin is unavailable: {exc}", pytrace=False)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


DATA_WIRE = h("08 04 22 09 08 07 1a 05 68656c6c6f")  # Packet(DATA, Data(7, data=b"hello"))
SAMPLES = [
    Packet(PacketType.DATA, Data(7, "", b"hello")),
    Packet(PacketType.DATA, Data(-1, "é", b"")),
    Packet(PacketType.DIAL_REQ, DialRequest("tcp", "10.0.0.1:443", 42)),
    Packet(PacketType.DIAL_RSP, DialResponse("refused", 9, 42)),
    Packet(PacketType.CLOSE_REQ, CloseRequest(9)),
    Packet(PacketType.CLOSE_RSP, CloseResponse("", 9)),
    Packet(PacketType.DIAL_CLS, CloseDial(42)),
    Packet(PacketType.DRAIN, Drain()),
    Packet(PacketType.FLOW_CREDIT, FlowCredit(9, 1 << 20)),
    Packet(PacketType.FLOW_CREDIT, FlowCredit(INT64_MIN, -1)),
    Packet(PacketType.DATA, FlowCredit()),
    Packet(-5, None),
]


# ------------------------------------------------------------------ import-time shortcuts


def test_import_time_shortcuts_are_active(C: ModuleType) -> None:
    # Both self-checks ran at import; if either failed the module silently takes the slow
    # path, which these assertions turn into a visible failure.
    assert C._kfc_direct_slots() is not None
    assert C._kfc_narrow_works() is True


@pytest.mark.parametrize("packet", SAMPLES, ids=repr)
def test_decoded_values_are_ordinary_dataclasses(C: ModuleType, packet: Packet) -> None:
    got = C.decode_packet(C.encode_packet(packet))
    assert type(got) is Packet
    assert type(got.type) is int
    assert type(got.payload) is type(packet.payload)
    assert got == packet
    assert hash(got) == hash(packet)
    assert repr(got) == repr(Packet(int(packet.type), packet.payload))
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.type = 1  # type: ignore[misc]
    if got.payload is not None:
        assert dataclasses.astuple(got.payload) == dataclasses.astuple(packet.payload)
        for field in dataclasses.fields(got.payload):
            assert getattr(got.payload, field.name) == getattr(packet.payload, field.name)


# ------------------------------------------------------------------------ zero copy


def test_peek_data_view_is_a_narrowed_view(C: ModuleType) -> None:
    for source in (DATA_WIRE, bytearray(DATA_WIRE), memoryview(DATA_WIRE)):
        connect_id, view = C.peek_data(source)
        assert connect_id == 7
        assert type(view) is memoryview
        assert (view.format, view.itemsize, view.ndim, view.shape) == ("B", 1, 1, (5,))
        assert (len(view), view.nbytes, view.c_contiguous) == (5, 5, True)
        assert view.tobytes() == b"hello" and bytes(view[1:3]) == b"el"
        assert view.readonly == (not isinstance(source, bytearray))
        if view.readonly:
            assert hash(view) == hash(b"hello")


def test_peek_data_shares_the_input_memory(C: ModuleType) -> None:
    buf = bytearray(DATA_WIRE)
    _, view = C.peek_data(buf)
    assert view.obj is buf
    buf[-1] = ord("O")  # the view sees writes to the input: it is the same memory
    assert bytes(view) == b"hellO"
    view[0] = ord("J")  # and the other way round
    assert buf.endswith(b"JellO")
    for source in (DATA_WIRE, memoryview(buf)):
        got = C.peek_data(source)
        assert got is not None
        assert got[1].obj is (buf if isinstance(source, memoryview) else source)


def test_peek_data_of_other_buffer_shapes(C: ModuleType) -> None:
    # Offsets are byte offsets whatever the input's own format; a strided view is read from
    # a copy, as bytes(buf) would read it.
    words = array("b", DATA_WIRE)
    for source in (words, memoryview(words), memoryview(bytearray(DATA_WIRE)).cast("c")):
        connect_id, view = C.peek_data(source)
        assert (connect_id, bytes(view), view.format) == (7, b"hello", "B")
    strided = memoryview(bytes(b for byte in DATA_WIRE for b in (byte, 0x3F)))[::2]
    assert C.decode_packet(strided) == SAMPLES[0]
    assert C.peek_packet(strided) == (4, 7)
    connect_id, view = C.peek_data(strided)
    assert (connect_id, bytes(view)) == (7, b"hello")


def _exports_released(buf: bytearray) -> bool:
    try:
        buf.append(0)  # a bytearray with a live buffer export cannot be resized
    except BufferError:
        return False
    buf.pop()
    return True


BAD_WIRE = h("08 04 22 09 08 07 1a 06 68656c6c6f")  # data length runs past the end


@pytest.mark.parametrize(
    "call",
    [
        lambda C, b: C.decode_packet(b),
        lambda C, b: C.peek_packet(b),
        lambda C, b: C.peek_data(b) and None,  # the view is dropped at once
        lambda C, b: C.encode_packet(Packet(PacketType.DATA, Data(1, data=b))),
        lambda C, b: C.encode_packet(Packet(PacketType.DATA, Data(1 << 64, data=b))),
        lambda C, b: C.frame_message(b),
        lambda C, b: C.MessageReader().feed(b),
        lambda C, b: C.MessageReader(1).feed(b"\x00\x00\x00\x00\x05" + b),
    ],
)
@pytest.mark.parametrize("wire", [DATA_WIRE, BAD_WIRE, b""])
def test_no_buffer_export_outlives_a_call(
    C: ModuleType, call: Callable[[ModuleType, Any], object], wire: bytes
) -> None:
    for wrap in (lambda b: b, memoryview):
        buf = bytearray(wire)
        with contextlib.suppress(CodecError, ValueError):
            call(C, wrap(buf))
        assert _exports_released(buf)


# ------------------------------------------------------------------------ data_header


def test_data_header_is_small_and_constant(C: ModuleType) -> None:
    largest = (1 << 32) - 26  # with connectID -1 the framed message is then 2**32 - 1 bytes
    header = C.data_header(-1, largest)
    assert len(header) == DATA_HEADER_MAX
    assert header[:5] == h("00 ffffffff")
    with pytest.raises(ValueError, match="gRPC message length 4294967296 does not fit"):
        C.data_header(-1, largest + 1)
    for connect_id in (0, 1, -1, INT64_MAX, INT64_MIN):
        for length in (0, 1, 127, 128, 1 << 20, largest - 16):
            assert len(C.data_header(connect_id, length)) <= DATA_HEADER_MAX
    # No work in proportion to the payload: a 4 GiB payload's header allocates nothing
    # more than a 1-byte payload's.
    tracemalloc.start()
    try:
        C.data_header(-1, largest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096


# ------------------------------------------------------------------------ groups


def groups(depth: int, field: int = 9) -> bytes:
    start, end = bytes([field << 3 | 3]), bytes([field << 3 | 4])
    return start * depth + end * depth


@pytest.mark.parametrize("depth", [1, 31, 32, 33, 64, 10001])
def test_group_nesting_within_the_limit(C: ModuleType, depth: int) -> None:
    # 32 open groups fit the inline stack; beyond, it moves to the heap (and is freed).
    wire = DATA_WIRE + groups(depth)
    assert C.decode_packet(wire) == SAMPLES[0]
    assert C.peek_packet(wire) == (4, 7)
    assert C.MAX_GROUP_NESTING == 10000


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (groups(10002), NestingError),
        (groups(40)[:-1], TruncatedError),
        (groups(40)[:-20] + bytes([10 << 3 | 4]), TagError),
        (groups(40)[:40] + h("08 ff ff ff ff ff ff ff ff ff 02"), VarintError),
        (groups(40)[:40] + h("0a 05 00"), TruncatedError),
    ],
)
def test_errors_inside_deep_groups(C: ModuleType, wire: bytes, error: type) -> None:
    for decode in (C.decode_packet, C.peek_packet, C.peek_data):
        with pytest.raises(error):
            decode(wire)


# ------------------------------------------------------------------------ error texts


@pytest.mark.parametrize(
    ("wire", "error", "text"),
    [
        ("08", TruncatedError, "varint runs past the end of its message at offset 1"),
        ("08 ff ff ff ff ff ff ff ff ff 02", VarintError, "varint overflows 64 bits at offset 10"),
        ("22 05 08", TruncatedError, "length 5 at offset 2 runs past the end of its message"),
        ("22 03 09 00 00", TruncatedError, "fixed-size value at offset 3 runs past the end"),
        ("00", TagError, "invalid field number 0 before offset 1"),
        ("80 80 80 80 10 00", TagError, "invalid field number 536870912 before offset 5"),
        ("0e", TagError, "wire type 6 does not exist (before offset 1)"),
        ("0c", TagError, "end-group for field 1 without a start, before offset 1"),
        ("4b 54", TagError, "end-group for field 10 closes the group of field 9"),
        ("22 04 12 02 c0 80", Utf8Error, "string field at offset 4 is not valid UTF-8"),
        (groups(10002).hex(), NestingError, "groups nested deeper than 10000"),
    ],
)
def test_error_texts(C: ModuleType, wire: str, error: type, text: str) -> None:
    for decode in (C.decode_packet, C.peek_packet, C.peek_data):
        with pytest.raises(error) as info:
            decode(h(wire))
        assert str(info.value) == text


def test_encode_errors(C: ModuleType) -> None:
    with pytest.raises(ValueError, match="packet type 2147483648 does not fit the int32"):
        C.encode_packet(Packet(INT32_MAX + 1))
    with pytest.raises(ValueError, match="does not fit an int64 field"):
        C.encode_packet(Packet(PacketType.DATA, Data(1 << 63)))
    with pytest.raises(Utf8Error):
        C.encode_packet(Packet(PacketType.DIAL_REQ, DialRequest(address="\udc80")))
    with pytest.raises(TypeError):
        C.encode_packet(Packet(PacketType.DATA, "not a payload"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        C.encode_packet(Packet(PacketType.DATA, Data(data="text")))  # type: ignore[arg-type]
    # Any bytes-like object is accepted as Data.data.
    wire = C.encode_packet(Packet(PacketType.DATA, Data(1, data=array("h", [1, 2]))))
    assert C.decode_packet(wire).payload.data == array("h", [1, 2]).tobytes()


# ------------------------------------------------------------------------ MessageReader


def framed(*bodies: bytes) -> bytes:
    return b"".join(b"\x00" + len(b).to_bytes(4, "big") + b for b in bodies)


def test_reader_every_split(C: ModuleType) -> None:
    bodies = [b"", b"a", b"hello world", bytes(300), b""]
    stream = framed(*bodies)
    for cut in range(len(stream) + 1):
        reader = C.MessageReader()
        got = reader.feed(stream[:cut])
        assert reader.pending == (cut - len(framed(*got)) if cut < len(stream) else 0)
        got += reader.feed(memoryview(stream)[cut:])
        assert got == bodies
        assert all(type(body) is bytes for body in got)
        assert reader.pending == 0


def test_reader_byte_by_byte(C: ModuleType) -> None:
    body = bytes(range(256)) * 16
    reader = C.MessageReader()
    stream = framed(body, b"x")
    got = []
    for i in range(len(stream)):
        got += reader.feed(stream[i : i + 1])
    assert got == [body, b"x"]


def test_reader_limits_and_sticky_errors(C: ModuleType) -> None:
    reader = C.MessageReader(100)
    assert reader.max_message_size == 100
    assert reader.feed(framed(bytes(100))[:55]) == []
    assert reader.pending == 55  # never more than max_message_size + 5
    assert reader.feed(bytes(50)) == [bytes(100)]
    with pytest.raises(MessageTooLargeError) as first:
        reader.feed(b"\x00\x00\x00\x00\x65")
    assert str(first.value) == "grpc: received message larger than max (101 vs. 100)"
    assert reader.pending == 0
    with pytest.raises(MessageTooLargeError) as again:
        reader.feed(framed(b"ok"))
    assert again.value is first.value
    for _ in range(50):  # raised again and again, its traceback does not grow
        with pytest.raises(MessageTooLargeError) as again:
            reader.feed(b"")
    assert len(traceback.extract_tb(again.value.__traceback__)) <= 3
    for flag, error, text in (
        (1, CompressedMessageError, "grpc: compressed flag set with identity or empty encoding"),
        (2, InvalidFlagError, "grpc: received unexpected payload format 2"),
    ):
        reader = C.MessageReader()
        for _ in range(2):
            with pytest.raises(error) as info:
                reader.feed(framed(b"a") + bytes([flag]) + b"\x00\x00\x00\x01")
            assert str(info.value) == text
    with pytest.raises(ValueError):
        C.MessageReader(-1)


def test_reader_copies_each_body_once(C: ModuleType) -> None:
    # A 4 MiB body arriving in 64 KiB chunks: the reader allocates it once at full size and
    # fills it in place, so the peak is about one body, not two (gather, then join).
    size, chunk = 4 << 20, 64 << 10
    stream = framed(bytes(size))
    reader = C.MessageReader()
    view = memoryview(stream)
    tracemalloc.start()
    try:
        got = []
        for start in range(0, len(stream), chunk):
            got += reader.feed(view[start : start + chunk])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(got) == 1 and len(got[0]) == size
    assert peak < size + size // 4


# ------------------------------------------------------- differential vs the official runtime

int64s = st.one_of(
    st.sampled_from([0, 1, -1, INT64_MAX, INT64_MIN]), st.integers(INT64_MIN, INT64_MAX)
)
texts = st.one_of(st.just(""), st.text(max_size=40))
payloads = st.one_of(
    st.none(),
    st.builds(DialRequest, texts, texts, int64s),
    st.builds(DialResponse, texts, int64s, int64s),
    st.builds(Data, int64s, texts, st.binary(max_size=200)),
    st.builds(CloseRequest, int64s),
    st.builds(CloseResponse, texts, int64s),
    st.builds(CloseDial, int64s),
    st.just(Drain()),
    st.builds(FlowCredit, int64s, int64s),
)
packets = st.builds(
    Packet,
    st.one_of(st.sampled_from(list(PacketType)), st.integers(INT32_MIN, INT32_MAX)),
    payloads,
)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


# Well-formed unknown fields (numbers the schema does not use, or known numbers with the
# wrong wire type), to append to a valid packet. 100 is flow.v1's flowCredit member.
unknown_numbers = st.integers(9, 1000).filter(lambda n: n != 100)
unknown_fields = st.lists(
    st.one_of(
        st.tuples(st.integers(9, 1000), st.integers(0, (1 << 64) - 1)).map(
            lambda f: _varint(f[0] << 3) + _varint(f[1])
        ),
        st.tuples(unknown_numbers, st.binary(max_size=20)).map(
            lambda f: _varint(f[0] << 3 | 2) + _varint(len(f[1])) + f[1]
        ),
        st.sampled_from([h("4b 08 01 4c"), h("25 01020304"), h("11 0102030405060708"), h("20 05")]),
    ),
    max_size=4,
).map(b"".join)


@given(packet=packets)
def test_encode_and_decode_match_official(C: ModuleType, packet: Packet) -> None:
    wire = C.encode_packet(packet)
    assert wire == official_encode(packet)
    assert C.decode_packet(wire) == packet
    assert against_official(wire, outcome(C.decode_packet, wire)) is None


def _same(C: ModuleType, call: Callable[[Any], Any], data: bytes) -> Any:
    """call(data) as ("ok", value) or (error class, text)."""
    try:
        return ("ok", call(data))
    except CodecError as exc:
        return (type(exc), str(exc))


def _peek_data_bytes(C: ModuleType, data: bytes) -> tuple[int, bytes] | None:
    got = C.peek_data(data)
    return None if got is None else (got[0], bytes(got[1]))


def _check_one_parser(C: ModuleType, data: bytes) -> None:
    """decode, peek_packet and peek_data run one C parser: they must agree on every input,
    down to the error text, and decode must agree with the official runtime."""
    decoded = _same(C, C.decode_packet, data)
    assert against_official(data, outcome(C.decode_packet, data)) is None
    peeked = _same(C, C.peek_packet, data)
    data_view = _same(C, lambda b: _peek_data_bytes(C, b), data)
    if decoded[0] != "ok":
        assert peeked == decoded and data_view == decoded
        return
    packet = decoded[1]
    payload = packet.payload
    connect_id = getattr(payload, "connect_id", 0)  # 0 for payloads without one, and None
    assert peeked == ("ok", (packet.type, connect_id))
    if packet.type == PacketType.DATA and isinstance(payload, Data):
        assert data_view == ("ok", (payload.connect_id, payload.data))
    else:
        assert data_view == ("ok", None)


@given(data=st.binary(max_size=64))
def test_random_bytes_one_parser(C: ModuleType, data: bytes) -> None:
    _check_one_parser(C, data)


@given(packet=packets, extra=unknown_fields, cut=st.integers(0, 400), flip=st.integers(0, 3200))
def test_mutated_packets_one_parser(
    C: ModuleType, packet: Packet, extra: bytes, cut: int, flip: int
) -> None:
    wire = bytearray(C.encode_packet(packet) + extra)
    if wire and flip < 8 * len(wire):
        wire[flip // 8] ^= 1 << (flip % 8)
    _check_one_parser(C, bytes(wire[: len(wire) - cut % (len(wire) + 1)]))


@given(connect_id=int64s, payload=st.binary(max_size=300), extra=unknown_fields)
def test_fast_path_against_official(
    C: ModuleType, connect_id: int, payload: bytes, extra: bytes
) -> None:
    message = pb2().Packet(
        type=PacketType.DATA, data=pb2().Data(connectID=connect_id, data=payload)
    )
    official = message.SerializeToString(deterministic=True)
    header = C.data_header(connect_id, len(payload))
    assert header + payload == C.frame_message(official)
    got = C.peek_data(official + extra)
    assert got is not None
    assert (got[0], bytes(got[1])) == (connect_id, payload)
    # Unknown fields inside the Data member, after the data, are skipped too.
    inner = pb2().Data(connectID=connect_id, data=payload).SerializeToString() + extra
    wire = h("08 04 22") + _varint(len(inner)) + inner
    got = C.peek_data(wire)
    assert got is not None
    assert (got[0], bytes(got[1])) == (connect_id, payload)
