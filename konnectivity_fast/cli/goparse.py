"""Go's text conversions, as the upstream binaries apply them to command-line values.

Upstream parses flags with pflag on top of Go's ``strconv``, ``time`` and ``encoding/csv``.
Users see those packages' exact error texts (``strconv.ParseInt: parsing "x": invalid
syntax``, ``time: invalid duration "1"``) and their formatting of defaults (``1h0m0s``,
``[a,b]``), so this module reproduces the behaviour, not merely the idea:

- integers: ``ParseInt``/``ParseUint`` with a base (0 means Go literal syntax: ``0x``, ``0o``,
  ``0b``, a leading ``0`` for octal, ``_`` between digits), a bit size and Go's check order;
- booleans: ``ParseBool``'s twelve spellings;
- float32: Go float literal syntax (decimal and hexadecimal), rounded to float32, and
  ``FormatFloat(f, 'g', -1, 32)`` for printing;
- durations: ``time.ParseDuration`` to integer nanoseconds and ``Duration.String``;
- CSV: the first record of ``encoding/csv`` (pflag's string slices);
- ``uuid.New().String()`` of google/uuid (default server and agent IDs);
- ``strconv.Quote`` (Go's ``%q``), which every error message uses to show user input; it is
  ported once, in ``wire/gotext.py`` (the wire contract quotes with it too), and
  re-exported here.

Go strings are bytes; a Python ``str`` from ``sys.argv`` carries undecodable bytes as
surrogate escapes, so conversions work on the UTF-8 bytes with ``surrogateescape``.
"""

from __future__ import annotations

import math
import os
import re
import struct

from konnectivity_fast.wire.gotext import go_bytes as _go_bytes
from konnectivity_fast.wire.gotext import go_quote

__all__ = [
    "GoError",
    "GoNumError",
    "format_duration",
    "format_float32",
    "go_quote",
    "new_uuid",
    "parse_bool",
    "parse_duration",
    "parse_float32",
    "parse_int",
    "parse_uint",
    "read_csv_record",
    "seconds_to_ns",
    "write_csv_record",
]

NS_PER_SECOND = 1_000_000_000
_UINT64_MAX = (1 << 64) - 1


class GoError(ValueError):
    """A conversion failed; ``str(exc)`` is the text Go would print."""


class GoNumError(GoError):
    """``*strconv.NumError``: ``kind`` is ``"syntax"`` or ``"range"``. Go's standard ``flag``
    package reports these two as ``parse error`` and ``value out of range``."""

    def __init__(self, func: str, num: str, kind: str) -> None:
        reason = "invalid syntax" if kind == "syntax" else "value out of range"
        super().__init__(f"strconv.{func}: parsing {go_quote(num)}: {reason}")
        self.kind = kind


# -- integers (strconv.ParseUint / ParseInt) -------------------------------------------------


def _underscore_ok(s: bytes) -> bool:
    """Go's rule: ``_`` only between digits, or between a base prefix and a digit."""
    saw = "^"
    i = 0
    if s[:1] in (b"+", b"-"):
        s = s[1:]
    hexa = False
    if len(s) >= 2 and s[0:1] == b"0" and s[1:2].lower() in (b"b", b"o", b"x"):
        i = 2
        saw = "0"
        hexa = s[1:2].lower() == b"x"
    for c in s[i:]:
        ch = chr(c)
        if ch.isdigit() or (hexa and ch.lower() in "abcdef"):
            saw = "0"
        elif ch == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def parse_uint(s: str, base: int, bit_size: int = 64, *, func: str = "ParseUint") -> int:
    """``strconv.ParseUint(s, base, bitSize)``, with Go's check order."""
    raw = _go_bytes(s)
    if not raw:
        raise GoNumError(func, s, "syntax")
    base0 = base == 0
    digits = raw
    if base0:
        base = 10
        if raw[0:1] == b"0":
            prefix = raw[1:2].lower()
            if len(raw) >= 3 and prefix in (b"b", b"o", b"x"):
                base = {b"b": 2, b"o": 8, b"x": 16}[prefix]
                digits = raw[2:]
            else:
                base = 8
                digits = raw[1:]
    max_val = (1 << bit_size) - 1
    cutoff = _UINT64_MAX // base + 1
    underscores = False
    n = 0
    for c in digits:
        ch = chr(c).lower()
        if ch == "_" and base0:
            underscores = True
            continue
        if "0" <= ch <= "9":
            d = c - 0x30
        elif "a" <= ch <= "z":
            d = ord(ch) - ord("a") + 10
        else:
            raise GoNumError(func, s, "syntax")
        if d >= base:
            raise GoNumError(func, s, "syntax")
        if n >= cutoff:
            raise GoNumError(func, s, "range")
        n = n * base + d
        if n > max_val:
            raise GoNumError(func, s, "range")
    if underscores and not _underscore_ok(raw):
        raise GoNumError(func, s, "syntax")
    return n


