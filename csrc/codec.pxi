# Packet codec, reading side: the compiled twin of konnectivity_fast/wire/_codec.py's
# decoder. The writing side (encode_packet, gRPC framing, the DATA fast path) is framing.pxi.
#
# One C-level parser, kf_parse(), reads a serialized Packet into a kf_packet struct: the type,
# which payload member, and the payload's fields as integers or as offsets into the caller's
# buffer. decode_packet, peek_packet and peek_data all run it, so they cannot disagree on what
# bytes mean or on which error they raise; only decode_packet then builds Python objects. The
# parser is plain C (noexcept nogil, no Python objects): every read is checked against the end
# of the enclosing message, so no input makes it read outside [p, p + n). On failure it records
# what went wrong and where, and kf_raise() turns that into the CodecError subclass and the
# text the pure twin raises for the same bytes, so the twins can be compared exactly.
#
# The wire rules are protobuf-go's (every upstream peer is Go); the pure twin's docstring
# lists them, and codec.py's docstring is the API contract.
#
# C-level API for the HTTP/2 engine (same module; kf_parse needs no GIL, the others may raise
# and so need it):
#   int kf_parse(const unsigned char* p, Py_ssize_t n, kf_packet* pkt) noexcept nogil
#       0 (KF_OK) or -1 with pkt.err set; never raises, never reads outside p[0:n].
#   int kf_raise(const kf_packet* pkt) except -1       raise the CodecError for pkt.err
#   int kf_peek(p, n, long long* type, long long* connect_id) except -1
#   int kf_peek_data(p, n, long long* connect_id, Py_ssize_t* offset, Py_ssize_t* length)
#       except -1: 1 for a DATA packet with a Data payload (data at p[offset:offset+length]),
#       0 for any other valid packet.

from libc.stdint cimport uint64_t, int32_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport (PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_CheckExact)
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.memoryview cimport PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_AsUTF8AndSize, PyUnicode_Check

from konnectivity_fast.wire.errors import (
    NestingError, TagError, TruncatedError, Utf8Error, VarintError,
)
from konnectivity_fast.wire.packets import (
    CloseDial, CloseRequest, CloseResponse, Data, DialRequest, DialResponse, Drain, FlowCredit,
    Packet,
)

cdef extern from "kf_codec.h":
    enum:
        KF_K_NONE
        KF_K_INT64
        KF_K_STRING
        KF_K_BYTES
    enum:
        KF_MEMBER_FLOW_CREDIT
        KF_ROW_FLOW_CREDIT
        KF_MEMBER_ROWS
    int kf_member_row(uint32_t field) noexcept nogil
    const unsigned char kf_member_field[KF_MEMBER_ROWS]
    const unsigned char kf_field_kind[KF_MEMBER_ROWS][4]
    const unsigned char kf_connect_id_field[KF_MEMBER_ROWS]
    int kf_varint_size(uint64_t v) noexcept nogil
    unsigned char* kf_put_varint(unsigned char* out, uint64_t v) noexcept nogil
    int kf_utf8_valid(const unsigned char* p, Py_ssize_t n) noexcept nogil
    object kf_alloc(object cls)
    int kf_slot_set(object obj, object descr, object value) except -1

cdef enum:
    # A varint carries 64 bits in 7-bit groups: 10 bytes at most, and the 10th may only hold
    # the 64th bit (0 or 1). Go's protowire rejects anything longer or larger; so do we.
    KF_MAX_VARINT_LEN = 10
    # Field numbers are 29 bits (the tag keeps 3 for the wire type); 0 is reserved. Go checks
    # this per message field...
    KF_MAX_FIELD = 536870911
    # ...but inside a skipped group it uses protowire.ConsumeTag, which only needs an int32.
    KF_MAX_GROUP_FIELD = 2147483647
    # Go's protowire.DefaultRecursionLimit: it counts down from it per open group and fails
    # below zero, so MAX_GROUP_NESTING + 1 groups may be open at once and no more. Each open
    # group costs a stack entry, which is why there is a cap at all.
    KF_MAX_GROUP_NESTING = 10000
    # Open groups' field numbers live on the C stack up to this depth (real traffic has no
    # groups); deeper nesting moves to one heap array of KF_MAX_GROUP_NESTING + 1 entries.
    KF_GROUP_STACK_INLINE = 32
    # Packet's own fields: type = 1, then the payload oneof: upstream's 2..8 (Data is 4) and
    # our flowCredit = 100, whose table row is 9 (kf_codec.h: kf_member_row).
    KF_FIELD_TYPE = 1
    KF_MEMBER_DATA = 4
    KF_TYPE_DATA = 4

