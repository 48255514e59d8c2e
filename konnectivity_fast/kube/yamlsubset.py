"""A strict reader for the YAML that kubeconfig files are written in.

Kubeconfigs are written by kubectl, kubeadm and friends (go-yaml) as block mappings and
block sequences of scalars, or as JSON. This module reads exactly that and refuses the
rest with a clear ``YamlError`` naming the line, so no YAML library is needed at run time:

- JSON documents (a file whose first significant character is ``{``);
- block mappings ``key: value`` and block sequences ``- item`` (also ``- key: value``,
  the compact form of a mapping inside a sequence), nested by indentation;
- plain, ``'single'`` and ``"double"`` quoted scalars (with the escapes JSON has), the
  flow forms ``{}`` and ``[]``, ``# comments``, a leading ``---`` and a trailing ``...``.

Plain (unquoted) scalars are resolved as go-yaml v2 resolves them, which is what client-go
reads kubeconfigs with (sigs.k8s.io/yaml): the YAML 1.1 booleans (``y``, ``yes``, ``on``,
``true`` and ``n``, ``no``, ``off``, ``false``, each in lower, Title and UPPER case),
``null``/``~``/empty (None), integers (decimal, ``0x``, ``0o``, ``0b``, a leading ``0`` for
octal, ``_`` separators) and floats; anything else, and every quoted scalar, is a string.
Timestamps stay strings (sigs.k8s.io/yaml turns them into JSON strings too). Anchors,
tags, block scalars (``|``, ``>``), multi-line plain scalars and flow collections with
content are refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["YamlError", "loads"]

# A kubeconfig larger than this is not a kubeconfig; refuse it before parsing.
MAX_DOCUMENT_BYTES = 16 << 20
# "key:" then a space or the end of the line; the key is quoted, or plain without ": "/" #".
_KEY = re.compile(
    r"""^("(?:[^"\\]|\\.)*"|'(?:[^']|'')*'"""
    r"""|[^\s#'"{\[\]}:,&*!|>%@`-][^:#]*?|-[^\s:#][^:#]*?)\s*:(?:\s+|$)"""
)
_REFUSED_START = set("&*!|>%@`")
# go-yaml v2's resolve table (resolve.go): plain scalars that are not strings.
_BOOLEANS = {
    **dict.fromkeys(
        ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"), True
    ),
    **dict.fromkeys(
        ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"), False
    ),
}
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_SPECIAL_FLOATS = {
    **dict.fromkeys((".nan", ".NaN", ".NAN"), float("nan")),
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), float("inf")),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), float("-inf")),
}
# go-yaml's yamlStyleFloat, and what strconv.ParseFloat takes after a leading ".".
_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_DOT_FLOAT = re.compile(r"^\.[0-9]+([eE][-+]?[0-9]+)?$")
_INT_BASES = {"0x": 16, "0X": 16, "0o": 8, "0O": 8, "0b": 2, "0B": 2}
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


class YamlError(ValueError):
    """The document is not in the supported subset, or is malformed."""


@dataclass
class _Line:
    number: int  # 1-based, for messages
    indent: int
    text: str  # without indentation and without a trailing comment


def loads(text: str) -> Any:
    """Parse one kubeconfig document: a mapping, a JSON object, or nothing (None)."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise YamlError(f"document larger than {MAX_DOCUMENT_BYTES} bytes")
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise YamlError(f"invalid JSON: {exc}") from None
    lines = _lines(text)
    if not lines:
        return None
    value, end = _block(lines, 0, lines[0].indent)
    if end != len(lines):
        raise YamlError(f"line {lines[end].number}: unexpected content")
    return value


def _lines(text: str) -> list[_Line]:
    out: list[_Line] = []
    for number, raw in enumerate(text.splitlines(), 1):
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise YamlError(f"line {number}: tab in indentation")
        body = _strip_comment(raw.strip(), number)
        if not body or (not out and body == "---"):
            continue
        if body == "...":
            break
        if body.startswith("---"):
            raise YamlError(f"line {number}: more than one document")
        out.append(_Line(number, len(raw) - len(raw.lstrip(" ")), body))
    return out


def _strip_comment(text: str, number: int) -> str:
    """Drop a ``#`` comment that starts the text or follows a space, outside quotes."""
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"" and (i == 0 or text[i - 1] in " :-[{,"):
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].rstrip()
        i += 1
    if quote:
        raise YamlError(f"line {number}: unterminated quoted string")
    return text


