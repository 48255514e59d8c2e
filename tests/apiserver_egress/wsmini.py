"""Just enough RFC 6455 (WebSocket) for one upgraded connection through kube-apiserver's
node proxy: the handshake's accept key and single-frame messages, masked from the client
as the RFC requires. Shared by the fake kubelet (server side) and the tests (client side).

Invariants: only FIN frames (no fragmentation), payloads up to 2**63 bytes, opcodes are
passed through untouched (text, binary, close)."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import BinaryIO

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def encode(payload: bytes, opcode: int = BINARY, masked: bool = False) -> bytes:
    head = bytearray([0x80 | opcode])
    mask_bit = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head.append(mask_bit | n)
    elif n < 1 << 16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", n)
    if not masked:
        return bytes(head) + payload
    mask = os.urandom(4)
    return bytes(head) + mask + _xor(payload, mask)


def read_frame(stream: BinaryIO) -> tuple[int, bytes]:
    """One frame: (opcode, unmasked payload); EOFError if the stream ends first."""
    b0, b1 = _exact(stream, 2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", _exact(stream, 2))
    elif n == 127:
        (n,) = struct.unpack("!Q", _exact(stream, 8))
    mask = _exact(stream, 4) if b1 & 0x80 else b""
    payload = _exact(stream, n)
    return b0 & 0x0F, _xor(payload, mask) if mask else payload


def _xor(data: bytes, mask: bytes) -> bytes:
    whole = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(whole, "big")).to_bytes(len(data), "big")


def _exact(stream: BinaryIO, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = stream.read(n - len(out))
        if not chunk:
            raise EOFError(f"stream ended after {len(out)} of {n} bytes")
        out += chunk
    return out