# What went wrong (kf_packet.err), each with the pure twin's error class and text; the first
# problem met left to right wins.
cdef enum:
    KF_OK = 0
    KF_E_VARINT_END = 1    # TruncatedError: varint runs past its message (pos = that end)
    KF_E_VARINT_BIG = 2    # VarintError: 10th byte above 1 (pos = that byte)
    KF_E_LENGTH = 3        # TruncatedError: length a at pos (content start) runs past
    KF_E_FIXED = 4         # TruncatedError: fixed64/fixed32 at pos runs past
    KF_E_FIELD = 5         # TagError: field number a (0 or too large) before pos
    KF_E_WIRE = 6          # TagError: wire type a (6 or 7) before pos
    KF_E_STRAY_END = 7     # TagError: end-group of field a with no start, before pos
    KF_E_END_MISMATCH = 8  # TagError: end-group of field a closes the group of field b
    KF_E_NESTING = 9       # NestingError
    KF_E_UTF8 = 10         # Utf8Error: string at pos (content start)
    KF_E_NOMEM = 11        # MemoryError: the deep group stack could not be allocated

DEFAULT_MAX_RECEIVE_MESSAGE_SIZE = 4 * 1024 * 1024
MAX_GROUP_NESTING = KF_MAX_GROUP_NESTING

ctypedef struct kf_packet:
    int type              # Packet.type: low 32 bits of the last type varint, sign-extended
    int which             # payload member's row (kf_codec.h): its field number for 2..8,
                          # KF_ROW_FLOW_CREDIT for 100; 0 when there is none
    long long ival[4]     # int64 fields of the payload by field number (1..3)
    Py_ssize_t off[4]     # string/bytes fields by field number: offset in the buffer...
    Py_ssize_t len[4]     # ...and length (absent reads as empty, as in proto3)
    int err               # KF_OK or the KF_E_* met first; then:
    Py_ssize_t err_pos    # the offset the message names,
    uint64_t err_a        # and the values it names (field number, length, wire type)
    uint64_t err_b


# ---------------------------------------------------------------------------------------------
# The parser. Positions are absolute offsets into p and `end` is the end of the enclosing
# message. Helpers return the position after what they read, or -1 with pkt.err set.

cdef inline Py_ssize_t kfc_fail(kf_packet* pkt, int err, Py_ssize_t pos, uint64_t a = 0,
                                uint64_t b = 0) noexcept nogil:
    pkt.err = err
    pkt.err_pos = pos
    pkt.err_a = a
    pkt.err_b = b
    return -1


cdef inline Py_ssize_t kfc_varint(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                  uint64_t* out, kf_packet* pkt) noexcept nogil:
    cdef uint64_t v = 0, b
    cdef int i
    if pos < end and p[pos] < 0x80:   # one byte: tags, types, small lengths
        out[0] = p[pos]
        return pos + 1
    for i in range(KF_MAX_VARINT_LEN):
        if pos >= end:
            return kfc_fail(pkt, KF_E_VARINT_END, end)
        b = p[pos]
        if i == KF_MAX_VARINT_LEN - 1 and b > 1:
            return kfc_fail(pkt, KF_E_VARINT_BIG, pos)
        pos += 1
        v |= (b & 0x7F) << (7 * i)
        if b < 0x80:
            break
    out[0] = v                        # the loop always breaks: a 10th byte <= 1 ends it
    return pos


