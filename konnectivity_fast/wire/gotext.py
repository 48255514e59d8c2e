"""Go standard-library text functions that the wire contract depends on, ported once.

Both programs show users Go's exact texts: the agent when it checks
``--agent-identifiers``, the server when an agent's ``agentidentifiers`` metadata does not
parse (upstream runs both through ``net/url``'s ``ParseQuery``), and every flag error that
quotes user input (``strconv.Quote``). They are here, at the bottom layer, so that
``wire.contract`` and ``cli.goparse`` share one port of each:

- ``go_quote``: ``strconv.Quote`` (Go's ``%q``);
- ``query_unescape`` and ``parse_query``: ``url.QueryUnescape`` and ``url.ParseQuery``;
- ``go_slice``: ``fmt``'s ``%v`` of a ``[]string``.

Go strings are bytes; a Python ``str`` carries undecodable bytes as surrogate escapes
(``sys.argv`` and our metadata decoding both do), so these work on the UTF-8 bytes with
``surrogateescape``. Pure functions: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["go_bytes", "go_quote", "go_slice", "parse_query", "query_unescape"]

_HEX = frozenset(b"0123456789abcdefABCDEF")
_C_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}
# url.ParseQuery's own error for a ';' in a query (Go 1.17 stopped splitting at it).
SEMICOLON_ERROR = "invalid semicolon separator in query"


def go_bytes(s: str) -> bytes:
    """The bytes of the Go string that ``s`` stands for."""
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a byte
        return s.encode("utf-8", "surrogatepass")


def go_quote(s: str) -> str:
    """``strconv.Quote``: printable runes stay, the rest become Go escapes."""
    out = ['"']
    for ch in go_bytes(s).decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _C_ESCAPES:
            out.append(_C_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def query_unescape(text: str) -> str:
    """``url.QueryUnescape``: ``%XX`` escapes and ``+`` as a space; a bad escape raises
    ``ValueError`` with Go's message, which quotes the (at most three) bytes at fault."""
    raw = go_bytes(text)
    if b"%" not in raw and b"+" not in raw:
        return text
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # '%'
            if i + 2 >= len(raw) or raw[i + 1] not in _HEX or raw[i + 2] not in _HEX:
                bad = raw[i : i + 3].decode("utf-8", "surrogateescape")
                raise ValueError(f"invalid URL escape {go_quote(bad)}")
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(0x20 if byte == 0x2B else byte)  # '+' is a space in a query
        i += 1
    return out.decode("utf-8", "surrogateescape")


def parse_query(query: str) -> tuple[dict[str, list[str]], str | None]:
    """``url.ParseQuery``: the values parsed (keys in first-seen order, values in order),
    and the error Go would return with them, or None. Like Go, it carries on after an
    error: a semicolon error replaces any earlier error, an escape error is kept only if
    it is the first."""
    values: dict[str, list[str]] = {}
    error: str | None = None
    for item in query.split("&"):
        if ";" in item:
            error = SEMICOLON_ERROR
            continue
        if not item:
            continue
        key, _, value = item.partition("=")
        try:
            key, value = query_unescape(key), query_unescape(value)
        except ValueError as exc:
            error = error or str(exc)
            continue
        values.setdefault(key, []).append(value)
    return values, error


def go_slice(values: Sequence[str]) -> str:
    """``fmt``'s ``%v`` of a Go ``[]string``: ``[a b c]``."""
    return "[" + " ".join(values) + "]"