def parse_int(s: str, base: int = 0, bit_size: int = 64) -> int:
    """``strconv.ParseInt(s, base, bitSize)``; pflag's ``int`` uses base 0, bit size 64."""
    if not s:
        raise GoNumError("ParseInt", s, "syntax")
    neg = s[0] == "-"
    body = s[1:] if s[0] in "+-" else s
    try:
        un = parse_uint(body, base, bit_size, func="ParseInt")
    except GoNumError as exc:
        if exc.kind == "syntax":
            raise GoNumError("ParseInt", s, "syntax") from None
        un = _UINT64_MAX
    cutoff = 1 << (bit_size - 1)
    if (not neg and un >= cutoff) or (neg and un > cutoff):
        raise GoNumError("ParseInt", s, "range")
    return -un if neg else un


_BOOL_WORDS = {
    "1": True,
    "t": True,
    "T": True,
    "TRUE": True,
    "true": True,
    "True": True,
    "0": False,
    "f": False,
    "F": False,
    "FALSE": False,
    "false": False,
    "False": False,
}


def parse_bool(s: str) -> bool:
    """``strconv.ParseBool``."""
    try:
        return _BOOL_WORDS[s]
    except KeyError:
        raise GoNumError("ParseBool", s, "syntax") from None


# -- float32 (strconv.ParseFloat(s, 32), FormatFloat(f, 'g', -1, 32)) -----------------------

_DEC = r"[0-9](?:_?[0-9])*"
_HEX = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_FLOAT_RE = re.compile(
    rf"[+-]?(?:(?:{_DEC}(?:\.(?:{_DEC})?)?|\.{_DEC})(?:[eE][+-]?{_DEC})?"
    rf"|0[xX]_?(?:{_HEX}(?:\.(?:{_HEX})?)?|\.{_HEX})[pP][+-]?{_DEC})"
)
_SPECIAL_RE = re.compile(r"[+-]?(?:inf|infinity)|nan", re.IGNORECASE)