cdef inline Py_ssize_t kfc_tag(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                               uint64_t max_field, uint32_t* field, uint32_t* wire_type,
                               kf_packet* pkt) noexcept nogil:
    """A tag whose field number is 1..max_field; the wire type is checked where it is used."""
    cdef uint64_t v
    pos = kfc_varint(p, pos, end, &v, pkt)
    if pos < 0:
        return pos
    if (v >> 3) == 0 or (v >> 3) > max_field:
        return kfc_fail(pkt, KF_E_FIELD, pos, v >> 3)
    field[0] = <uint32_t>(v >> 3)
    wire_type[0] = <uint32_t>(v & 7)
    return pos


cdef inline Py_ssize_t kfc_length(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                  Py_ssize_t* length, kf_packet* pkt) noexcept nogil:
    """A length prefix whose content must fit before end; returns where the content starts."""
    cdef uint64_t v
    pos = kfc_varint(p, pos, end, &v, pkt)
    if pos < 0:
        return pos
    if v > <uint64_t>(end - pos):
        return kfc_fail(pkt, KF_E_LENGTH, pos, v)
    length[0] = <Py_ssize_t>v
    return pos


cdef Py_ssize_t kfc_skip_group(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                               uint32_t field, kf_packet* pkt) noexcept nogil:
    """Skips an unknown group whose start tag (of `field`) was just read. Iterative: the open
    groups' field numbers sit on an explicit stack, as each end-group must match its start."""
    cdef uint32_t inline_stack[KF_GROUP_STACK_INLINE]
    cdef uint32_t* stack = inline_stack
    cdef uint32_t* grown
    cdef Py_ssize_t depth = 1
    cdef uint32_t f, wt
    stack[0] = field
    while depth > 0:
        pos = kfc_tag(p, pos, end, KF_MAX_GROUP_FIELD, &f, &wt, pkt)
        if pos < 0:
            break
        if wt == 4:                                  # end-group: closes the innermost start
            if f != stack[depth - 1]:
                pos = kfc_fail(pkt, KF_E_END_MISMATCH, pos, f, stack[depth - 1])
                break
            depth -= 1
        elif wt == 3:                                # a nested start-group
            if depth > KF_MAX_GROUP_NESTING:
                pos = kfc_fail(pkt, KF_E_NESTING, pos)
                break
            if depth == KF_GROUP_STACK_INLINE:
                grown = <uint32_t*>malloc((KF_MAX_GROUP_NESTING + 1) * sizeof(uint32_t))
                if grown == NULL:
                    pos = kfc_fail(pkt, KF_E_NOMEM, pos)
                    break
                memcpy(grown, stack, depth * sizeof(uint32_t))
                stack = grown
            stack[depth] = f
            depth += 1
        else:                                        # a scalar: never recurses back here
            pos = kfc_skip(p, pos, end, f, wt, pkt)
            if pos < 0:
                break
    if stack != inline_stack:
        free(stack)
    return pos


cdef Py_ssize_t kfc_skip(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                         uint32_t field, uint32_t wire_type, kf_packet* pkt) noexcept nogil:
    """Skips the value of an unknown field (or a known one with the wrong wire type)."""
    cdef uint64_t v
    cdef Py_ssize_t n
    if wire_type == 0:
        return kfc_varint(p, pos, end, &v, pkt)
    if wire_type == 2:
        pos = kfc_length(p, pos, end, &n, pkt)
        return pos + n if pos >= 0 else pos
    if wire_type == 1 or wire_type == 5:
        n = 8 if wire_type == 1 else 4
        return pos + n if end - pos >= n else kfc_fail(pkt, KF_E_FIXED, pos)
    if wire_type == 4:
        return kfc_fail(pkt, KF_E_STRAY_END, pos, field)
    if wire_type == 3:
        return kfc_skip_group(p, pos, end, field, pkt)
    return kfc_fail(pkt, KF_E_WIRE, pos, wire_type)


