# Packet codec, writing side, and gRPC framing: the compiled twin of encode_packet and of the
# framing half of konnectivity_fast/wire/_codec.py (the reading side is codec.pxi, included
# just before, whose helpers this uses).
#
# C-level API for the HTTP/2 engine (same module; none needs the GIL):
#   Py_ssize_t kf_message_prefix(unsigned char* out, Py_ssize_t length) noexcept nogil
#       Writes the 5-byte gRPC prefix (flag 0, big-endian length) at out; returns 5, or -1
#       (nothing written) when length is outside 0..KF_MAX_MESSAGE_LENGTH.
#   Py_ssize_t kf_data_header(unsigned char* out, long long connect_id, Py_ssize_t length)
#       noexcept nogil
#       Writes at out (room for KF_DATA_HEADER_MAX bytes) the gRPC prefix and the Packet bytes
#       that precede `length` payload bytes in Packet(DATA, Data(connect_id, data=payload));
#       returns the header's size, or -1 (nothing written) when the framed message would not
#       fit the 4-byte length. header + payload is exactly frame_message(encode_packet(...)).

from konnectivity_fast.wire.errors import (
    CompressedMessageError, InvalidFlagError, MessageTooLargeError,
)

# ---------------------------------------------------------------------------------------------
# Encoder: sizes first, then one bytes object written in place.

