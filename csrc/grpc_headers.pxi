# gRPC's use of HTTP/2 headers: grpc-message percent-encoding, grpc-timeout, grpc-status,
# content-type, metadata, and the HTTP-status mapping (the gRPC over HTTP/2 spec).

from libc.math cimport ceil
from libc.stdint cimport uint8_t

# gRPC status codes (grpc-go codes/codes.go; konnectivity_fast/wire/errors.py StatusCode is
# the same table for Python). The engine reports these in H2Event.status.
cdef enum:
    GRPC_OK = 0
    GRPC_CANCELLED = 1
    GRPC_UNKNOWN = 2
    GRPC_INVALID_ARGUMENT = 3
    GRPC_DEADLINE_EXCEEDED = 4
    GRPC_NOT_FOUND = 5
    GRPC_ALREADY_EXISTS = 6
    GRPC_PERMISSION_DENIED = 7
    GRPC_RESOURCE_EXHAUSTED = 8
    GRPC_FAILED_PRECONDITION = 9
    GRPC_ABORTED = 10
    GRPC_OUT_OF_RANGE = 11
    GRPC_UNIMPLEMENTED = 12
    GRPC_INTERNAL = 13
    GRPC_UNAVAILABLE = 14
    GRPC_DATA_LOSS = 15
    GRPC_UNAUTHENTICATED = 16

# HTTP status of a non-gRPC response -> gRPC status (the gRPC "HTTP to gRPC status" table;
# grpc-go internal/transport/http_util.go, its HTTP status conversion table).
_HTTP_TO_GRPC = {
    400: GRPC_INTERNAL,
    401: GRPC_UNAUTHENTICATED,
    403: GRPC_PERMISSION_DENIED,
    404: GRPC_UNIMPLEMENTED,
    429: GRPC_UNAVAILABLE,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_UNAVAILABLE,
}


# grpc-message: percent-encode bytes outside printable ASCII, and '%' itself (gRPC spec).
# A leading or trailing space is encoded too: HTTP/2 forbids it at a field value's edges
# (RFC 9113 section 8.2.1), and nghttp2 peers reject such a field.
cdef bytes _percent_encode(str message):
    cdef bytes raw = message.encode("utf-8", "surrogateescape")
    cdef bytearray out
    cdef uint8_t c
    cdef Py_ssize_t i, n = len(raw)
    for i in range(n):
        c = raw[i]
        if c < 0x20 or c > 0x7E or c == 0x25 or (c == 0x20 and (i == 0 or i == n - 1)):
            break
    else:
        return raw
    out = bytearray()
    for i in range(n):
        c = raw[i]
        if c < 0x20 or c > 0x7E or c == 0x25 or (c == 0x20 and (i == 0 or i == n - 1)):
            out += b"%%%02X" % c
        else:
            out.append(c)
    return bytes(out)


cdef str _percent_decode(bytes value):
    cdef bytearray out
    cdef Py_ssize_t i = 0, n = len(value)
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out = bytearray()
    while i < n:
        if value[i] == 0x25 and i + 2 < n and _is_hex(value[i + 1]) and _is_hex(value[i + 2]):
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return out.decode("utf-8", "replace")


cdef inline bint _is_hex(uint8_t c):
    return (48 <= c <= 57) or (65 <= c <= 70) or (97 <= c <= 102)


# grpc-timeout: up to 8 ASCII digits and a unit (gRPC over HTTP/2 spec).
_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
# Units from finest to coarsest, in nanoseconds, for encoding.
_TIMEOUT_ENCODE = ((1, b"n"), (1000, b"u"), (1000000, b"m"), (1000000000, b"S"),
                   (60000000000, b"M"), (3600000000000, b"H"))
_TIMEOUT_MAX_DIGITS_VALUE = 99999999


def encode_grpc_timeout(double seconds):
    """grpc-timeout for `seconds`: the finest unit whose value fits 8 digits, rounded up
    (as grpc-go encodes it), so a deadline is never shortened."""
    cdef long long ns
    if seconds <= 0:
        return b"0n"
    ns = <long long>ceil(seconds * 1e9)
    for unit, letter in _TIMEOUT_ENCODE:
        value = -(-ns // unit)
        if value <= _TIMEOUT_MAX_DIGITS_VALUE:
            return b"%d%s" % (value, letter)
    return b"%d%s" % (_TIMEOUT_MAX_DIGITS_VALUE, b"H")


def parse_grpc_timeout(bytes value):
    """Seconds of a grpc-timeout header value; ValueError when malformed."""
    cdef Py_ssize_t n = len(value)
    # Explicit bounds: this module is compiled with wraparound=False.
    unit = _TIMEOUT_UNITS.get(value[n - 1:n]) if n >= 2 else None
    digits = value[:n - 1] if n >= 2 else b""
    if unit is None or len(digits) > 8 or not digits.isdigit():
        raise ValueError(f"transport: malformed grpc-timeout: {value.decode('latin-1')!r}")
    return int(digits) * unit


cdef list _metadata_out(object metadata):
    """Application metadata -> header pairs. Keys are lowercased: grpc-go lowercases keys
    on the wire and grpcio rejects upper-case ones."""
    cdef list out = []
    for key, value in metadata:
        k = key.lower().encode("ascii") if isinstance(key, str) else bytes(key).lower()
        v = value.encode("latin-1") if isinstance(value, str) else bytes(value)
        out.append((k, v))
    return out


# Bytes of a peer's header value quoted back in an error message: bounds the reply a short
# request can cause (HPACK lets a peer send a long value in a few bytes).
MAX_ECHOED_VALUE = 64


cdef str _echoed(bytes value):
    return value[:MAX_ECHOED_VALUE].decode("latin-1")


cdef inline bint _is_grpc_content_type(bytes ctype):
    return (ctype == b"application/grpc" or ctype.startswith(b"application/grpc+")
            or ctype.startswith(b"application/grpc;"))


cdef inline bint _valid_status(bytes raw):
    # grpc-go parses grpc-status as a uint32 and rejects larger values; codes are int32.
    return raw.isdigit() and len(raw) <= 10 and int(raw) <= 0x7FFFFFFF
