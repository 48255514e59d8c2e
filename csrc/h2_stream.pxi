# One HTTP/2 stream's gRPC state: inbound message reassembly and the outbound queue.

from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.math cimport ceil
from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize

# gRPC's length prefix: 1 flag byte + 4-byte big-endian length.
cdef enum:
    _GRPC_PREFIX = 5

cdef class H2Connection  # forward declaration: defined in h2_connection.pxi


cdef class _Stream:
    """State of one stream. Owned by its H2Connection, which passes itself in."""

    cdef int32_t id
    # Received header block being assembled (list of (bytes, bytes)) and its size.
    cdef list headers
    cdef Py_ssize_t header_bytes
    cdef bint header_overflow
    cdef int header_blocks      # HEADERS blocks seen (client role: 1 response, 2 trailers)
    # Inbound gRPC reassembly: a partial prefix in `prefix`, then the message body.
    cdef uint8_t prefix[5]
    cdef int prefix_len
    cdef bytes body             # preallocated message being filled, or None
    cdef Py_ssize_t body_len
    cdef Py_ssize_t body_fill
    # Flow control: bytes received but not yet given back to the peer.
    cdef Py_ssize_t unconsumed
    cdef bint paused
    # Outbound queue: buffers (bytes-like, referenced not copied), the offset into the
    # first one, and the total not yet framed.
    cdef list outq
    cdef Py_ssize_t out_off
    cdef Py_ssize_t out_pending
    cdef bint deferred          # nghttp2 is waiting for resume_data
    cdef bint provider          # a data provider is attached (headers submitted)
    cdef bint end_queued        # client: half-close once the queue drains
    cdef list trailers          # server: trailers to send once the queue drains
    cdef bint local_done        # no more application output accepted
    cdef bint remote_ended      # the peer sent END_STREAM
    cdef bint finished          # the call's outcome has been reported (client: trailers)
    cdef bint failed            # inbound framing failed: ignore further data
    cdef bint reset_sent        # we submitted RST_STREAM (nghttp2 may reset it too)
    # Server role: the event batch (H2Connection._batches) that carries this stream's
    # EV_REQUEST, or -1: a reset before that batch is taken hides the stream (h2_flood.pxi).
    cdef Py_ssize_t announced_in

    def __cinit__(self):
        self.headers = []
        self.outq = []
        self.body = None
        self.announced_in = -1

    cdef int feed(self, H2Connection conn, const uint8_t *p, Py_ssize_t n) except -1:
        """Reassemble gRPC messages from one DATA chunk, emitting EV_MESSAGE for each."""
        cdef Py_ssize_t take, length
        cdef uint8_t flag
        cdef bytes msg
        while n > 0 and not self.failed:
            if self.body is None:
                take = min(_GRPC_PREFIX - self.prefix_len, n)
                memcpy(&self.prefix[self.prefix_len], p, take)
                self.prefix_len += <int>take
                p += take
                n -= take
                if self.prefix_len < _GRPC_PREFIX:
                    return 0
                self.prefix_len = 0
                flag = self.prefix[0]
                length = ((<Py_ssize_t>self.prefix[1] << 24) | (self.prefix[2] << 16)
                          | (self.prefix[3] << 8) | self.prefix[4])
                if flag != 0:
                    conn._fail_stream(self, GRPC_INTERNAL, _flag_error(flag))
                    return 0
                if length > conn.max_message_size:
                    conn._fail_stream(
                        self, GRPC_RESOURCE_EXHAUSTED,
                        f"grpc: received message larger than max "
                        f"({length} vs. {conn.max_message_size})")
                    return 0
                if length <= n:
                    # The whole message is in this chunk: one copy, straight to bytes.
                    msg = PyBytes_FromStringAndSize(<const char *>p, length)
                    p += length
                    n -= length
                    conn._emit_message(self.id, msg)
                    continue
                self.body = PyBytes_FromStringAndSize(NULL, length)
                self.body_len = length
                self.body_fill = 0
            take = min(self.body_len - self.body_fill, n)
            memcpy(PyBytes_AS_STRING(self.body) + self.body_fill, p, take)
            self.body_fill += take
            p += take
            n -= take
            if self.body_fill == self.body_len:
                msg = self.body
                self.body = None
                conn._emit_message(self.id, msg)
        return 0

    cdef bint partial(self):
        return self.prefix_len > 0 or self.body is not None

    cdef int queue(self, object buf) except -1:
        cdef Py_ssize_t n = len(buf)
        if n:
            self.outq.append(buf)
            self.out_pending += n
        return 0

    cdef int drain_into(self, H2Connection conn, Py_ssize_t length) except -1:
        """Copy `length` queued bytes into the connection's output (one DATA frame)."""
        cdef Py_buffer view
        cdef Py_ssize_t take
        cdef object head
        while length > 0:
            head = self.outq[0]
            PyObject_GetBuffer(head, &view, PyBUF_SIMPLE)
            try:
                take = min(view.len - self.out_off, length)
                conn._append_out(<const uint8_t *>view.buf + self.out_off, take)
            finally:
                PyBuffer_Release(&view)
            self.out_off += take
            self.out_pending -= take
            length -= take
            if self.out_off == len(head):
                del self.outq[0]
                self.out_off = 0
        return 0


cdef str _flag_error(uint8_t flag):
    if flag == 1:
        return "grpc: compressed flag set with identity or empty encoding"
    return f"grpc: received unexpected payload format {flag}"
