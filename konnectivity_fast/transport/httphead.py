"""Reading an HTTP/1.x request head the way Go's ``net/http`` server does (sans-IO).

Both of our HTTP/1 listeners read request heads with this module: the health and admin
servers (``transport.http``) and the HTTP-CONNECT frontend (``server.http_connect``), so a
probe, a scraper or kube-apiserver sees the answers upstream's Go servers give.

What Go does, and so what this does (net/http ``readRequest``, net/textproto):

- a line ends at LF; a CR just before the LF is dropped, so bare-LF heads are read like
  CRLF ones, and the head ends at the first empty line after the request line;
- the request line is cut at its first two spaces (``GET  / HTTP/1.1`` is malformed), the
  method must be a token, the version ``HTTP/d.d``; a major version other than 1 is 505;
- header lines: a first line starting with a space is malformed, later ones are folded into
  the previous line; a name holding a space is kept as it is (not canonicalized, so it
  never matches a known header), other bytes outside a token are malformed; values may
  not hold control bytes other than tab;
- the Host rules: more than one is malformed, HTTP/1.1 needs one (CONNECT excepted), and
  its bytes must be host bytes.

Errors carry the status line text Go writes (``400 Bad Request: missing required Host
header``); ``error_response`` renders Go's raw reply to an unreadable request. Anything Go
checks later (bodies, transfer codings) is the caller's.

Invariants: no I/O; ``head_end`` only looks, ``parse_head`` only parses what it is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "BAD_REQUEST",
    "ERROR_HEADERS",
    "POST_TOLERANCE",
    "VERSION_NOT_SUPPORTED",
    "HeadError",
    "RequestHead",
    "error_response",
    "head_end",
    "leading_blank_bytes",
    "parse_head",
]

BAD_REQUEST = "400 Bad Request"
VERSION_NOT_SUPPORTED = "505 HTTP Version Not Supported: unsupported protocol version"
#: What Go's server writes between the status line and the body of its error replies.
ERROR_HEADERS = b"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
#: After a POST, Go discards up to this many CR or LF bytes before the next request
#: (RFC 7230 section 3's tolerance for old clients); nowhere else.
POST_TOLERANCE = 4

# An empty line: the LF ending the line before it, then an optional CR and the LF.
_EMPTY_LINE = re.compile(rb"\n\r?\n")
# RFC 7230 token characters (httpguts' isTokenTable).
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Bytes Go accepts in a Host header (httpguts' validHostByte).
_HOST = frozenset(
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ!$%&'()*+,-.:;=[]_~"
)
_SCHEME = re.compile(rb"^[A-Za-z][A-Za-z0-9+.\-]*:")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class HeadError(Exception):
    """A request head Go's server refuses; ``status`` is the text after ``HTTP/1.1 ``."""

    def __init__(self, status: str = BAD_REQUEST) -> None:
        super().__init__(status)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str  # the request-target as sent
    version: tuple[int, int]
    # Canonical names (``Content-Length``) to values in order; a name Go does not
    # canonicalize (one with a space) is kept as sent.
    headers: dict[str, list[str]]

    def get(self, name: str) -> str | None:
        """The first value of header ``name`` (canonical form), if any."""
        values = self.headers.get(name)
        return values[0] if values else None


def error_response(status: str) -> bytes:
    """Go's reply to a request it cannot read: the status twice, no length; it closes."""
    text = status.encode("latin-1")
    return b"HTTP/1.1 " + text + ERROR_HEADERS + text


def leading_blank_bytes(buf: bytes | bytearray) -> int:
    """How many of the first bytes Go skips after a POST (Go's ``numLeadingCRorLF``)."""
    n = 0
    for byte in buf[:POST_TOLERANCE]:
        if byte not in (0x0D, 0x0A):
            break
        n += 1
    return n


def head_end(buf: bytes | bytearray, start: int = 0) -> int:
    """The offset just past the head that starts ``buf`` (its empty line included), or -1
    while incomplete. ``start``: where an earlier call stopped looking (a resumed search
    must not miss an empty line that straddles two reads, so it backs up two bytes)."""
    first = buf.find(b"\n")
    if first < 0:
        return -1
    if first == 0 or (first == 1 and buf[0] == 0x0D):
        return first + 1  # an empty request line: a whole, malformed, request
    match = _EMPTY_LINE.search(buf, max(first, start - 2))
    return -1 if match is None else match.end()


def _lines(head: bytes) -> list[bytes]:
    lines = head.split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _canonical(name: bytes) -> str:
    """Go's canonical MIME header key: upper case first and after each dash."""
    out = bytearray(name)
    upper = True
    for i, c in enumerate(out):
        if upper and 0x61 <= c <= 0x7A:
            out[i] = c - 0x20
        elif not upper and 0x41 <= c <= 0x5A:
            out[i] = c + 0x20
        upper = out[i] == 0x2D
    return out.decode("latin-1")


