"""Properties of the Packet codec on both twins, with the official protobuf runtime and the
pure twin as oracles.

- Random packets encode to exactly the official runtime's deterministic bytes, and decode
  back to themselves.
- Any input (random bytes, randomly assembled wire fields, mutations of valid encodings)
  gives the twin under test the same outcome as the pure twin (the same Packet, or the same
  CodecError subclass), and the pure twin agrees with upb except where a known upb-vs-Go
  divergence is present in the input (``oracle.upb_divergences``).
- ``peek_packet`` and ``peek_data`` agree with ``decode_packet`` on every input.
- ``data_header(c, len(p)) + p`` is the official framed DATA message.
"""

from __future__ import annotations

from types import ModuleType

from hypothesis import example, given
from hypothesis import strategies as st

import konnectivity_fast.wire._codec as pure
from konnectivity_fast.wire.errors import VarintError
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
from tests.support.oracle import (
    Outcome,
    against_official,
    from_official,
    official_encode,
    official_outcome,
    outcome,
    pb2,
    peek_problem,
)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1

# ------------------------------------------------------------------------ packets

int64s = st.one_of(
    st.sampled_from([0, 1, -1, 127, 128, INT64_MAX, INT64_MIN, 1 << 31, -(1 << 32)]),
    st.integers(INT64_MIN, INT64_MAX),
)
enums = st.one_of(
    st.sampled_from(list(PacketType)),
    st.sampled_from([INT32_MIN, INT32_MAX, -1, 7, 99, 101, 1000]),
    st.integers(INT32_MIN, INT32_MAX),
)
texts = st.one_of(st.just(""), st.text(), st.sampled_from(["tcp", "10.0.0.1:443"]))
binaries = st.one_of(st.binary(max_size=300), st.integers(0, 1 << 17).map(bytes))
payloads = st.one_of(
    st.none(),
    st.builds(DialRequest, texts, texts, int64s),
    st.builds(DialResponse, texts, int64s, int64s),
    st.builds(Data, int64s, texts, binaries),
    st.builds(CloseRequest, int64s),
    st.builds(CloseResponse, texts, int64s),
    st.builds(CloseDial, int64s),
    st.just(Drain()),
    st.builds(FlowCredit, int64s, int64s),
)
packets = st.builds(Packet, enums, payloads)


@given(packet=packets)
def test_encode_matches_official(codec: ModuleType, packet: Packet) -> None:
    wire = codec.encode_packet(packet)
    assert wire == official_encode(packet)
    assert codec.decode_packet(wire) == packet
    official = pb2().Packet()
    official.ParseFromString(wire)
    assert from_official(official) == packet


big64 = st.integers(max_value=INT64_MIN - 1) | st.integers(INT64_MAX + 1)


@given(
    packet=st.one_of(
        st.builds(Packet, st.integers(max_value=INT32_MIN - 1) | st.integers(INT32_MAX + 1)),
        st.builds(Packet, enums, st.builds(Data, big64)),
        st.builds(Packet, enums, st.builds(DialRequest, random=big64)),
        st.builds(Packet, enums, st.builds(DialResponse, connect_id=big64)),
        st.builds(Packet, enums, st.builds(DialResponse, random=big64)),
        st.builds(Packet, enums, st.builds(CloseRequest, big64)),
        st.builds(Packet, enums, st.builds(CloseResponse, connect_id=big64)),
        st.builds(Packet, enums, st.builds(CloseDial, big64)),
        st.builds(Packet, enums, st.builds(FlowCredit, big64)),
        st.builds(Packet, enums, st.builds(FlowCredit, int64s, big64)),
    )
)
def test_encode_rejects_out_of_range(codec: ModuleType, packet: Packet) -> None:
    try:
        codec.encode_packet(packet)
    except ValueError as exc:
        assert type(exc) is ValueError
        return
    raise AssertionError(f"{packet} was encoded")


# ------------------------------------------------------------------------ wire inputs


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


