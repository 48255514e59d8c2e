"""Raw HTTP/2 frames, built by hand, for peers that misbehave: a 9-byte frame header and
HPACK literal fields (no Huffman, no dynamic table), so no third-party HTTP/2 package is
needed and the bytes are exactly what a test says. Used by the engine's sans-IO tests
(tests/h2/) and by the flooding peers of the transport and chaos tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATH = "/agent.AgentService/Connect"

# Frame types (RFC 9113 section 6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# Error codes (RFC 9113 section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

# SETTINGS identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5

# gRPC status codes used here.
OK = 0
CANCELLED = 1
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
INTERNAL = 13


# ---- raw frames ---------------------------------------------------------------------


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame: 3-byte length, type, flags, 4-byte stream id, payload."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((ftype, flags))
        + struct.pack(">I", stream_id & 0xFFFFFFFF)
        + payload
    )


def settings_frame(*entries: tuple[int, int], ack: bool = False) -> bytes:
    payload = b"".join(struct.pack(">HI", ident, value) for ident, value in entries)
    return frame(SETTINGS, ACK if ack else 0, 0, payload)


def ping(opaque: bytes = b"12345678", ack: bool = False) -> bytes:
    return frame(PING, ACK if ack else 0, 0, opaque)


def rst_stream(stream_id: int, code: int = CANCEL) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def data_frame(stream_id: int, payload: bytes, end_stream: bool = False) -> bytes:
    return frame(DATA, END_STREAM if end_stream else 0, stream_id, payload)


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """RST_STREAM's or GOAWAY's error code."""
        if self.type == RST_STREAM:
            return int(struct.unpack(">I", self.payload[:4])[0])
        if self.type == GOAWAY:
            return int(struct.unpack(">I", self.payload[4:8])[0])
        raise ValueError(f"frame type {self.type} has no error code")

    @property
    def debug_data(self) -> bytes:
        assert self.type == GOAWAY
        return self.payload[8:]


def parse_frames(data: bytes, *, preface: bool = False) -> list[Frame]:
    """Split bytes into frames (the client preface first when ``preface``); a trailing
    partial frame is an error: engines emit whole frames."""
    buf = bytes(data)
    if preface:
        assert buf.startswith(PREFACE), buf[:24]
        buf = buf[len(PREFACE) :]
    frames = []
    while buf:
        assert len(buf) >= 9, f"partial frame header {buf!r}"
        length = int.from_bytes(buf[:3], "big")
        ftype, flags = buf[3], buf[4]
        stream_id = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        assert len(buf) >= 9 + length, "partial frame"
        frames.append(Frame(ftype, flags, stream_id, buf[9 : 9 + length]))
        buf = buf[9 + length :]
    return frames


def frames_of(data: bytes, ftype: int) -> list[Frame]:
    return [f for f in parse_frames(data) if f.type == ftype]


# ---- HPACK literals (RFC 7541 section 6.2.2: literal without indexing, new name) ------


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _raw(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


def hpack_literal(headers: Iterable[tuple[str | bytes, str | bytes]]) -> bytes:
    """A header block of literal fields: touches no HPACK dynamic table."""
    out = bytearray()
    for name, value in headers:
        n, v = _raw(name), _raw(value)
        out += b"\x00" + hpack_int(len(n), 7) + n + hpack_int(len(v), 7) + v
    return bytes(out)


def request_headers(
    path: str = PATH,
    *,
    method: str = "POST",
    content_type: str = "application/grpc",
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", content_type),
        ("te", "trailers"),
        *extra,
    ]


def headers_frame(
    stream_id: int,
    headers: Iterable[tuple[str | bytes, str | bytes]],
    *,
    end_stream: bool = False,
    end_headers: bool = True,
) -> bytes:
    flags = (END_STREAM if end_stream else 0) | (END_HEADERS if end_headers else 0)
    return frame(HEADERS, flags, stream_id, hpack_literal(headers))


def grpc_message(msg: bytes, flag: int = 0) -> bytes:
    """A gRPC length-prefixed message."""
    return bytes((flag,)) + struct.pack(">I", len(msg)) + msg


def raw_client_start(*extra_settings: tuple[int, int]) -> bytes:
    """What a raw client sends first: the preface and its SETTINGS."""
    return PREFACE + settings_frame(*extra_settings)
