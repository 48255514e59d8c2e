"""gRPC length-prefixed framing: ``MessageReader`` on both twins.

A reference reassembler written here (the whole stream at once) says what every way of
cutting the same stream into chunks must produce.
"""

from __future__ import annotations

import itertools
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.wire.errors import (
    CompressedMessageError,
    GrpcFramingError,
    InvalidFlagError,
    MessageTooLargeError,
    StatusCode,
)

MIB = 1024 * 1024
LIMIT = 4 * MIB  # grpc-go's default receive limit


def frame(body: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(body).to_bytes(4, "big") + body


def feed_chunks(reader: Any, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out += reader.feed(chunk)
    return out


def reference(stream: bytes, limit: int) -> tuple[list[bytes], int, tuple[type, str] | None]:
    """(messages, bytes left pending, the error and its text or None) for a whole stream."""
    messages: list[bytes] = []
    pos = 0
    while len(stream) - pos >= 5:
        flag, length = stream[pos], int.from_bytes(stream[pos + 1 : pos + 5], "big")
        if length > limit:
            text = f"grpc: received message larger than max ({length} vs. {limit})"
            return messages, 0, (MessageTooLargeError, text)
        if flag == 1:
            text = "grpc: compressed flag set with identity or empty encoding"
            return messages, 0, (CompressedMessageError, text)
        if flag != 0:
            text = f"grpc: received unexpected payload format {flag}"
            return messages, 0, (InvalidFlagError, text)
        if len(stream) - pos - 5 < length:
            break
        messages.append(stream[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return messages, len(stream) - pos, None


SIZES = [0, 1, 1024, 300]


def test_whole_and_byte_by_byte(codec: ModuleType) -> None:
    bodies = [bytes([i]) * size for i, size in enumerate(SIZES)]
    stream = b"".join(frame(b) for b in bodies)
    reader = codec.MessageReader()
    got = reader.feed(stream)
    assert got == bodies
    assert all(type(m) is bytes for m in got)
    assert reader.pending == 0
    reader = codec.MessageReader()
    assert feed_chunks(reader, [stream[i : i + 1] for i in range(len(stream))]) == bodies
    assert reader.pending == 0


def test_buffer_types(codec: ModuleType) -> None:
    stream = frame(b"abc") + frame(b"")
    for chunk in (bytearray(stream), memoryview(b"xx" + stream)[2:]):
        assert codec.MessageReader().feed(chunk) == [b"abc", b""]


def test_pending(codec: ModuleType) -> None:
    reader = codec.MessageReader()
    assert reader.pending == 0
    stream = frame(b"hello")
    assert reader.feed(stream[:3]) == []
    assert reader.pending == 3
    assert reader.feed(stream[3:7]) == []
    assert reader.pending == 7
    assert reader.feed(stream[7:] + stream[:1]) == [b"hello"]
    assert reader.pending == 1
    assert reader.feed(b"") == []
    assert reader.pending == 1


def test_four_mib_exactly(codec: ModuleType) -> None:
    body = b"\xab" * LIMIT
    reader = codec.MessageReader()
    assert reader.max_message_size == LIMIT == codec.DEFAULT_MAX_RECEIVE_MESSAGE_SIZE
    assert reader.feed(frame(body)) == [body]
    stream = frame(body) + frame(b"x")
    half = len(stream) // 2
    assert feed_chunks(reader, [stream[:half], stream[half:]]) == [body, b"x"]
    assert reader.pending == 0


def check_error(exc: GrpcFramingError, cls: type, text: str, status: StatusCode) -> None:
    assert type(exc) is cls
    assert str(exc) == text
    assert exc.status == status


def test_too_large_as_soon_as_the_prefix_says_so(codec: ModuleType) -> None:
    reader = codec.MessageReader()
    text = f"grpc: received message larger than max ({LIMIT + 1} vs. {LIMIT})"
    prefix = frame(b"")[:1] + (LIMIT + 1).to_bytes(4, "big")
    assert reader.feed(prefix[:4]) == []
    with pytest.raises(MessageTooLargeError) as info:
        reader.feed(prefix[4:])  # no body byte has arrived
    check_error(info.value, MessageTooLargeError, text, StatusCode.RESOURCE_EXHAUSTED)
    # Sticky: every later feed fails the same way, whatever it holds.
    for more in (b"", frame(b"ok")):
        with pytest.raises(MessageTooLargeError) as again:
            reader.feed(more)
        check_error(again.value, MessageTooLargeError, text, StatusCode.RESOURCE_EXHAUSTED)
    assert reader.pending == 0


def test_compressed_flag(codec: ModuleType) -> None:
    reader = codec.MessageReader()
    text = "grpc: compressed flag set with identity or empty encoding"
    with pytest.raises(CompressedMessageError) as info:
        reader.feed(frame(b"abc", flag=1))
    check_error(info.value, CompressedMessageError, text, StatusCode.INTERNAL)
    with pytest.raises(CompressedMessageError):
        reader.feed(frame(b"abc"))


@pytest.mark.parametrize("flag", [2, 0x80, 0xFF])
def test_invalid_flag(codec: ModuleType, flag: int) -> None:
    reader = codec.MessageReader()
    text = f"grpc: received unexpected payload format {flag}"
    with pytest.raises(InvalidFlagError) as info:
        reader.feed(frame(b"", flag=flag))
    check_error(info.value, InvalidFlagError, text, StatusCode.INTERNAL)
    with pytest.raises(InvalidFlagError):
        reader.feed(b"")


def test_size_is_checked_before_the_flag(codec: ModuleType) -> None:
    """grpc-go checks the length when it reads the prefix and the flag later."""
    for flag in (1, 2):
        with pytest.raises(MessageTooLargeError):
            codec.MessageReader(10).feed(bytes([flag]) + (11).to_bytes(4, "big"))


def test_error_after_messages_in_the_same_chunk(codec: ModuleType) -> None:
    """A chunk that completes messages and then a bad prefix raises; those messages are
    lost with the stream (chunks before it were already delivered)."""
    reader = codec.MessageReader()
    assert reader.feed(frame(b"first")) == [b"first"]
    with pytest.raises(InvalidFlagError):
        reader.feed(frame(b"second") + frame(b"", flag=9))


def test_custom_limit(codec: ModuleType) -> None:
    reader = codec.MessageReader(max_message_size=10)
    assert reader.max_message_size == 10
    assert reader.feed(frame(b"0123456789")) == [b"0123456789"]
    too_large = r"^grpc: received message larger than max \(11 vs\. 10\)$"
    with pytest.raises(MessageTooLargeError, match=too_large):
        reader.feed(frame(b"0123456789a"))
    zero = codec.MessageReader(0)
    assert zero.feed(frame(b"") * 3) == [b"", b"", b""]
    with pytest.raises(MessageTooLargeError):
        zero.feed(frame(b"a"))


def test_largest_length(codec: ModuleType) -> None:
    """A length of 2**32-1 is a too-large message, not an overflow."""
    reader = codec.MessageReader()
    text = f"grpc: received message larger than max ({(1 << 32) - 1} vs. {LIMIT})"
    with pytest.raises(MessageTooLargeError) as info:
        reader.feed(b"\x00\xff\xff\xff\xff")
    assert str(info.value) == text


bodies_st = st.lists(st.binary(max_size=300) | st.integers(0, 5000).map(bytes), max_size=8)


@st.composite
def splits(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(bodies=bodies_st, tail=st.binary(max_size=20), data=st.data())
def test_random_splits(
    codec: ModuleType, bodies: list[bytes], tail: bytes, data: st.DataObject
) -> None:
    """Any chunking of valid messages gives them all; an unfinished tail stays pending."""
    stream = b"".join(frame(b) for b in bodies) + frame(tail)[:-1]
    expected, pending, error = reference(stream, LIMIT)
    assert error is None
    reader = codec.MessageReader()
    assert feed_chunks(reader, data.draw(splits(stream))) == expected
    assert reader.pending == pending


frames_st = st.builds(
    frame, st.binary(max_size=40), st.sampled_from([0, 0, 0, 0, 1, 2, 0x80])
) | st.binary(max_size=6)
streams_st = st.lists(frames_st, max_size=6).map(b"".join)


@given(stream=streams_st, limit=st.integers(0, 40), data=st.data())
def test_random_streams(codec: ModuleType, stream: bytes, limit: int, data: st.DataObject) -> None:
    """Random bytes: fed whole or in any chunks, the messages before the first bad prefix
    (in order, possibly fewer when they share the failing chunk), then that error, sticky.
    Nothing beyond ``limit + 5`` bytes is ever held."""
    expected, pending, error = reference(stream, limit)
    for chunks in ([stream], data.draw(splits(stream))):
        reader = codec.MessageReader(limit)
        got: list[bytes] = []
        raised: GrpcFramingError | None = None
        for chunk in chunks:
            try:
                got += reader.feed(chunk)
            except GrpcFramingError as exc:
                raised = exc
                break
            assert reader.pending <= limit + 5
        if error is None:
            assert raised is None
            assert got == expected
            assert reader.pending == pending
        else:
            assert raised is not None
            assert (type(raised), str(raised)) == error
            assert got == expected[: len(got)]
            with pytest.raises(error[0]):
                reader.feed(b"")
