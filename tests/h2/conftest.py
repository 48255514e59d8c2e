"""Helpers for sans-IO tests of the HTTP/2 + gRPC engine (``konnectivity_fast._wire``).

Two ``H2Connection`` objects, a client and a server, are pumped against each other in
memory: no sockets, no event loop, time passed explicitly. Raw frames for a misbehaving
peer come from ``tests/support/h2frames.py`` (re-exported here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from konnectivity_fast._compiled import require_compiled
from tests.support.h2frames import (
    ACK,
    CANCEL,
    CANCELLED,
    COMPRESSION_ERROR,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    GOAWAY,
    HEADERS,
    INTERNAL,
    INTERNAL_ERROR,
    INVALID_ARGUMENT,
    NO_ERROR,
    OK,
    PADDED,
    PATH,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PROTOCOL_ERROR,
    PUSH_PROMISE,
    REFUSED_STREAM,
    RESOURCE_EXHAUSTED,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS,
    SETTINGS_MAX_FRAME_SIZE,
    WINDOW_UPDATE,
    Frame,
    data_frame,
    frame,
    frames_of,
    grpc_message,
    headers_frame,
    hpack_int,
    hpack_literal,
    parse_frames,
    ping,
    raw_client_start,
    request_headers,
    rst_stream,
    settings_frame,
    window_update,
)

# The raw-frame helpers are re-exported: the tests of this folder import them from here.
__all__ = [
    "ACK",
    "CANCEL",
    "CANCELLED",
    "COMPRESSION_ERROR",
    "CONTINUATION",
    "DATA",
    "END_HEADERS",
    "END_STREAM",
    "ENHANCE_YOUR_CALM",
    "FLOW_CONTROL_ERROR",
    "FRAME_SIZE_ERROR",
    "GOAWAY",
    "HEADERS",
    "INTERNAL",
    "INTERNAL_ERROR",
    "INVALID_ARGUMENT",
    "NO_ERROR",
    "OK",
    "PADDED",
    "PATH",
    "PING",
    "PREFACE",
    "PRIORITY",
    "PRIORITY_FLAG",
    "PROTOCOL_ERROR",
    "PUSH_PROMISE",
    "REFUSED_STREAM",
    "RESOURCE_EXHAUSTED",
    "RST_STREAM",
    "SETTINGS",
    "SETTINGS_ENABLE_PUSH",
    "SETTINGS_HEADER_TABLE_SIZE",
    "SETTINGS_INITIAL_WINDOW_SIZE",
    "SETTINGS_MAX_CONCURRENT_STREAMS",
    "SETTINGS_MAX_FRAME_SIZE",
    "WINDOW_UPDATE",
    "Frame",
    "data_frame",
    "frame",
    "frames_of",
    "grpc_message",
    "headers_frame",
    "hpack_int",
    "hpack_literal",
    "parse_frames",
    "ping",
    "raw_client_start",
    "request_headers",
    "rst_stream",
    "settings_frame",
    "window_update",
]

w: Any = require_compiled()


def substitute_request(out: bytes, stream_id: int, headers: list[tuple[str, str]]) -> bytes:
    """Replace the HEADERS of ``stream_id`` in a client engine's output by literal fields.

    The client engine stays able to decode the server's answer (the server's encoder and
    the client's decoder are untouched); only its own later header blocks on this
    connection would disagree with the server's decoder, so use one request per
    connection."""
    frames = []
    replaced = False
    for f in parse_frames(out, preface=out.startswith(PREFACE)):
        if f.type == HEADERS and f.stream_id == stream_id and not replaced:
            flags = END_HEADERS | (f.flags & END_STREAM)
            frames.append(frame(HEADERS, flags, stream_id, hpack_literal(headers)))
            replaced = True
        else:
            frames.append(frame(f.type, f.flags, f.stream_id, f.payload))
    assert replaced, "no HEADERS frame to replace"
    return (PREFACE if out.startswith(PREFACE) else b"") + b"".join(frames)


# ---- engines pumped in memory -----------------------------------------------------------


EventKey = tuple[Any, ...]


def key(ev: Any) -> EventKey:
    """Everything an event carries, as a comparable tuple."""
    md = ev.metadata
    return (
        ev.kind,
        ev.stream_id,
        ev.path,
        None if md is None else tuple(md),
        ev.data,
        ev.status,
        ev.message,
        ev.error_code,
        ev.authority,
        ev.timeout,
    )


def kinds(events: list[Any]) -> list[int]:
    return [ev.kind for ev in events]


def of_kind(events: list[Any], kind: int) -> list[Any]:
    return [ev for ev in events if ev.kind == kind]


@dataclass
class Wire:
    """Everything that crossed the wire in one ``pump``."""

    client_events: list[Any]
    server_events: list[Any]
    to_server: bytes
    to_client: bytes


MAX_PUMP_ROUNDS = 10_000


def pump(client: Any, server: Any, now: float = 0.0) -> tuple[list[Any], list[Any]]:
    """Move ``data_to_send()`` between the two engines until both are quiet; the events
    each side produced (client's, server's)."""
    wire = pump_wire(client, server, now)
    return wire.client_events, wire.server_events


def pump_wire(client: Any, server: Any, now: float = 0.0) -> Wire:
    ce: list[Any] = []
    se: list[Any] = []
    to_server = bytearray()
    to_client = bytearray()
    for _ in range(MAX_PUMP_ROUNDS):
        a = client.data_to_send()
        ce += client.take_events()
        if a:
            to_server += a
            se += server.receive_data(a, now)
        b = server.data_to_send()
        se += server.take_events()
        if b:
            to_client += b
            ce += client.receive_data(b, now)
        if not a and not b:
            ce += client.take_events()
            se += server.take_events()
            return Wire(ce, se, bytes(to_server), bytes(to_client))
    raise AssertionError("the engines never went quiet")


def connected(now: float = 0.0, **options: Any) -> tuple[Any, Any]:
    """A client and a server engine after the SETTINGS exchange. Options prefixed
    ``client_``/``server_`` go to that side, others to both."""
    common = {k: v for k, v in options.items() if not k.startswith(("client_", "server_"))}
    c_opts = {**common, **{k[7:]: v for k, v in options.items() if k.startswith("client_")}}
    s_opts = {**common, **{k[7:]: v for k, v in options.items() if k.startswith("server_")}}
    client = w.H2Connection(False, now=now, **c_opts)
    server = w.H2Connection(True, now=now, **s_opts)
    ce, se = pump(client, server, now)
    assert ce == [] and se == [], (ce, se)
    return client, server


def open_call(
    client: Any,
    server: Any,
    metadata: Iterable[tuple[str, str]] = (),
    now: float = 0.0,
    path: str = PATH,
) -> tuple[int, Any]:
    """Start a call and deliver it: its stream id and the server's EV_REQUEST."""
    sid = client.start_request(path, metadata)
    ce, se = pump(client, server, now)
    assert ce == []
    assert kinds(se) == [w.EV_REQUEST], se
    return int(sid), se[0]


