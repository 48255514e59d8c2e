/* C helpers of the compiled Packet codec (csrc/codec.pxi).
 *
 * Only what is clearer or faster in plain C lives here: the tables that describe the payload
 * messages, varint sizing, and the UTF-8 check. Everything is static inline and bounds-checked
 * by its caller's contract (pointer + length), so the parser stays free of undefined
 * behaviour on any input.
 */
#ifndef KF_CODEC_H
#define KF_CODEC_H

#include <Python.h>
#include <structmember.h> /* PyMemberDef, PyMember_SetOne (in Python.h only from 3.12) */
#include <stdint.h>
#include <string.h>

/* Kind of a payload field, which decides the wire type it must arrive with to be "known". */
enum {
    KF_K_NONE = 0,   /* not a field of this message: skipped as unknown */
    KF_K_INT64 = 1,  /* varint, two's complement int64 */
    KF_K_STRING = 2, /* length-delimited, must be valid UTF-8 */
    KF_K_BYTES = 3   /* length-delimited, any bytes */
};

/* Packet's payload members and the rows of the tables below.
 *
 * The oneof members are upstream's field numbers 2..8 and konnectivity-fast's own
 * `FlowCredit flowCredit = 100` (extension flow.v1), numbered far away so that no member
 * upstream adds can collide with it. The tables are indexed by a member's *row*: for 2..8
 * the row is the field number itself (so the upstream members, the hot path, index them
 * with no translation at all), and member 100 takes the next free row, 9. A table indexed
 * by field number would need 101 rows, 92 of them empty, and grow again with the next
 * extension member; a row map keeps the tables dense and the lookup one compare for
 * upstream's members. kf_parse stores the row in kf_packet.which; kf_member_field maps it
 * back to the field number for the encoder. Rows 0 and 1 are not payload members (0 means
 * "no payload"). */
#define KF_MEMBER_FLOW_CREDIT 100 /* FlowCredit flowCredit = 100 (flow.v1) */
#define KF_ROW_FLOW_CREDIT 9
#define KF_MEMBER_ROWS 10

/* The row of Packet field `field` if it is a payload member, else 0. */
static inline int kf_member_row(uint32_t field) {
    if (field - 2u <= 6u) /* 2..8 (unsigned: 0 and 1 wrap around to large values) */
        return (int)field;
    return field == KF_MEMBER_FLOW_CREDIT ? KF_ROW_FLOW_CREDIT : 0;
}

/* The field number in Packet of the member in each row (0 for rows 0 and 1). */
static const unsigned char kf_member_field[KF_MEMBER_ROWS] = {0, 0, 2, 3, 4, 5, 6, 7, 8,
                                                              KF_MEMBER_FLOW_CREDIT};

/* kf_field_kind[row][field]: the payload messages only use field numbers 1..3. */
static const unsigned char kf_field_kind[KF_MEMBER_ROWS][4] = {
    {0, 0, 0, 0},
    {0, 0, 0, 0},
    {0, KF_K_STRING, KF_K_STRING, KF_K_INT64}, /* 2 DialRequest{protocol, address, random} */
    {0, KF_K_STRING, KF_K_INT64, KF_K_INT64},  /* 3 DialResponse{error, connectID, random} */
    {0, KF_K_INT64, KF_K_STRING, KF_K_BYTES},  /* 4 Data{connectID, error, data} */
    {0, KF_K_INT64, 0, 0},                     /* 5 CloseRequest{connectID} */
    {0, KF_K_STRING, KF_K_INT64, 0},           /* 6 CloseResponse{error, connectID} */
    {0, KF_K_INT64, 0, 0},                     /* 7 CloseDial{random} */
    {0, 0, 0, 0},                              /* 8 Drain{} */
    {0, KF_K_INT64, KF_K_INT64, 0},            /* 9 (member 100) FlowCredit{connectID, bytes} */
};

/* The field number of connectID in the member of each row, 0 for members without one. */
static const unsigned char kf_connect_id_field[KF_MEMBER_ROWS] = {0, 0, 0, 2, 1, 1, 2, 0, 0, 1};

/* Bytes of the base-128 varint of v: 1..10. */
static inline int kf_varint_size(uint64_t v) {
    return 1 + (63 - __builtin_clzll(v | 1)) / 7;
}

/* Writes the varint of v at out (room for 10 bytes is the caller's duty); returns the end. */
static inline unsigned char *kf_put_varint(unsigned char *out, uint64_t v) {
    while (v >= 0x80) {
        *out++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *out++ = (unsigned char)v;
    return out;
}

/* 1 when p[0:n] is well-formed UTF-8 as Python's strict 'utf-8' codec and Go's utf8.Valid
 * define it: no overlong forms, no surrogates (U+D800..DFFF), nothing above U+10FFFF. */
static inline int kf_utf8_valid(const unsigned char *p, ptrdiff_t n) {
    const unsigned char *end = p + n;
    while (p < end) {
        /* ASCII runs dominate (addresses, "tcp"): test 8 bytes per step. */
        while (end - p >= 8) {
            uint64_t w;
            memcpy(&w, p, 8);
            if (w & UINT64_C(0x8080808080808080))
                break;
            p += 8;
        }
        if (p >= end)
            break;
        unsigned char c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        /* lo/hi bound the second byte; the rest are plain continuation bytes 80..BF. */
        int len;
        unsigned char lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            if (c == 0xE0) lo = 0xA0;      /* overlong below U+0800 */
            else if (c == 0xED) hi = 0x9F; /* surrogates */
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            if (c == 0xF0) lo = 0x90;      /* overlong below U+10000 */
            else if (c == 0xF4) hi = 0x8F; /* above U+10FFFF */
        } else {
            return 0; /* 80..C1 (continuation or overlong lead) and F5..FF */
        }
        if (end - p < len)
            return 0;
        if (p[1] < lo || p[1] > hi)
            return 0;
        for (int i = 2; i < len; i++) {
            if (p[i] < 0x80 || p[i] > 0xBF)
                return 0;
        }
        p += len;
    }
    return 1;
}

/* A new instance of cls with every slot unset, as object.__new__(cls) makes it. */
static inline PyObject *kf_alloc(PyObject *cls) {
    PyTypeObject *t = (PyTypeObject *)cls;
    return t->tp_alloc(t, 0);
}

/* Stores value in the __slots__ slot that the member descriptor descr describes: what
 * object.__setattr__ does in the end, without looking the name up. The caller checked (once)
 * that descr is a member descriptor of obj's exact type. */
static inline int kf_slot_set(PyObject *obj, PyObject *descr, PyObject *value) {
    return PyMember_SetOne((char *)obj, ((PyMemberDescrObject *)descr)->d_member, value);
}

#endif /* KF_CODEC_H */