VALUE_STYLES = ["minimal"] * 12 + ["overlong", "ten", "ten-bad"]
TAG_STYLES = ["minimal"] * 20 + ["overlong", "ten"]


@st.composite
def varints(draw: st.DrawFn, value: int | None = None, styles: list[str] = VALUE_STYLES) -> bytes:
    """A varint encoding of ``value`` (or of a random uint64): minimal, overlong, or at
    the 10-byte limit (sometimes with a last byte only upb accepts)."""
    if value is None:
        value = draw(st.integers(0, (1 << 64) - 1) | st.sampled_from([0, 1, 4, (1 << 64) - 1]))
    raw = varint(value)
    style = draw(st.sampled_from(styles))
    if style == "overlong" and len(raw) < 10:
        pad = draw(st.integers(1, 10 - len(raw)))
        return raw[:-1] + bytes([raw[-1] | 0x80]) + b"\x80" * (pad - 1) + b"\x00"
    if style.startswith("ten"):
        low = bytes(b | 0x80 for b in (raw + b"\x00" * 9)[:9])
        last = value >> 63 if style == "ten" else draw(st.integers(2, 0x7F))
        return low + bytes([last])
    return raw


def tag(draw: st.DrawFn, field: int, wire: int) -> bytes:
    return draw(varints(field << 3 | wire, TAG_STYLES))


@st.composite
def field_values(draw: st.DrawFn, field: int, wire: int, depth: int = 0) -> bytes:
    """One field (tag and value) of ``field`` with wire type ``wire``; groups hold more."""
    if wire == 0:
        return tag(draw, field, 0) + draw(varints())
    if wire in (1, 5):
        return tag(draw, field, wire) + draw(
            st.binary(min_size=8 if wire == 1 else 4, max_size=8 if wire == 1 else 4)
        )
    if wire == 2:
        body = draw(st.text(max_size=8).map(str.encode) | st.binary(max_size=8))
        return tag(draw, field, 2) + draw(varints(len(body), TAG_STYLES)) + body
    inner = b""
    if depth < 3:
        for inner_field, inner_wire in draw(
            st.lists(st.tuples(st.integers(1, 40), st.sampled_from([0, 1, 2, 3, 5])), max_size=3)
        ):
            inner += draw(field_values(inner_field, inner_wire, depth + 1))
    return tag(draw, field, 3) + inner + tag(draw, field, 4)


#: Field numbers of the payload messages (by member number), with the wire type each expects.
_SUB_FIELDS = {2: {1: 2, 2: 2, 3: 0}, 3: {1: 2, 2: 0, 3: 0}, 4: {1: 0, 2: 2, 3: 2},
               5: {1: 0}, 6: {1: 2, 2: 0}, 7: {1: 0}, 8: {},
               100: {1: 0, 2: 0}}  # fmt: skip


@st.composite
def sub_messages(draw: st.DrawFn, member: int) -> bytes:
    known = _SUB_FIELDS[member]
    body = b""
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.sampled_from([1, 2, 3, 3, 9, 100]))
        right = known.get(field)
        wrong = draw(st.sampled_from([0, 1, 2, 3, 5]))
        wire = right if right is not None and draw(st.integers(0, 4)) else wrong
        body += draw(field_values(field, wire))
    return body


