"""Golden wire fixtures (tests/data/wire/, see its README): Packet bytes marshalled by
upstream's generated Go code (konnectivity-client v0.36.0), decoded by both codec twins
into the packets the generator built, and re-encoded byte-exact; the gRPC-framed stream
of all of them read back through each twin's MessageReader, whole and byte by byte.
And the messages captured between konnectivity-client and upstream's proxy-server
(tests/data/wire/captured/): split, decoded, re-encoded byte-exact, and checked for the
exchange they must be (dial, data both ways, close; a refused dial with its text).

The expected packets are written here from the generator's field values, not derived from
the bytes, so a codec that misreads a field fails.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest

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
)
from tests.support.oracle import from_official, official_encode, pb2

WIRE = Path(__file__).resolve().parents[1] / "data" / "wire"
T = PacketType
RANDOM = 8674665223082153551
PAYLOAD = bytes((i * 7) & 0xFF for i in range(300))

EXPECTED: dict[str, Packet] = {
    "dial_req": Packet(T.DIAL_REQ, DialRequest("tcp", "10.96.0.1:443", RANDOM)),
    "dial_req_ipv6": Packet(T.DIAL_REQ, DialRequest("tcp", "[fd00::1]:10250", 1)),
    "dial_rsp": Packet(T.DIAL_RSP, DialResponse("", 1, RANDOM)),
    "dial_rsp_error": Packet(
        T.DIAL_RSP,
        DialResponse("dial tcp 127.0.0.1:1: connect: connection refused", 0, -5),
    ),
    "close_req": Packet(T.CLOSE_REQ, CloseRequest(42)),
    "close_rsp": Packet(T.CLOSE_RSP, CloseResponse("", 42)),
    "close_rsp_error": Packet(T.CLOSE_RSP, CloseResponse("connection not found", 1 << 40)),
    "data": Packet(T.DATA, Data(3, data=PAYLOAD)),
    "data_error": Packet(T.DATA, Data(3, error="EOF")),
    "data_empty": Packet(T.DATA, Data(3)),
    "dial_cls": Packet(T.DIAL_CLS, CloseDial(-RANDOM)),
    "drain": Packet(T.DRAIN, Drain()),
}


def fixture(name: str) -> bytes:
    return (WIRE / f"{name}.bin").read_bytes()


def test_every_fixture_is_expected() -> None:
    """No fixture file without an expectation here, and none missing."""
    assert sorted(p.stem for p in WIRE.glob("*.bin")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_decode(codec: ModuleType, name: str) -> None:
    assert codec.decode_packet(fixture(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_encode_byte_exact(codec: ModuleType, name: str) -> None:
    assert codec.encode_packet(EXPECTED[name]).hex() == fixture(name).hex()
    assert codec.encode_packet(codec.decode_packet(fixture(name))) == fixture(name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_official_runtime_agrees(name: str) -> None:
    """The third reading: Python's official protobuf runtime on our .proto text."""
    assert from_official(pb2().Packet.FromString(fixture(name))) == EXPECTED[name]
    assert official_encode(EXPECTED[name]) == fixture(name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_peek(codec: ModuleType, name: str) -> None:
    """peek_packet gives the type and (for DATA) the connectID without a full decode."""
    ptype, connect_id = codec.peek_packet(fixture(name))
    packet = EXPECTED[name]
    assert ptype == packet.type
    if packet.type == T.DATA:
        assert connect_id == 3
        peeked = codec.peek_data(fixture(name))
        if name == "data":
            assert peeked is not None
            assert (peeked[0], bytes(peeked[1])) == (3, PAYLOAD)


def stream_order() -> list[str]:
    return (WIRE / "stream.order").read_text().split()


def test_stream_whole(codec: ModuleType) -> None:
    messages = codec.MessageReader().feed((WIRE / "stream.grpc").read_bytes())
    assert [codec.decode_packet(m) for m in messages] == [EXPECTED[n] for n in stream_order()]


def test_stream_byte_by_byte(codec: ModuleType) -> None:
    reader = codec.MessageReader()
    messages: list[bytes] = []
    for byte in (WIRE / "stream.grpc").read_bytes():
        messages += reader.feed(bytes([byte]))
    assert [bytes(m) for m in messages] == [fixture(n) for n in stream_order()]
    assert reader.pending == 0


def test_stream_framing_byte_exact(codec: ModuleType) -> None:
    framed = b"".join(codec.frame_message(codec.encode_packet(EXPECTED[n])) for n in stream_order())
    assert framed == (WIRE / "stream.grpc").read_bytes()


# -- captured from the real programs -----------------------------------------------------

CAPTURED = WIRE / "captured"
ECHO_SIZE = 32  # tests/interop/capture.py


def goclient_pattern(index: int, round_: int, size: int) -> bytes:
    """goclient's payload (tests/interop/goclient/main.go, ``pattern``)."""
    seed = f"c{index}-r{round_}:".encode()
    return bytes(seed[i % len(seed)] ^ ((i // len(seed)) & 0xFF) for i in range(size))


def captured(codec: ModuleType, name: str) -> list[Packet]:
    """The packets of one captured direction; each message re-encodes byte-exact."""
    messages = [bytes(m) for m in codec.MessageReader().feed((CAPTURED / name).read_bytes())]
    packets = [codec.decode_packet(m) for m in messages]
    assert [codec.encode_packet(p) for p in packets] == messages
    return packets


def test_captured_echo(codec: ModuleType) -> None:
    dial, data, close = captured(codec, "echo.client.grpc")
    answer, echoed, closed = captured(codec, "echo.server.grpc")
    assert [p.type for p in (dial, data, close)] == [T.DIAL_REQ, T.DATA, T.CLOSE_REQ]
    assert [p.type for p in (answer, echoed, closed)] == [T.DIAL_RSP, T.DATA, T.CLOSE_RSP]
    assert dial.payload.protocol == "tcp"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", dial.payload.address)
    assert answer.payload.random == dial.payload.random
    assert answer.payload.error == ""
    connect_id = answer.payload.connect_id
    assert connect_id > 0
    payload = goclient_pattern(0, 0, ECHO_SIZE)
    assert data.payload == Data(connect_id, data=payload)
    assert echoed.payload == Data(connect_id, data=payload)
    assert close.payload == CloseRequest(connect_id)
    assert closed.payload == CloseResponse("", connect_id)


def test_captured_refused(codec: ModuleType) -> None:
    (dial,) = captured(codec, "refused.client.grpc")
    (answer,) = captured(codec, "refused.server.grpc")
    assert (dial.type, answer.type) == (T.DIAL_REQ, T.DIAL_RSP)
    assert answer.payload.random == dial.payload.random
    assert answer.payload.connect_id == 0
    port = dial.payload.address.rpartition(":")[2]
    assert answer.payload.error == f"dial tcp 127.0.0.1:{port}: connect: connection refused"