cdef inline long long kfc_int64(object value) except? -1:
    """A Python int as int64; out of range is a ValueError (not OverflowError)."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(value):
        raise TypeError(f"int64 field needs an int, not {type(value).__name__}")
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise ValueError(f"{value} does not fit an int64 field")
    return v


cdef inline const char* kfc_utf8(object value, Py_ssize_t* size) except NULL:
    if not PyUnicode_Check(value):
        raise TypeError(f"string field needs a str, not {type(value).__name__}")
    try:
        return PyUnicode_AsUTF8AndSize(value, size)
    except UnicodeEncodeError:     # lone surrogates
        raise Utf8Error("string field cannot be encoded as UTF-8") from None


def encode_packet(packet):
    """protobuf-go's canonical encoding: type (1) unless 0, then the payload member (2..8 or
    100), written whenever set, even when empty; negative int64/enum values take 10 bytes."""
    cdef long long type_value
    cdef long long ival[4]
    cdef int which, field, kind, overflow = 0   # which: the member's row (kf_codec.h)
    cdef int member_tag_len
    cdef const char* sval[4]
    cdef Py_ssize_t slen[4]
    cdef Py_ssize_t payload_len = 0, total = 0
    cdef kf_buf data_buf
    cdef unsigned char* out
    cdef const unsigned char* kinds
    data_buf.held = False
    for field in range(4):
        ival[field] = 0
        sval[field] = NULL
        slen[field] = 0
    packet_type = packet.type
    if not PyLong_Check(packet_type):
        raise TypeError(f"packet type needs an int, not {type(packet_type).__name__}")
    type_value = PyLong_AsLongLongAndOverflow(packet_type, &overflow)
    if overflow or type_value < -2147483648 or type_value > 2147483647:
        raise ValueError(f"packet type {packet_type} does not fit the int32 enum")
    payload = packet.payload
    cls = type(payload)
    if payload is None:
        which = 0
    elif cls is Data:                  # fields are checked in field order, as the pure twin
        which = 4
        ival[1] = kfc_int64(payload.connect_id)
        sval[2] = kfc_utf8(payload.error, &slen[2])
        data = payload.data            # any bytes-like object: acquired last, below
    elif cls is DialRequest:
        which = 2
        sval[1] = kfc_utf8(payload.protocol, &slen[1])
        sval[2] = kfc_utf8(payload.address, &slen[2])
        ival[3] = kfc_int64(payload.random)
    elif cls is DialResponse:
        which = 3
        sval[1] = kfc_utf8(payload.error, &slen[1])
        ival[2] = kfc_int64(payload.connect_id)
        ival[3] = kfc_int64(payload.random)
    elif cls is CloseRequest:
        which = 5
        ival[1] = kfc_int64(payload.connect_id)
    elif cls is CloseResponse:
        which = 6
        sval[1] = kfc_utf8(payload.error, &slen[1])
        ival[2] = kfc_int64(payload.connect_id)
    elif cls is CloseDial:
        which = 7
        ival[1] = kfc_int64(payload.random)
    elif cls is Drain:
        which = 8
    elif cls is FlowCredit:
        which = KF_ROW_FLOW_CREDIT
        ival[1] = kfc_int64(payload.connect_id)
        ival[2] = kfc_int64(payload.bytes)
    else:
        raise TypeError(f"not a Packet payload: {cls.__name__}")

    if which == KF_MEMBER_DATA:        # last: from here on a buffer export must be released
        try:
            data_owner = kfc_acquire(data, &data_buf)
        except TypeError:
            raise TypeError(f"bytes field needs bytes, not {type(data).__name__}") from None
        sval[3] = <const char*>data_buf.p
        slen[3] = data_buf.n
    try:
        kinds = kf_field_kind[which]
        for field in range(1, 4):
            kind = kinds[field]
            if kind == KF_K_INT64 and ival[field] != 0:
                payload_len += 1 + kf_varint_size(<uint64_t>ival[field])
            elif kind != KF_K_NONE and kind != KF_K_INT64 and slen[field] != 0:
                payload_len += 1 + kf_varint_size(<uint64_t>slen[field]) + slen[field]
        # The member's tag (wire type 2, length): one byte for upstream's 2..8, whose row is
        # their field number; flowCredit = 100 (row 9) takes two, a2 06.
        member_tag_len = 2 if which == KF_ROW_FLOW_CREDIT else 1
        if type_value != 0:
            total += 1 + kf_varint_size(<uint64_t>type_value)
        if which != 0:
            total += member_tag_len + kf_varint_size(<uint64_t>payload_len) + payload_len
        result = PyBytes_FromStringAndSize(NULL, total)
        out = <unsigned char*>PyBytes_AS_STRING(result)
        if type_value != 0:
            out[0] = KF_FIELD_TYPE << 3                         # wire type 0: varint
            out = kf_put_varint(out + 1, <uint64_t>type_value)  # negative: sign-extended
        if which != 0:
            if member_tag_len == 1:
                out[0] = (which << 3) | 2
                out += 1
            else:
                out = kf_put_varint(out, (<uint64_t>kf_member_field[which] << 3) | 2)
            out = kf_put_varint(out, <uint64_t>payload_len)
            for field in range(1, 4):
                kind = kinds[field]
                if kind == KF_K_INT64 and ival[field] != 0:
                    out[0] = field << 3
                    out = kf_put_varint(out + 1, <uint64_t>ival[field])
                elif kind != KF_K_NONE and kind != KF_K_INT64 and slen[field] != 0:
                    out[0] = (field << 3) | 2
                    out = kf_put_varint(out + 1, <uint64_t>slen[field])
                    memcpy(out, sval[field], slen[field])
                    out += slen[field]
        return result
    finally:
        kfc_release(&data_buf)


# ---------------------------------------------------------------------------------------------
# gRPC framing.

cdef enum:
    # gRPC's message prefix: 1 flag byte (compressed or not), 4-byte big-endian length.
    KF_GRPC_PREFIX_LEN = 5
    KF_FLAG_COMPRESSED = 1
    # The largest DATA header: prefix 5, type 08 04, member tag 22 + its length (5 bytes, as
    # the message fits 4 bytes), connectID tag 08 + 10 (a negative int64), data tag 1a + 5.
    KF_DATA_HEADER_MAX = 5 + 2 + 1 + 5 + 1 + 10 + 1 + 5

# The 4-byte length field of the gRPC prefix bounds every framed message.
cdef Py_ssize_t KF_MAX_MESSAGE_LENGTH = 0xFFFFFFFF


cdef inline void kfc_put_prefix(unsigned char* out, uint64_t length) noexcept nogil:
    out[0] = 0                                   # flag: not compressed
    out[1] = <unsigned char>(length >> 24)
    out[2] = <unsigned char>(length >> 16)
    out[3] = <unsigned char>(length >> 8)
    out[4] = <unsigned char>length


cdef Py_ssize_t kf_message_prefix(unsigned char* out, Py_ssize_t length) noexcept nogil:
    if length < 0 or length > KF_MAX_MESSAGE_LENGTH:
        return -1
    kfc_put_prefix(out, <uint64_t>length)
    return KF_GRPC_PREFIX_LEN


cdef inline uint64_t kfc_data_body_size(long long connect_id, uint64_t length) noexcept nogil:
    """Size of the Data message: connectID (omitted when 0), data (omitted when empty)."""
    cdef uint64_t size = 0
    if connect_id != 0:
        size += 1 + kf_varint_size(<uint64_t>connect_id)
    if length != 0:
        size += 1 + kf_varint_size(length) + length
    return size


cdef Py_ssize_t kf_data_header(unsigned char* out, long long connect_id,
                               Py_ssize_t length) noexcept nogil:
    cdef uint64_t body, message
    cdef unsigned char* o
    if length < 0 or length > KF_MAX_MESSAGE_LENGTH:
        return -1
    body = kfc_data_body_size(connect_id, <uint64_t>length)
    message = 3 + kf_varint_size(body) + body     # 08 04 22 <body size> <body>
    if message > <uint64_t>KF_MAX_MESSAGE_LENGTH:
        return -1
    kfc_put_prefix(out, message)
    o = out + KF_GRPC_PREFIX_LEN
    o[0] = 0x08                                   # Packet.type = 1, varint: DATA (4)
    o[1] = KF_TYPE_DATA
    o[2] = (KF_MEMBER_DATA << 3) | 2              # Packet.data = 4, length-delimited
    o = kf_put_varint(o + 3, body)
    if connect_id != 0:
        o[0] = 0x08                               # Data.connectID = 1, varint
        o = kf_put_varint(o + 1, <uint64_t>connect_id)
    if length != 0:
        o[0] = 0x1A                               # Data.data = 3, length-delimited
        o = kf_put_varint(o + 1, <uint64_t>length)
    return o - out


cdef inline Py_ssize_t kfc_index(object value, int* overflow) except? -1:
    """An int argument as Py_ssize_t; *overflow is set (and the result meaningless) when it
    does not fit, so callers word the ValueError themselves."""
    if not PyLong_Check(value):
        raise TypeError(f"an int is required, not {type(value).__name__}")
    return <Py_ssize_t>PyLong_AsLongLongAndOverflow(value, overflow)


def message_prefix(length):
    """gRPC's 5-byte message prefix: flag 0 (not compressed), then the big-endian length."""
    cdef unsigned char out[KF_GRPC_PREFIX_LEN]
    cdef int overflow = 0
    cdef Py_ssize_t n = kfc_index(length, &overflow)
    if overflow or kf_message_prefix(out, n) < 0:
        raise ValueError(f"gRPC message length {length} does not fit 4 bytes")
    return PyBytes_FromStringAndSize(<char*>out, KF_GRPC_PREFIX_LEN)