cdef Py_ssize_t kfc_parse_payload(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end,
                                  kf_packet* pkt) noexcept nogil:
    """Parses one occurrence of the payload member in row pkt.which in p[pos:end], merging
    into pkt: the fields it holds overwrite, the others keep their values."""
    cdef const unsigned char* kinds = kf_field_kind[pkt.which]
    cdef uint32_t field, wt
    cdef int kind
    cdef uint64_t v
    cdef Py_ssize_t n
    while pos < end:
        pos = kfc_tag(p, pos, end, KF_MAX_FIELD, &field, &wt, pkt)
        if pos < 0:
            return pos
        kind = kinds[field] if field <= 3 else KF_K_NONE
        if kind == KF_K_INT64 and wt == 0:
            pos = kfc_varint(p, pos, end, &v, pkt)
            if pos < 0:
                return pos
            pkt.ival[field] = <long long>v   # two's complement, as Go's int64(v)
        elif (kind == KF_K_STRING or kind == KF_K_BYTES) and wt == 2:
            pos = kfc_length(p, pos, end, &n, pkt)
            if pos < 0:
                return pos
            if kind == KF_K_STRING and not kf_utf8_valid(p + pos, n):
                return kfc_fail(pkt, KF_E_UTF8, pos)
            pkt.off[field] = pos
            pkt.len[field] = n
            pos += n
        else:
            pos = kfc_skip(p, pos, end, field, wt, pkt)
            if pos < 0:
                return pos
    return pos


cdef inline void kfc_clear_payload(kf_packet* pkt) noexcept nogil:
    cdef int i
    for i in range(4):
        pkt.ival[i] = 0
        pkt.off[i] = 0
        pkt.len[i] = 0


cdef int kf_parse(const unsigned char* p, Py_ssize_t n, kf_packet* pkt) noexcept nogil:
    """Parses the serialized Packet p[0:n] into *pkt (every field is written). Returns KF_OK
    (0), or -1 with the first problem met in pkt.err/err_pos/err_a/err_b (see kf_raise).
    Reads nothing outside p[0:n]; p only needs to stay valid during the call."""
    cdef Py_ssize_t pos = 0, length
    cdef uint32_t field, wt
    cdef uint64_t v
    cdef int row
    pkt.type = 0
    pkt.which = 0
    kfc_clear_payload(pkt)
    pkt.err = KF_OK
    while pos < n:
        pos = kfc_tag(p, pos, n, KF_MAX_FIELD, &field, &wt, pkt)
        if pos < 0:
            return -1
        if field == KF_FIELD_TYPE and wt == 0:
            pos = kfc_varint(p, pos, n, &v, pkt)
            if pos < 0:
                return -1
            pkt.type = <int32_t><uint32_t>v        # an int32 enum: the low 32 bits
        else:
            row = kf_member_row(field) if wt == 2 else 0
            if row != 0:                            # a payload member (2..8, or 100)
                pos = kfc_length(p, pos, n, &length, pkt)
                if pos < 0:
                    return -1
                if row != pkt.which:                # a different member replaces the payload
                    pkt.which = row
                    kfc_clear_payload(pkt)
                pos = kfc_parse_payload(p, pos, pos + length, pkt)
            else:
                pos = kfc_skip(p, pos, n, field, wt, pkt)
        if pos < 0:
            return -1
    return KF_OK


