"""Micro-benchmarks of the Packet codec and gRPC framing: the compiled twin against the pure
twin and the official protobuf runtime (upb).

Run with ``make bench-micro`` (``pytest bench/micro --benchmark-only``). Every case first
asserts that all implementations produce the same result for its input, then times one;
without ``--benchmark-only`` each body runs once, as a correctness test.

What is timed, per implementation:

- decode: bytes -> every field as a Python value (ours: ``decode_packet``; upb:
  ``FromString`` and reading type, connectID, error and data);
- encode: a built packet -> bytes (ours: ``encode_packet`` of the dataclass; upb:
  ``SerializeToString`` of a built message);
- peek_data: bytes -> (connectID, payload) of a DATA packet (ours: a view, no copy; upb has
  no peek, so it is a full parse);
- data_header: (connectID, payload) -> the framed message (ours: the header only, the payload
  is sent after it untouched; upb: build, serialize and prefix the whole message);
- feed: a 64 x 1 KiB batch of framed messages -> the list of bodies (``MessageReader``; upb
  has no framing, so only the twins).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from konnectivity_fast.wire.packets import Data, Packet, PacketType

SIZES = {"1KiB": 1 << 10, "32KiB": 32 << 10}
IMPLS = ("compiled", "pure", "upb")
CONNECT_ID = 12345  # a two-byte varint, as real connection IDs are
BATCH = 64  # messages per MessageReader.feed


def payload_of(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def run(
    benchmark: Any,
    *,
    group: str,
    impl: str,
    calls: dict[str, Callable[[], Any]],
    normalize: Callable[[str, Any], Any],
    expected: Any,
) -> None:
    """Check every implementation's result against ``expected``, then time ``impl``'s."""
    for name, call in calls.items():
        assert normalize(name, call()) == expected, f"{name} disagrees in {group}"
    benchmark.group = group
    result = benchmark(calls[impl])
    assert normalize(impl, result) == expected


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_decode(
    benchmark: Any,
    impl: str,
    size: str,
    impls: SimpleNamespace,
) -> None:
    compiled, pure, upb = impls.compiled, impls.pure, impls.upb
    expected = Packet(PacketType.DATA, Data(CONNECT_ID, "", payload_of(SIZES[size])))
    wire = compiled.encode_packet(expected)

    def official() -> tuple[int, int, str, bytes]:
        message = upb.Packet.FromString(wire)
        data = message.data
        return message.type, data.connectID, data.error, data.data

    def normalize(name: str, got: Any) -> Packet:
        return got if name != "upb" else Packet(got[0], Data(got[1], got[2], got[3]))

    calls = {
        "compiled": lambda: compiled.decode_packet(wire),
        "pure": lambda: pure.decode_packet(wire),
        "upb": official,
    }
    run(
        benchmark,
        group=f"decode {size}",
        impl=impl,
        calls=calls,
        normalize=normalize,
        expected=expected,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_encode(
    benchmark: Any,
    impl: str,
    size: str,
    impls: SimpleNamespace,
) -> None:
    compiled, pure, upb = impls.compiled, impls.pure, impls.upb
    payload = payload_of(SIZES[size])
    packet = Packet(PacketType.DATA, Data(CONNECT_ID, "", payload))
    message = upb.Packet(type=PacketType.DATA, data=upb.Data(connectID=CONNECT_ID, data=payload))
    expected = message.SerializeToString(deterministic=True)
    calls = {
        "compiled": lambda: compiled.encode_packet(packet),
        "pure": lambda: pure.encode_packet(packet),
        "upb": message.SerializeToString,
    }
    run(
        benchmark,
        group=f"encode {size}",
        impl=impl,
        calls=calls,
        normalize=lambda _, got: got,
        expected=expected,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_peek_data(
    benchmark: Any,
    impl: str,
    size: str,
    impls: SimpleNamespace,
) -> None:
    compiled, pure, upb = impls.compiled, impls.pure, impls.upb
    payload = payload_of(SIZES[size])
    wire = compiled.encode_packet(Packet(PacketType.DATA, Data(CONNECT_ID, "", payload)))

    def official() -> tuple[int, bytes] | None:
        message = upb.Packet.FromString(wire)
        if message.type != PacketType.DATA or message.WhichOneof("payload") != "data":
            return None
        return message.data.connectID, message.data.data

    def normalize(name: str, got: Any) -> tuple[int, bytes]:
        assert name == "upb" or isinstance(got[1], memoryview)
        return got[0], bytes(got[1])

    calls = {
        "compiled": lambda: compiled.peek_data(wire),
        "pure": lambda: pure.peek_data(wire),
        "upb": official,
    }
    run(
        benchmark,
        group=f"peek_data {size}",
        impl=impl,
        calls=calls,
        normalize=normalize,
        expected=(CONNECT_ID, payload),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_data_header(
    benchmark: Any,
    impl: str,
    size: str,
    impls: SimpleNamespace,
) -> None:
    compiled, pure, upb = impls.compiled, impls.pure, impls.upb
    payload = payload_of(SIZES[size])
    length = len(payload)

    def official() -> bytes:
        body = upb.Packet(
            type=PacketType.DATA, data=upb.Data(connectID=CONNECT_ID, data=payload)
        ).SerializeToString()
        return b"\x00" + len(body).to_bytes(4, "big") + body

    def normalize(name: str, got: bytes) -> bytes:
        return got if name == "upb" else got + payload  # ours: the header, sent before p

    expected = compiled.frame_message(
        compiled.encode_packet(Packet(PacketType.DATA, Data(CONNECT_ID, "", payload)))
    )
    calls = {
        "compiled": lambda: compiled.data_header(CONNECT_ID, length),
        "pure": lambda: pure.data_header(CONNECT_ID, length),
        "upb": official,
    }
    run(
        benchmark,
        group=f"data_header {size}",
        impl=impl,
        calls=calls,
        normalize=normalize,
        expected=expected,
    )


@pytest.mark.parametrize("impl", ("compiled", "pure"))
def test_feed(benchmark: Any, impl: str, impls: SimpleNamespace) -> None:
    compiled, pure = impls.compiled, impls.pure
    bodies = [bytes([i]) * 1024 for i in range(BATCH)]
    batch = b"".join(compiled.frame_message(body) for body in bodies)
    readers = {"compiled": compiled.MessageReader(), "pure": pure.MessageReader()}
    calls = {name: (lambda r=reader: r.feed(batch)) for name, reader in readers.items()}
    run(
        benchmark,
        group=f"feed {BATCH} x 1KiB",
        impl=impl,
        calls=calls,
        normalize=lambda _, got: got,
        expected=bodies,
    )
    assert readers[impl].pending == 0