def server_feed(server: Any, data: bytes, now: float = 0.0) -> tuple[list[Any], bytes]:
    """Feed raw bytes to a server engine: its events and its answer."""
    events = list(server.receive_data(data, now))
    out = bytes(server.data_to_send())
    events += server.take_events()
    return events, out


# ---- HPACK decoding of an engine's output -------------------------------------------------
#
# The server's answers are HPACK-encoded with Huffman strings and a dynamic table. They are
# decoded with libnghttp2's public inflater API (nghttp2_hd_inflate_*) through ctypes: the
# system library the engine links anyway, used here only as a decoder.


class _NV(ctypes.Structure):
    _fields_: ClassVar[list[tuple[str, Any]]] = [
        ("name", ctypes.POINTER(ctypes.c_uint8)),
        ("value", ctypes.POINTER(ctypes.c_uint8)),
        ("namelen", ctypes.c_size_t),
        ("valuelen", ctypes.c_size_t),
        ("flags", ctypes.c_uint8),
    ]


def _load_nghttp2() -> Any:
    name = ctypes.util.find_library("nghttp2")
    assert name is not None, "libnghttp2 not found"
    lib = ctypes.CDLL(name)
    lib.nghttp2_hd_inflate_new.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    lib.nghttp2_hd_inflate_new.restype = ctypes.c_int
    lib.nghttp2_hd_inflate_del.argtypes = [ctypes.c_void_p]
    lib.nghttp2_hd_inflate_del.restype = None
    lib.nghttp2_hd_inflate_hd2.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_NV),
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
    ]
    lib.nghttp2_hd_inflate_hd2.restype = ctypes.c_ssize_t
    lib.nghttp2_hd_inflate_end_headers.argtypes = [ctypes.c_void_p]
    lib.nghttp2_hd_inflate_end_headers.restype = ctypes.c_int
    return lib