cdef int kf_raise(const kf_packet* pkt) except -1:
    """Raises the CodecError that pkt.err stands for, worded as the pure twin words it."""
    cdef int err = pkt.err
    pos = pkt.err_pos
    a = pkt.err_a
    if err == KF_E_VARINT_END:
        raise TruncatedError(f"varint runs past the end of its message at offset {pos}")
    if err == KF_E_VARINT_BIG:
        raise VarintError(f"varint overflows 64 bits at offset {pos}")
    if err == KF_E_LENGTH:
        raise TruncatedError(f"length {a} at offset {pos} runs past the end of its message")
    if err == KF_E_FIXED:
        raise TruncatedError(f"fixed-size value at offset {pos} runs past the end")
    if err == KF_E_FIELD:
        raise TagError(f"invalid field number {a} before offset {pos}")
    if err == KF_E_WIRE:
        raise TagError(f"wire type {a} does not exist (before offset {pos})")
    if err == KF_E_STRAY_END:
        raise TagError(f"end-group for field {a} without a start, before offset {pos}")
    if err == KF_E_END_MISMATCH:
        raise TagError(f"end-group for field {a} closes the group of field {pkt.err_b}")
    if err == KF_E_NESTING:
        raise NestingError(f"groups nested deeper than {KF_MAX_GROUP_NESTING}")
    if err == KF_E_UTF8:
        raise Utf8Error(f"string field at offset {pos} is not valid UTF-8")
    if err == KF_E_NOMEM:
        raise MemoryError()
    raise SystemError(f"kf_raise: no codec error recorded ({err})")


cdef int kf_peek(const unsigned char* p, Py_ssize_t n, long long* type,
                 long long* connect_id) except -1:
    """The type and the payload's connectID (0 if it has none) of the Packet p[0:n], equal to
    decode_packet's; raises what decode_packet raises."""
    cdef kf_packet pkt
    if kf_parse(p, n, &pkt) != KF_OK:
        return kf_raise(&pkt)
    type[0] = pkt.type
    connect_id[0] = pkt.ival[kf_connect_id_field[pkt.which]]   # ival[0] is always 0
    return 0


cdef int kf_peek_data(const unsigned char* p, Py_ssize_t n, long long* connect_id,
                      Py_ssize_t* offset, Py_ssize_t* length) except -1:
    """1 for a DATA packet with a Data payload, setting its connectID and where its data
    bytes lie in p (the last occurrence; length 0 when absent); 0 for any other valid packet;
    raises as decode_packet. Outputs are only written when returning 1."""
    cdef kf_packet pkt
    if kf_parse(p, n, &pkt) != KF_OK:
        return kf_raise(&pkt)
    if pkt.type != KF_TYPE_DATA or pkt.which != KF_MEMBER_DATA:
        return 0
    connect_id[0] = pkt.ival[1]
    offset[0] = pkt.off[3]
    length[0] = pkt.len[3]
    return 1


# ---------------------------------------------------------------------------------------------
# Python API: buffers in, without copying.

ctypedef struct kf_buf:
    const unsigned char* p     # the bytes...
    Py_ssize_t n               # ...and their count
    bint held                  # view holds a buffer export that kfc_release must release
    Py_buffer view


cdef object kfc_acquire(object buf, kf_buf* b):
    """Points b at buf's bytes and returns the object that owns them; the caller must call
    kfc_release(b) (also on errors). bytes skips the buffer protocol. A buffer that cannot be
    exported flat (a non-contiguous memoryview) is read from a copy, as the pure twin's
    bytes(buf) does."""
    b.held = False
    if not PyBytes_CheckExact(buf):
        try:
            PyObject_GetBuffer(buf, &b.view, PyBUF_SIMPLE)
            b.held = True
            b.p = <const unsigned char*>b.view.buf
            b.n = b.view.len
            return buf
        except BufferError:
            buf = memoryview(buf).tobytes()
    b.p = <const unsigned char*>PyBytes_AS_STRING(buf)
    b.n = PyBytes_GET_SIZE(buf)
    return buf


cdef inline void kfc_release(kf_buf* b) noexcept:
    if b.held:
        b.held = False
        PyBuffer_Release(&b.view)


cdef inline str kfc_str(const unsigned char* p, const kf_packet* pkt, int field):
    if pkt.len[field] == 0:
        return ""
    return PyUnicode_DecodeUTF8(<char*>p + pkt.off[field], pkt.len[field], NULL)