def _to_float32(x: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", x))[0])


def parse_float32(s: str) -> float:
    """``strconv.ParseFloat(s, 32)``: Go literal syntax, nearest float32, range errors."""
    if _SPECIAL_RE.fullmatch(s):
        return float(s.lower().replace("infinity", "inf"))
    if not _FLOAT_RE.fullmatch(s):
        raise GoNumError("ParseFloat", s, "syntax")
    text = s.replace("_", "")
    body = text.lstrip("+-")
    value = float.fromhex(text) if body[:2].lower() == "0x" else float(text)
    try:
        if math.isinf(value):  # beyond float64 already
            raise OverflowError
        return _to_float32(value)  # rounds to nearest; beyond float32's range overflows
    except OverflowError:
        raise GoNumError("ParseFloat", s, "range") from None


def format_float32(x: float) -> str:
    """``strconv.FormatFloat(x, 'g', -1, 32)``: the shortest digits that read back as the
    same float32, with an exponent when it is below -4 or at least 6 (Go's rule for the
    shortest ``'g'`` form)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if math.copysign(1.0, x) < 0 else "0"
    for prec in range(1, 10):
        text = f"{x:.{prec - 1}e}"
        try:
            if _to_float32(float(text)) == x:
                break
        except OverflowError:  # rounded up past the largest float32
            continue
    mantissa, exp_text = text.split("e")
    digits = mantissa.replace(".", "").lstrip("-").rstrip("0") or "0"
    exp = int(exp_text)
    sign = "-" if x < 0 else ""
    if exp < -4 or exp >= 6:
        frac = digits[1:]
        return (
            f"{sign}{digits[0]}{'.' + frac if frac else ''}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
        )
    point = exp + 1
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}"
    return f"{sign}{digits[:point]}.{digits[point:]}"


# -- durations (time.ParseDuration, Duration.String) ----------------------------------------

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": NS_PER_SECOND,
    "m": 60 * NS_PER_SECOND,
    "h": 3600 * NS_PER_SECOND,
}
_MAX_DURATION = (1 << 63) - 1


def _time_quote(s: str) -> str:
    """The ``time`` package's own ``quote``: non-ASCII bytes become ``\\xNN``."""
    out = ['"']
    for b in _go_bytes(s):
        if b >= 0x80 or b < 0x20:
            out.append(f"\\x{b:02x}")
        elif chr(b) in '"\\':
            out.append("\\" + chr(b))
        else:
            out.append(chr(b))
    out.append('"')
    return "".join(out)


def _leading_int(s: str) -> tuple[int, str, bool]:
    """Digits at the front of ``s``: (value, rest, overflowed)."""
    i, x = 0, 0
    while i < len(s) and "0" <= s[i] <= "9":
        if x > (1 << 63) // 10:
            return 0, s, True
        x = x * 10 + ord(s[i]) - 48
        if x > 1 << 63:
            return 0, s, True
        i += 1
    return x, s[i:], False


def _leading_fraction(s: str) -> tuple[int, float, str]:
    """Fraction digits at the front of ``s``: (value, scale, rest); extra digits are dropped."""
    i, x, scale, overflow = 0, 0, 1.0, False
    while i < len(s) and "0" <= s[i] <= "9":
        if not overflow:
            y = x * 10 + ord(s[i]) - 48
            if x > _MAX_DURATION // 10 or y > 1 << 63:
                overflow = True
            else:
                x, scale = y, scale * 10
        i += 1
    return x, scale, s[i:]


def parse_duration(s: str) -> int:
    """``time.ParseDuration``: a Go duration string to integer nanoseconds."""
    orig, neg, d = s, False, 0
    invalid = GoError(f"time: invalid duration {_time_quote(orig)}")
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise invalid
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise invalid
        before = len(s)
        v, s, overflow = _leading_int(s)
        if overflow:
            raise invalid
        pre = before != len(s)
        f, scale, post = 0, 1.0, False
        if s.startswith("."):
            s = s[1:]
            before = len(s)
            f, scale, s = _leading_fraction(s)
            post = before != len(s)
        if not pre and not post:
            raise invalid
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        if i == 0:
            raise GoError(f"time: missing unit in duration {_time_quote(orig)}")
        unit_text, s = s[:i], s[i:]
        unit = _UNITS.get(unit_text)
        if unit is None:
            raise GoError(
                f"time: unknown unit {_time_quote(unit_text)} in duration {_time_quote(orig)}"
            )
        if v > (1 << 63) // unit:
            raise invalid
        v *= unit
        if f > 0:
            v += int(float(f) * (float(unit) / scale))
            if v > 1 << 63:
                raise invalid
        d += v
        if d > 1 << 63:
            raise invalid
    if neg:
        return -d
    if d > _MAX_DURATION:
        raise invalid
    return d


def _frac(v: int, prec: int) -> tuple[str, int]:
    """Go's ``fmtFrac``: the ``prec`` low decimal digits of ``v`` as ``.ddd`` minus trailing
    zeros (nothing when they are all zero), and ``v`` without them."""
    digits = ""
    printed = False
    for _ in range(prec):
        digit = v % 10
        printed = printed or digit != 0
        if printed:
            digits = str(digit) + digits
        v //= 10
    return ("." + digits if printed else ""), v


def format_duration(ns: int) -> str:
    """``time.Duration.String``: ``1h0m0s``, ``1.5s``, ``100ms``, ``0s``."""
    if ns == 0:
        return "0s"
    neg = ns < 0
    u = -ns if neg else ns
    if u < NS_PER_SECOND:
        if u < 1_000:
            prec, unit = 0, "ns"
        elif u < 1_000_000:
            prec, unit = 3, "\u00b5s"
        else:
            prec, unit = 6, "ms"
        frac, u = _frac(u, prec)
        text = f"{u}{frac}{unit}"
    else:
        frac, u = _frac(u, 9)
        text = f"{u % 60}{frac}s"
        u //= 60
        if u > 0:
            text = f"{u % 60}m{text}"
            u //= 60
            if u > 0:
                text = f"{u}h{text}"
    return "-" + text if neg else text


def seconds_to_ns(seconds: float) -> int:
    """Float seconds (how options store durations) back to Go's integer nanoseconds."""
    return round(seconds * NS_PER_SECOND)


# -- CSV (encoding/csv, one record) --------------------------------------------------------


def read_csv_record(text: str) -> list[str]:
    """The first record of ``encoding/csv`` with default settings, as pflag's string slices
    read their values: ``,`` separates, ``"`` quotes (``""`` inside), a newline ends the
    record outside quotes, empty lines are skipped."""
    lines = text.replace("\r\n", "\n").split("\n")
    line_no = 0
    while line_no < len(lines) and lines[line_no] == "":
        line_no += 1
    if line_no == len(lines):
        raise GoError("EOF")  # csv.Reader.Read found no record at all
    fields: list[str] = []
    line = lines[line_no]
    pos = 0
    while True:
        if line[pos : pos + 1] != '"':
            end = line.find(",", pos)
            field = line[pos:] if end < 0 else line[pos:end]
            if '"' in field:
                col = pos + field.index('"') + 1
                raise GoError(
                    f'parse error on line {line_no + 1}, column {col}: bare " in non-quoted field'
                )
            fields.append(field)
            if end < 0:
                return fields
            pos = end + 1
            continue
        pos += 1
        value: list[str] = []
        while True:
            quote = line.find('"', pos)
            if quote < 0:  # the quoted field goes on over the next line
                value.append(line[pos:])
                line_no += 1
                if line_no >= len(lines):
                    raise GoError(
                        f"parse error on line {line_no}, column {len(line) + 1}: "
                        'extraneous or missing " in quoted-field'
                    )
                value.append("\n")
                line, pos = lines[line_no], 0
                continue
            value.append(line[pos:quote])
            after = line[quote + 1 : quote + 2]
            if after == '"':
                value.append('"')
                pos = quote + 2
            elif after == ",":
                fields.append("".join(value))
                pos = quote + 2
                break
            elif after == "":
                fields.append("".join(value))
                return fields
            else:
                raise GoError(
                    f"parse error on line {line_no + 1}, column {quote + 2}: "
                    'extraneous or missing " in quoted-field'
                )


def write_csv_record(fields: list[str]) -> str:
    """``encoding/csv`` Writer output for one record, without the line end."""
    out = []
    for field in fields:
        needs = field != "" and (
            field == "\\." or any(c in field for c in ',"\r\n') or field[0].isspace()
        )
        out.append('"' + field.replace('"', '""') + '"' if needs else field)
    return ",".join(out)


def new_uuid() -> str:
    """google/uuid's ``uuid.New().String()``: a random (version 4, RFC 9562 variant) UUID
    in its 36-character text form, as upstream makes default server and agent IDs. Made
    here from ``os.urandom`` rather than with the ``uuid`` module, which imports
    ``platform`` and more (about half a MiB the agent would keep for one call)."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40  # version 4
    b[8] = (b[8] & 0x3F) | 0x80  # variant: RFC 9562 (10xx)
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