_HD_INFLATE_FINAL = 0x01
_HD_INFLATE_EMIT = 0x02
_nghttp2 = _load_nghttp2()


class HpackDecoder:
    """One connection's HPACK decoder (the dynamic table lives across header blocks)."""

    def __init__(self) -> None:
        self._ptr = ctypes.c_void_p()
        assert _nghttp2.nghttp2_hd_inflate_new(ctypes.byref(self._ptr)) == 0

    def __del__(self) -> None:
        if self._ptr:
            _nghttp2.nghttp2_hd_inflate_del(self._ptr)

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        nv = _NV()
        flags = ctypes.c_int()
        buf = ctypes.create_string_buffer(block, len(block))
        offset = 0
        while True:
            flags.value = 0
            rv = _nghttp2.nghttp2_hd_inflate_hd2(
                self._ptr,
                ctypes.byref(nv),
                ctypes.byref(flags),
                ctypes.addressof(buf) + offset,
                len(block) - offset,
                1,
            )
            assert rv >= 0, f"HPACK decoding failed ({rv})"
            offset += rv
            if flags.value & _HD_INFLATE_EMIT:
                out.append(
                    (
                        ctypes.string_at(nv.name, nv.namelen).decode("latin-1"),
                        ctypes.string_at(nv.value, nv.valuelen).decode("latin-1"),
                    )
                )
            if flags.value & _HD_INFLATE_FINAL:
                _nghttp2.nghttp2_hd_inflate_end_headers(self._ptr)
                return out
            if rv == 0 and offset >= len(block):
                raise AssertionError("HPACK block did not finish")


@dataclass
class ServerView:
    """A raw client's reading of a server engine's output: frames and decoded headers."""

    decoder: HpackDecoder = field(default_factory=HpackDecoder)
    frames: list[Frame] = field(default_factory=list)
    # (stream id, header list, END_STREAM) for each complete header block.
    header_blocks: list[tuple[int, list[tuple[str, str]], bool]] = field(default_factory=list)
    _pending: bytearray = field(default_factory=bytearray)
    _partial: tuple[int, bool, bytearray] | None = None

    def feed(self, data: bytes) -> list[Frame]:
        new = parse_frames(data)
        self.frames += new
        for f in new:
            if f.type == HEADERS:
                block = f.payload
                if f.flags & PADDED:
                    block = block[1 : len(block) - block[0]]
                if f.flags & PRIORITY_FLAG:
                    block = block[5:]
                self._partial = (f.stream_id, bool(f.flags & END_STREAM), bytearray(block))
            elif f.type == CONTINUATION:
                assert self._partial is not None
                self._partial[2].extend(f.payload)
            else:
                continue
            if f.flags & END_HEADERS:
                assert self._partial is not None
                sid, end, block_bytes = self._partial
                self._partial = None
                self.header_blocks.append((sid, self.decoder.decode(bytes(block_bytes)), end))
        return new

    def headers_of(self, stream_id: int) -> list[dict[str, str]]:
        return [dict(h) for sid, h, _ in self.header_blocks if sid == stream_id]

    def of_type(self, ftype: int) -> list[Frame]:
        return [f for f in self.frames if f.type == ftype]