# Decoded values are made without running the dataclasses' __init__: a frozen dataclass sets
# each field through object.__setattr__, which was most of decode_packet's time. A fresh
# instance gets its slots filled directly instead. _kfc_direct_slots() checks at import that
# the classes are what this relies on (slotted dataclasses with exactly these fields, no
# __post_init__, no own __new__) and that the result equals the constructor's; otherwise
# kfc_descrs stays None and the classes are simply called. (A hand-written __init__ that
# converted its arguments would defeat this; packets.py's values are plain by design.)
cdef list kfc_descrs = None   # by payload member row (kf_packet.which), 0 for Packet: member
                              # descriptors


cdef inline object kfc_make(object cls, int which, object a, object b, object c, int n):
    """cls(a, b, c) with its first n arguments (which indexes kfc_descrs)."""
    cdef tuple d
    if kfc_descrs is None:
        return (cls(a, b, c) if n == 3 else cls(a, b) if n == 2 else cls(a) if n == 1
                else cls())
    d = <tuple>kfc_descrs[which]
    obj = kf_alloc(cls)
    if n > 0:
        kf_slot_set(obj, d[0], a)
    if n > 1:
        kf_slot_set(obj, d[1], b)
    if n > 2:
        kf_slot_set(obj, d[2], c)
    return obj


cdef object kfc_build_payload(const unsigned char* p, const kf_packet* pkt):
    cdef int w = pkt.which
    if w == KF_MEMBER_DATA:
        return kfc_make(Data, w, pkt.ival[1], kfc_str(p, pkt, 2),
                        PyBytes_FromStringAndSize(<char*>p + pkt.off[3], pkt.len[3]), 3)
    if w == 2:
        return kfc_make(DialRequest, w, kfc_str(p, pkt, 1), kfc_str(p, pkt, 2), pkt.ival[3], 3)
    if w == 3:
        return kfc_make(DialResponse, w, kfc_str(p, pkt, 1), pkt.ival[2], pkt.ival[3], 3)
    if w == 5:
        return kfc_make(CloseRequest, w, pkt.ival[1], None, None, 1)
    if w == 6:
        return kfc_make(CloseResponse, w, kfc_str(p, pkt, 1), pkt.ival[2], None, 2)
    if w == 7:
        return kfc_make(CloseDial, w, pkt.ival[1], None, None, 1)
    if w == 8:
        return kfc_make(Drain, w, None, None, None, 0)
    if w == KF_ROW_FLOW_CREDIT:
        return kfc_make(FlowCredit, w, pkt.ival[1], pkt.ival[2], None, 2)
    return None


def _kfc_direct_slots():
    """Member descriptors by payload member row for kfc_make, or None if the shortcut is
    unsafe."""
    import dataclasses
    from types import MemberDescriptorType
    classes = {0: (Packet, ("type", "payload")),
               2: (DialRequest, ("protocol", "address", "random")),
               3: (DialResponse, ("error", "connect_id", "random")),
               4: (Data, ("connect_id", "error", "data")), 5: (CloseRequest, ("connect_id",)),
               6: (CloseResponse, ("error", "connect_id")), 7: (CloseDial, ("random",)),
               8: (Drain, ()), KF_ROW_FLOW_CREDIT: (FlowCredit, ("connect_id", "bytes"))}
    descrs = [()] * KF_MEMBER_ROWS
    for which, (cls, names) in classes.items():
        if (not dataclasses.is_dataclass(cls) or cls.__new__ is not object.__new__
                or hasattr(cls, "__post_init__") or "__dict__" in dir(cls)
                or tuple(f.name for f in dataclasses.fields(cls)) != names
                or not all(type(cls.__dict__.get(n)) is MemberDescriptorType for n in names)):
            return None
        descrs[which] = tuple(cls.__dict__[n] for n in names)
        values = [f"{n}!" if n in ("protocol", "address", "error") else
                  b"x" if n == "data" else 7 for n in names]
        made = kf_alloc(cls)
        for d, v in zip(descrs[which], values):
            kf_slot_set(made, d, v)
        if made != cls(*values) or hash(made) != hash(cls(*values)):
            return None
    return descrs