@st.composite
def assembled(draw: st.DrawFn) -> bytes:
    """A Packet assembled field by field: types (any varint form), payload members (often
    repeated: merges and replacements), known numbers with wrong wire types, unknowns."""
    out = b""
    for _ in range(draw(st.integers(0, 5))):
        field = draw(
            st.sampled_from([1, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 9, 16, 19000, 99, 100, 100, 101])
        )
        if field == 1 and draw(st.integers(0, 4)):
            out += tag(draw, 1, 0) + draw(varints())
        elif field in _SUB_FIELDS and draw(st.integers(0, 6)):
            body = draw(sub_messages(field))
            out += tag(draw, field, 2) + draw(varints(len(body), TAG_STYLES)) + body
        else:
            out += draw(field_values(field, draw(st.sampled_from([0, 1, 2, 3, 5]))))
    return out


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoding (official or assembled), then bit flips, truncations, insertions,
    deletions, appended unknown fields and appended whole packets."""
    buf = bytearray(draw(packets.map(official_encode) | assembled()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "unknown", "append"]))
        if kind == "flip" and buf:
            buf[draw(st.integers(0, len(buf) - 1))] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[draw(st.integers(0, len(buf))) :]
        elif kind == "insert":
            at = draw(st.integers(0, len(buf)))
            buf[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and buf:
            at = draw(st.integers(0, len(buf) - 1))
            del buf[at : at + draw(st.integers(1, 4))]
        elif kind == "unknown":
            wire = draw(st.sampled_from([0, 1, 2, 3, 5]))
            buf += draw(field_values(draw(st.integers(9, 1 << 20)), wire))
        else:
            buf += draw(packets.map(official_encode) | assembled())
    return bytes(buf)


def check_input(codec: ModuleType, data: bytes) -> Outcome:
    """The twin under test agrees with the pure twin, the pure twin with upb (modulo known
    divergences), and the peeks with the decode. Returns the outcome."""
    expected = outcome(pure.decode_packet, data)
    got = outcome(codec.decode_packet, data)
    assert got == expected, data.hex()
    problem = against_official(data, expected)
    assert problem is None, problem
    problem = peek_problem(codec, data, expected)
    assert problem is None, problem
    return expected


@given(data=st.binary(max_size=64))
@example(data=bytes.fromhex("08ffffffffffffffffff02"))  # upb accepts, Go rejects
@example(data=bytes.fromhex("0b8080808010000c"))  # Go accepts, upb rejects
def test_random_bytes(codec: ModuleType, data: bytes) -> None:
    check_input(codec, data)


@given(data=assembled())
def test_assembled_fields(codec: ModuleType, data: bytes) -> None:
    check_input(codec, data)


@given(data=mutated())
def test_mutations(codec: ModuleType, data: bytes) -> None:
    check_input(codec, data)


@given(first=packets, second=packets)
def test_concatenation_merges_like_official(
    codec: ModuleType, first: Packet, second: Packet
) -> None:
    """Two encodings in a row parse as one message, merged: the same as upb's merge."""
    data = official_encode(first) + official_encode(second)
    got = check_input(codec, data)
    assert got == official_outcome(data)


@given(prefix=st.binary(min_size=9, max_size=9).map(lambda b: bytes(x | 0x80 for x in b)),
       last=st.integers(2, 0x7F))  # fmt: skip
def test_tenth_varint_byte_divergence(codec: ModuleType, prefix: bytes, last: int) -> None:
    """The one divergence on values: upb accepts a 10th varint byte above 1 (dropping the
    bits past 64); Go, and we, reject it."""
    data = b"\x08" + prefix + bytes([last])
    assert official_outcome(data)[0] == "ok"
    assert outcome(codec.decode_packet, data) == ("error", VarintError)


# ------------------------------------------------------------------------ DATA fast path


@given(
    connect_id=int64s,
    payload=binaries,
    trailing=st.lists(st.tuples(st.integers(9, 1 << 20), st.integers(0, (1 << 64) - 1))),
)
def test_data_header(
    codec: ModuleType, connect_id: int, payload: bytes, trailing: list[tuple[int, int]]
) -> None:
    """The header written before a payload read from a socket is the start of the official
    encoding; a peek finds the payload again past unknown fields appended after it."""
    message = official_encode(Packet(PacketType.DATA, Data(connect_id, data=payload)))
    framed = b"\x00" + len(message).to_bytes(4, "big") + message
    assert codec.data_header(connect_id, len(payload)) + payload == framed
    assert codec.frame_message(message) == framed
    extended = message + b"".join(varint(field << 3) + varint(value) for field, value in trailing)
    peeked = codec.peek_data(extended)
    assert peeked is not None
    assert peeked[0] == connect_id
    assert bytes(peeked[1]) == payload