def _block(lines: list[_Line], i: int, indent: int) -> tuple[Any, int]:
    """The mapping or sequence whose entries start at ``lines[i]`` with this indent."""
    if lines[i].text == "-" or lines[i].text.startswith("- "):
        return _sequence(lines, i, indent)
    return _mapping(lines, i, indent)


def _sequence(lines: list[_Line], i: int, indent: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    while i < len(lines) and lines[i].indent == indent:
        line = lines[i]
        if not (line.text == "-" or line.text.startswith("- ")):
            break  # the parent mapping goes on (a sequence at its key's indent)
        rest = line.text[1:].lstrip()
        if not rest:  # "-" alone: the item is the nested block below
            item, i = _nested(lines, i + 1, indent, line.number)
        elif _KEY.match(rest):
            # "- key: value" opens a mapping whose keys sit at the column of "key".
            col = indent + (len(line.text) - len(rest))
            lines[i] = _Line(line.number, col, rest)
            item, i = _mapping(lines, i, col)
        else:
            item, i = _scalar(rest, line.number), i + 1
        items.append(item)
    return items, i


def _mapping(lines: list[_Line], i: int, indent: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while i < len(lines) and lines[i].indent == indent:
        line = lines[i]
        match = _KEY.match(line.text)
        if match is None:
            raise YamlError(f"line {line.number}: expected 'key: value'")
        key = _scalar(match.group(1), line.number)
        if not isinstance(key, str):
            key = match.group(1)
        if key in result:
            raise YamlError(f"line {line.number}: duplicate key {key!r}")
        rest = line.text[match.end() :]
        if rest:
            result[key], i = _scalar(rest, line.number), i + 1
        # A sequence may sit at the same indent as its key (go-yaml's style).
        elif (
            i + 1 < len(lines)
            and lines[i + 1].indent == indent
            and (lines[i + 1].text == "-" or lines[i + 1].text.startswith("- "))
        ):
            result[key], i = _sequence(lines, i + 1, indent)
        else:
            result[key], i = _nested(lines, i + 1, indent, line.number)
    if i < len(lines) and lines[i].indent > indent:
        raise YamlError(f"line {lines[i].number}: unexpected indentation")
    return result, i


def _nested(lines: list[_Line], i: int, parent: int, number: int) -> tuple[Any, int]:
    """The block more indented than ``parent`` starting at ``lines[i]``, or None."""
    if i >= len(lines) or lines[i].indent <= parent:
        return None, i
    return _block(lines, i, lines[i].indent)


def _scalar(text: str, number: int) -> Any:
    if text[0] == '"':
        if not (len(text) >= 2 and text.endswith('"')):
            raise YamlError(f"line {number}: bad double-quoted string")
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise YamlError(f"line {number}: unsupported escape in {text}") from None
    if text[0] == "'":
        if not (len(text) >= 2 and text.endswith("'")) or "'" in text[1:-1].replace("''", ""):
            raise YamlError(f"line {number}: bad single-quoted string")
        return text[1:-1].replace("''", "'")
    if text in ("{}", "[]"):
        return {} if text == "{}" else []
    if text[0] in _REFUSED_START or text[0] in "{[":
        raise YamlError(f"line {number}: unsupported YAML construct: {text}")
    return _resolve(text)


def _resolve(text: str) -> Any:
    """A plain scalar's value, as go-yaml v2's ``resolve`` gives it."""
    if text in _NULLS:
        return None
    if text in _BOOLEANS:
        return _BOOLEANS[text]
    if text in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[text]
    if text[0] == ".":
        return float(text) if _DOT_FLOAT.match(text) else text
    if not (text[0].isdigit() or text[0] in "+-"):
        return text
    plain = text.replace("_", "")
    number = _go_int(plain)
    if number is not None:
        return number
    if _FLOAT.match(plain):
        return float(plain)
    return text


def _go_int(text: str) -> int | None:
    """Go's ``strconv.ParseInt(text, 0, 64)`` (or ParseUint): prefixes 0x, 0o, 0b, and a
    leading 0 for octal."""
    sign, body = (text[0], text[1:]) if text[:1] in "+-" else ("", text)
    base = _INT_BASES.get(body[:2], 0)
    if base:
        body = body[2:]
    elif len(body) > 1 and body[0] == "0":
        base, body = 8, body[1:]
    else:
        base = 10
    if not body or not all(c in _DIGITS[base] for c in body):
        return None
    value = int(sign + body, base)
    return value if -(1 << 63) <= value < (1 << 64) else None
