"""The request-head reader shared by our HTTP/1 listeners (``transport.httphead``); how its
answers compare with Go's server is tested against upstream's binary in
tests/compat/test_http_heads.py. Here: the framing, fed the way sockets deliver it."""

from __future__ import annotations

import pytest

from konnectivity_fast.transport.httphead import (
    HeadError,
    error_response,
    head_end,
    leading_blank_bytes,
    parse_head,
)

HEADS = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"GET / HTTP/1.1\r\nHost: x\n\r\n",
    b"GET / HTTP/1.1\nHost: x\r\n\n",
    b"CONNECT 10.0.0.1:443 HTTP/1.1\n\n",
]


@pytest.mark.parametrize("head", HEADS)
def test_head_end_in_pieces(head: bytes) -> None:
    """However the head is cut into reads, the end is found exactly once it is all there,
    with the search resumed where the previous one stopped."""
    tail = b"pipelined"
    data = head + tail
    for cut in range(1, len(head)):
        scanned = 0
        buf = bytearray()
        ends = []
        for piece in (data[:cut], data[cut:]):
            buf += piece
            end = head_end(buf, scanned)
            scanned = len(buf)
            ends.append(end)
        assert ends[-1] == len(head), (cut, ends)
        assert ends[0] in (-1, len(head)), (cut, ends)


def test_parse_canonical_names_and_folding() -> None:
    head = parse_head(b"CONNECT h:1 HTTP/1.1\ncontent-length: 3\nX-A: a\n b\n\n")
    assert (head.method, head.target, head.version) == ("CONNECT", "h:1", (1, 1))
    assert head.get("Content-Length") == "3"
    assert head.get("X-A") == "a b"
    assert head.get("Host") is None


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"\r\n", "400 Bad Request"),
        (b"GET / HTTP/1.1\n\n", "400 Bad Request: missing required Host header"),
        (
            b"GET / HTTP/3.0\nHost: x\n\n",
            "505 HTTP Version Not Supported: unsupported protocol version",
        ),
        (b"GET / HTTP/1.1\nHost: a b\n\n", "400 Bad Request: malformed Host header"),
        (b"GET / HTTP/1.1\n Host: x\n\n", "400 Bad Request"),
        # "Host " is kept as sent (not the Host header), then refused as a name.
        (b"CONNECT h:1 HTTP/1.1\nHost : y\n\n", "400 Bad Request: invalid header name"),
    ],
)
def test_refused_heads(head: bytes, status: str) -> None:
    with pytest.raises(HeadError) as info:
        parse_head(head)
    assert info.value.status == status
    reply = error_response(status)
    assert reply.startswith(f"HTTP/1.1 {status}\r\n".encode()) and reply.endswith(status.encode())


def test_leading_blank_bytes() -> None:
    assert leading_blank_bytes(b"\r\n\r\nGET") == 4
    assert leading_blank_bytes(b"\n\n\n\n\nGET") == 4
    assert leading_blank_bytes(b"\nGET") == 1
    assert leading_blank_bytes(b"GET") == 0