def frame_message(msg):
    """msg (any bytes-like) with its gRPC prefix, as one bytes object."""
    cdef kf_buf b
    cdef unsigned char* out
    owner = kfc_acquire(msg, &b)
    try:
        if b.n > KF_MAX_MESSAGE_LENGTH:
            raise ValueError(f"gRPC message length {b.n} does not fit 4 bytes")
        result = PyBytes_FromStringAndSize(NULL, KF_GRPC_PREFIX_LEN + b.n)
        out = <unsigned char*>PyBytes_AS_STRING(result)
        kfc_put_prefix(out, <uint64_t>b.n)
        memcpy(out + KF_GRPC_PREFIX_LEN, b.p, b.n)
        return result
    finally:
        kfc_release(&b)


def data_header(connect_id, length):
    """The framed Packet(DATA, Data(connect_id, data=p)) up to where the len(p) == length
    payload bytes go: send header + p without copying p. About 0.1 us."""
    cdef unsigned char out[KF_DATA_HEADER_MAX]
    cdef int overflow = 0
    cdef Py_ssize_t n, size
    cdef long long cid
    n = kfc_index(length, &overflow)
    if (overflow and length < 0) or (not overflow and n < 0):
        raise ValueError(f"negative payload length {length}")
    cid = kfc_int64(connect_id)
    if not overflow:
        size = kf_data_header(out, cid, n)
        if size >= 0:
            return PyBytes_FromStringAndSize(<char*>out, size)
    # Too long for the 4-byte prefix: name the framed length, as the pure twin does.
    body = (1 + kfc_py_varint_size(cid) if cid else 0) + 1 + kfc_py_varint_size(length) + length
    framed = 3 + kfc_py_varint_size(body) + body
    raise ValueError(f"gRPC message length {framed} does not fit 4 bytes")