try:
    kfc_descrs = _kfc_direct_slots()
except Exception:
    kfc_descrs = None


def decode_packet(buf):
    """Decodes one serialized Packet (bytes, bytearray or memoryview); malformed input raises
    a CodecError subclass. Data.data is a copy (bytes)."""
    cdef kf_buf b
    cdef kf_packet pkt
    owner = kfc_acquire(buf, &b)
    try:
        if kf_parse(b.p, b.n, &pkt) != KF_OK:
            kf_raise(&pkt)
        return kfc_make(Packet, 0, pkt.type, kfc_build_payload(b.p, &pkt), None, 2)
    finally:
        kfc_release(&b)


def peek_packet(buf):
    """(type, connectID of the payload or 0), as decode_packet would give; raises as it."""
    cdef kf_buf b
    cdef long long type = 0, connect_id = 0
    owner = kfc_acquire(buf, &b)
    try:
        kf_peek(b.p, b.n, &type, &connect_id)
    finally:
        kfc_release(&b)
    return (type, connect_id)


# peek_data's view is made by narrowing a fresh memoryview of the whole buffer in place:
# buf/len/shape of its private Py_buffer copy, exactly what memoryview slicing does to the
# new view it makes, but without the slice object and the second view (a third of peek_data's
# time). Only for plain 1-D contiguous byte views, and only if the import-time self-test
# _kfc_narrow_works() finds memoryviews behaving as expected; else ordinary slicing.
cdef bint kfc_narrow_ok = False


cdef object kfc_byte_view(object buf, Py_ssize_t offset, Py_ssize_t length):
    """A memoryview of bytes offset..offset+length of buf, sharing (and keeping alive) its
    memory; a view of another format or shape is cast to bytes first, as the pure twin does."""
    cdef object mv = PyMemoryView_FromObject(buf)
    cdef Py_buffer* b = PyMemoryView_GET_BUFFER(mv)
    if b.ndim != 1 or b.format == NULL or b.format[0] != b'B' or b.format[1] != 0:
        mv = mv.cast("B")
    elif (kfc_narrow_ok and b.strides[0] == 1 and b.suboffsets == NULL
            and offset + length <= b.len):   # buf may export other memory than it did
        b.buf = <char*>b.buf + offset      # mv is ours alone: nobody has seen it yet
        b.len = length
        b.shape[0] = length
        return mv
    return mv[offset:offset + length]


def _kfc_narrow_works():
    """True when views narrowed by kfc_byte_view behave as sliced ones (checked at import)."""
    for source in (b"0123456789", bytearray(b"0123456789"), memoryview(b"0123456789")):
        view = kfc_byte_view(source, 2, 5)
        if (bytes(view) != b"23456" or len(view) != 5 or view.nbytes != 5
                or view.shape != (5,) or not view.c_contiguous or bytes(view[1:3]) != b"34"
                or view.tobytes() != b"23456" or view.cast("B").tobytes() != b"23456"
                or view != memoryview(b"23456") or view.obj is not (
                    source.obj if isinstance(source, memoryview) else source)):
            return False
        view.release()
    return True

kfc_narrow_ok = True
try:
    kfc_narrow_ok = _kfc_narrow_works()
except Exception:
    kfc_narrow_ok = False


def peek_data(buf):
    """(connectID, zero-copy memoryview of the data bytes in buf) for a DATA packet with a
    Data payload; None for any other valid packet; raises as decode_packet would."""
    cdef kf_buf b
    cdef long long connect_id = 0
    cdef Py_ssize_t offset = 0, length = 0
    cdef int is_data
    owner = kfc_acquire(buf, &b)
    try:
        is_data = kf_peek_data(b.p, b.n, &connect_id, &offset, &length)
    finally:
        kfc_release(&b)
    if not is_data:
        return None
    return (connect_id, kfc_byte_view(buf, offset, length))