def _header_name(raw: bytes) -> str:
    if not raw:
        raise HeadError()
    if all(c in _TOKEN for c in raw):
        return _canonical(raw)
    if all(c in _TOKEN or c == 0x20 for c in raw):
        return raw.decode("latin-1")  # "Host : x" (go.dev/issue/34540): kept, not canonical
    raise HeadError()


def _valid_value(value: bytes) -> bool:
    return all((c >= 0x20 and c != 0x7F) or c == 0x09 for c in value)


def _headers(lines: list[bytes]) -> dict[str, list[str]]:
    if lines and lines[0][:1] in (b" ", b"\t"):
        raise HeadError()  # "malformed MIME header initial line"
    folded: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # a continuation of the line before
            folded[-1] = folded[-1] + b" " + line.strip(b" \t")
        elif b":" not in line:
            raise HeadError()  # "malformed MIME header line"
        else:
            folded.append(line.strip(b" \t"))
    headers: dict[str, list[str]] = {}
    for line in folded:
        raw_name, _, raw_value = line.partition(b":")
        name = _header_name(raw_name)
        if not _valid_value(raw_value):
            raise HeadError()
        headers.setdefault(name, []).append(raw_value.lstrip(b" \t").decode("latin-1"))
    return headers


def _version(proto: bytes) -> tuple[int, int]:
    if proto == b"HTTP/1.1":
        return 1, 1
    if proto == b"HTTP/1.0":
        return 1, 0
    if (
        len(proto) != len(b"HTTP/X.Y")
        or not proto.startswith(b"HTTP/")
        or proto[6:7] != b"."
        or not (proto[5:6].isdigit() and proto[7:8].isdigit())
    ):
        raise HeadError()  # "malformed HTTP version"
    return int(proto[5:6]), int(proto[7:8])


def _escapes_ok(text: bytes) -> bool:
    i = text.find(b"%")
    while i >= 0:
        if len(text) < i + 3 or text[i + 1] not in _HEX or text[i + 2] not in _HEX:
            return False
        i = text.find(b"%", i + 3)
    return True


def _check_target(method: bytes, target: bytes) -> None:
    """What Go's ``url.ParseRequestURI`` refuses (CONNECT: an authority, not a URL)."""
    if not target or any(c < 0x20 or c == 0x7F for c in target):
        raise HeadError()
    if method == b"CONNECT" and not target.startswith(b"/"):
        target = b"http://" + target
    scheme = _SCHEME.match(target)
    if target == b"*" or target.startswith(b"/"):
        path = target
    elif scheme is not None:
        rest = target[scheme.end() :]
        path = b""
        if rest.startswith(b"//"):
            authority, slash, tail = rest[2:].partition(b"/")
            path = slash + tail
            _check_authority(authority.rpartition(b"@")[2])
    else:
        raise HeadError()  # "invalid URI for request"
    if not _escapes_ok(path.partition(b"?")[0]):
        raise HeadError()


def _check_authority(host: bytes) -> None:
    port = b""
    if host.startswith(b"["):
        end = host.find(b"]")
        if end < 0:
            raise HeadError()  # "missing ']' in host"
        port = host[end + 1 :]
        if port and not port.startswith(b":"):
            raise HeadError()
    elif b":" in host:
        port = host[host.rfind(b":") :]
    if port and not port[1:].isdigit() and port != b":":
        raise HeadError()  # "invalid port"
    if not _escapes_ok(host):
        raise HeadError()


def parse_head(head: bytes) -> RequestHead:
    """Parse one request head (as ``head_end`` delimits it); raises ``HeadError``."""
    lines = _lines(head)
    end = lines.index(b"", 1) if b"" in lines[1:] else len(lines)
    method, sp1, rest = lines[0].partition(b" ")
    target, sp2, proto = rest.partition(b" ")
    if not (sp1 and sp2):
        raise HeadError()  # "malformed HTTP request"
    if not method or any(c not in _TOKEN for c in method):
        raise HeadError()  # "invalid method"
    version = _version(proto)
    _check_target(method, target)
    headers = _headers(lines[1:end])
    hosts = headers.get("Host", [])
    if len(hosts) > 1:
        raise HeadError()  # "too many Host headers"
    if version[0] != 1:
        raise HeadError(VERSION_NOT_SUPPORTED)
    if version >= (1, 1) and not hosts and method != b"CONNECT":
        raise HeadError(f"{BAD_REQUEST}: missing required Host header")
    if hosts and any(c not in _HOST for c in hosts[0].encode("latin-1")):
        raise HeadError(f"{BAD_REQUEST}: malformed Host header")
    for name in headers:
        if not name or any(c not in _TOKEN for c in name.encode("latin-1")):
            raise HeadError(f"{BAD_REQUEST}: invalid header name")
    return RequestHead(method.decode("latin-1"), target.decode("latin-1"), version, headers)