cdef object kfc_py_varint_size(object value):
    """Varint size of a Python int of any size (negative int64: 10 bytes), for messages."""
    if value < 0:
        value += 1 << 64
    return max(1, (value.bit_length() + 6) // 7)


cdef class MessageReader:
    """Reassembles gRPC length-prefixed messages from a stream of byte chunks.

    The prefix is checked as soon as it is complete: the length against max_message_size
    first (as grpc-go), then the flag (only 0: we negotiate no compression). Errors are
    sticky: every later feed raises the same exception again. At most max_message_size + 5
    bytes are held. Each message body is copied once, from the chunk into its bytes object:
    a body split over chunks is allocated at its announced size (bounded by the limit) and
    filled in place.
    """
    cdef object _max                     # max_message_size as given (it appears in messages)
    cdef long long _limit                # the same as a C integer, clamped to 0..2**32
    cdef unsigned char _head[KF_GRPC_PREFIX_LEN]
    cdef Py_ssize_t _head_len            # prefix bytes held; 5 while a body is being read
    cdef object _body                    # bytes being filled in place (never shared before
    cdef Py_ssize_t _body_len            # it is complete), or None; bytes of it filled
    cdef Py_ssize_t _need                # its full size
    cdef object _error                   # the GrpcFramingError raised, raised again
    cdef bint _busy                      # inside feed (see there)

    def __init__(self, max_message_size=DEFAULT_MAX_RECEIVE_MESSAGE_SIZE):
        if max_message_size < 0:
            raise ValueError(f"negative max_message_size {max_message_size}")
        self.max_message_size = max_message_size

    @property
    def max_message_size(self):
        return self._max

    @max_message_size.setter
    def max_message_size(self, value):
        if not PyLong_Check(value):
            raise TypeError(f"max_message_size needs an int, not {type(value).__name__}")
        self._max = value
        # No prefix can announce more than 2**32 - 1: anything above is "no limit".
        self._limit = -1 if value < 0 else min(value, 1 << 32)

    @property
    def pending(self):
        """Bytes buffered of a message not yet complete (its prefix included)."""
        return self._head_len + self._body_len

    cdef int _fail(self, object error) except -1:
        self._error = error
        self._head_len = 0
        self._body = None
        self._body_len = 0
        raise error

    cdef Py_ssize_t _check_prefix(self) except -1:
        cdef unsigned char* h = self._head
        cdef Py_ssize_t length = ((<Py_ssize_t>h[1] << 24) | (<Py_ssize_t>h[2] << 16)
                                  | (<Py_ssize_t>h[3] << 8) | h[4])
        if length > self._limit:
            return self._fail(MessageTooLargeError(
                f"grpc: received message larger than max ({length} vs. {self._max})"))
        if h[0] == KF_FLAG_COMPRESSED:
            return self._fail(CompressedMessageError(
                "grpc: compressed flag set with identity or empty encoding"))
        if h[0] != 0:
            return self._fail(InvalidFlagError(
                f"grpc: received unexpected payload format {<int>h[0]}"))
        return length

    def feed(self, data):
        """Adds a chunk (any bytes-like); returns the message bodies it completes. Messages
        completed earlier in a chunk that then raises are discarded with it."""
        cdef kf_buf b
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, take, length
        cdef list messages = []
        if self._error is not None:     # the same exception; a fresh traceback so that it
            raise self._error.with_traceback(None)   # does not grow with every raise
        # Allocations below may run the garbage collector, hence arbitrary finalizers; one
        # that fed this same reader would pull the body out from under the copy loop.
        if self._busy:
            raise RuntimeError("MessageReader.feed called from inside itself")
        owner = kfc_acquire(data, &b)
        self._busy = True
        try:
            p = b.p
            n = b.n
            while True:
                if self._body is None:
                    # Reading a prefix, which may itself be split across chunks.
                    take = min(KF_GRPC_PREFIX_LEN - self._head_len, n - pos)
                    memcpy(self._head + self._head_len, p + pos, take)
                    pos += take
                    self._head_len += take
                    if self._head_len < KF_GRPC_PREFIX_LEN:
                        break
                    length = self._check_prefix()
                    if length <= n - pos:               # the whole body is in this chunk
                        messages.append(PyBytes_FromStringAndSize(<char*>p + pos, length))
                        pos += length
                        self._head_len = 0
                        continue
                    self._body = PyBytes_FromStringAndSize(NULL, length)
                    self._body_len = 0
                    self._need = length
                take = min(self._need - self._body_len, n - pos)
                memcpy(PyBytes_AS_STRING(self._body) + self._body_len, p + pos, take)
                pos += take
                self._body_len += take
                if self._body_len < self._need:
                    break
                messages.append(self._body)
                self._body = None
                self._body_len = 0
                self._head_len = 0
        finally:
            self._busy = False
            kfc_release(&b)
        return messages
