# H2Connection: one sans-IO HTTP/2 + gRPC connection over libnghttp2, server or client role.
#
# Bytes in (receive_data), events out (H2Event), messages and trailers queued, one batch of
# bytes to send (data_to_send). No sockets, no clock: time comes in as `now` arguments.
#
# Invariants:
# - Every stream nghttp2 knows and we have accepted has one _Stream in self._streams, removed
#   in the stream-close callback after its H2Event EV_CLOSED is queued; EV_CLOSED is the
#   last event of a stream.
# - Window updates follow consumption: bytes received on a stream are given back to the peer
#   (nghttp2_session_consume) in data_to_send(), i.e. after the application has handled the
#   events carrying them, and never while the application holds the stream paused
#   (pause_reading). A paused stream therefore buffers at most its window.
# - Outbound messages are queued as references (no copy) and copied once, into the output
#   buffer, when nghttp2 frames them (NO_COPY data source + send_data callback).
# - A Python exception inside an nghttp2 callback fails the callback and is re-raised from
#   the public method that drove nghttp2: callbacks never swallow errors.

include "nghttp2.pxi"
include "grpc_headers.pxi"
include "h2_keepalive.pxi"
include "h2_stream.pxi"
include "h2_flood.pxi"

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

# Limits and defaults. Each bounds memory or matches what grpc-go peers expect.

# Streams one peer may hold open at once. Each idle stream costs ~1.5 KiB here; grpc-go sets
# no limit, and kube-apiserver's reusable tunnel opens one stream per dial, so the bound is
# generous: it caps per-connection state, not normal use.
DEFAULT_MAX_CONCURRENT_STREAMS = 10000
# Bytes a peer may send on one stream before we consume them. This is the most a paused
# stream buffers, so it is the per-tunnel buffer of a gRPC frontend tunnel.
DEFAULT_STREAM_WINDOW = 1 << 20
# Connection-level window. It is given back as soon as bytes arrive (as grpc-go does), so it
# only paces the transport; the per-stream windows bound what paused streams hold.
DEFAULT_CONNECTION_WINDOW = 16 << 20
# Request/response header lists above this are refused (RST_STREAM FRAME_SIZE_ERROR, as
# grpc-go does for a truncated header block). Konnectivity metadata, a bearer token
# included, is a few KiB.
DEFAULT_MAX_HEADER_LIST_SIZE = 64 << 10
# grpc-go: a client ping that breaks the policy is a strike; more than this many strikes
# get GOAWAY ENHANCE_YOUR_CALM "too_many_pings".
MAX_PING_STRIKES = 2
# grpc-go: with no active stream and pings-without-streams not permitted, pings closer
# together than this (2 h) are strikes.
PING_IDLE_INTERVAL = 7200.0
# grpc-go's default wait for a keepalive ping's ACK.
DEFAULT_KEEPALIVE_TIMEOUT = 20.0
# Frames of SETTINGS/PING ACKs nghttp2 may queue for a peer that does not read: a flood
# guard (nghttp2's own default is 1000). The adapter stops reading a peer that does not
# read long before (transport/grpc.py MAX_QUEUED_RESPONSE_FRAMES, grpc-go's 50), so only a
# burst of over 1000 such frames in one read reaches it: GOAWAY ENHANCE_YOUR_CALM.
MAX_OUTBOUND_ACK = 1000

_KEEPALIVE_OPAQUE = b"kf-alive"

# Event kinds (H2Event.kind). `cpdef enum`: C constants inside the engine and, under the same
# names, plain int constants of the Python module (the adapter compares H2Event.kind with them).
cpdef enum:
    EV_REQUEST = 1      # server: a new stream; path, metadata, authority, timeout
    EV_HEADERS = 2      # client: response headers; metadata
    EV_MESSAGE = 3      # a complete gRPC message; data (bytes, without the 5-byte prefix)
    EV_END = 4          # server: the client half-closed the stream
    EV_TRAILERS = 5     # client: the call finished; status, message, metadata
    EV_ABORTED = 6      # server: we failed the call ourselves (status, message sent as trailers)
    EV_CLOSED = 7       # the stream is gone; error_code is the RST_STREAM code (0 if clean)
    EV_PING_ACK = 8     # an ACK of our PING arrived; data is its opaque payload
    EV_GOAWAY = 9       # the peer sent GOAWAY; stream_id is last-stream-id, error_code, data
    EV_ERROR = 10       # the connection is unusable; message says why. Flush data_to_send, close.

# HTTP/2 error codes (RFC 9113 section 7) that the Python side compares EV_CLOSED's and
# EV_GOAWAY's error_code with; their values come from nghttp2.h.
cpdef enum:
    H2_NO_ERROR = NGHTTP2_NO_ERROR
    H2_CANCEL = NGHTTP2_CANCEL

cdef class H2Event:
    """One thing that happened on the connection. Fields not meaningful for a kind are
    None/0; see the EV_* constants for which are."""

    cdef readonly int kind
    cdef readonly int stream_id
    cdef readonly object path
    cdef readonly object metadata
    cdef readonly object data
    cdef readonly int status
    cdef readonly object message
    cdef readonly unsigned int error_code
    cdef readonly object authority
    cdef readonly object timeout

    def __repr__(self):
        return (f"H2Event(kind={self.kind}, stream_id={self.stream_id}, path={self.path!r}, "
                f"status={self.status}, message={self.message!r}, "
                f"error_code={self.error_code}, data_len="
                f"{None if self.data is None else len(self.data)})")


cdef inline H2Event _event(int kind, int stream_id):
    cdef H2Event ev = H2Event.__new__(H2Event)
    ev.kind = kind
    ev.stream_id = stream_id
    return ev


# ---- nghttp2 callbacks: thin trampolines into H2Connection methods -------------------

cdef ssize_t _cb_send(nghttp2_session *session, const uint8_t *data, size_t length,
                      int flags, void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._append_out(data, length)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return <ssize_t>length


cdef int _cb_send_data(nghttp2_session *session, nghttp2_frame *frame, const uint8_t *framehd,
                       size_t length, nghttp2_data_source *source, void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    cdef _Stream stream = <_Stream>source.ptr
    try:
        conn._append_out(framehd, 9)
        stream.drain_into(conn, length)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef ssize_t _cb_read(nghttp2_session *session, int32_t stream_id, uint8_t *buf, size_t length,
                      uint32_t *data_flags, nghttp2_data_source *source,
                      void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    cdef _Stream stream = <_Stream>source.ptr
    try:
        return conn._read_outbound(stream, length, data_flags)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE


cdef int _cb_begin_headers(nghttp2_session *session, const nghttp2_frame *frame,
                           void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_begin_headers(frame.hd.stream_id, frame.headers.cat)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _cb_header(nghttp2_session *session, const nghttp2_frame *frame, const uint8_t *name,
                    size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                    void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_header(frame.hd.stream_id, name, namelen, value, valuelen)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    # A refused peer (a header flood): stop parsing the rest of this read.
    return NGHTTP2_ERR_CALLBACK_FAILURE if conn._stop_input else 0


cdef int _cb_frame_recv(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_frame_recv(frame)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    # A refused peer (e.g. too_many_pings): stop parsing the rest of this read.
    return NGHTTP2_ERR_CALLBACK_FAILURE if conn._stop_input else 0


cdef int _cb_frame_send(nghttp2_session *session, const nghttp2_frame *frame,
                        void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_frame_send(frame)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _cb_invalid_frame(nghttp2_session *session, const nghttp2_frame *frame,
                           int lib_error_code, void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_invalid_frame(frame, lib_error_code)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    # A malformed message ends the connection: stop parsing the rest of this read.
    return NGHTTP2_ERR_CALLBACK_FAILURE if conn._stop_input else 0


cdef int _cb_begin_frame(nghttp2_session *session, const nghttp2_frame_hd *hd,
                         void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    if hd.type != NGHTTP2_PRIORITY:
        return 0
    try:
        if hd.stream_id == 0:
            # RFC 9113 6.3: a connection error of type PROTOCOL_ERROR, as grpc-go and
            # nghttp2 1.52 make it. Releases that ignore every PRIORITY frame (1.68,
            # 1.70) would let it pass, and call nothing else for it: refuse it here.
            conn._refuse(NGHTTP2_PROTOCOL_ERROR, b"", "http2: PRIORITY frame on stream 0")
        else:
            _spend_control_frame(conn, hd)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return NGHTTP2_ERR_CALLBACK_FAILURE if conn._stop_input else 0


cdef int _cb_invalid_header(nghttp2_session *session, const nghttp2_frame *frame,
                            const uint8_t *name, size_t namelen, const uint8_t *value,
                            size_t valuelen, uint8_t flags, void *user_data) noexcept:
    # A field nghttp2 finds invalid (RFC 9113 8.2.1: bad characters in a name or value)
    # makes the message malformed. Without this callback nghttp2 drops such a field and
    # delivers the rest of the message, and which fields it drops rather than refuses
    # changed between releases (1.70 drops a value holding CR LF that 1.52 refuses).
    # Failing here makes every release report it as a malformed message (invalid-frame
    # callback, or its own connection error), which _on_invalid_frame turns into ours.
    return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE


cdef int _cb_data_chunk(nghttp2_session *session, uint8_t flags, int32_t stream_id,
                        const uint8_t *data, size_t length, void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_data_chunk(stream_id, data, length)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef int _cb_stream_close(nghttp2_session *session, int32_t stream_id, uint32_t error_code,
                          void *user_data) noexcept:
    cdef H2Connection conn = <H2Connection>user_data
    try:
        conn._on_stream_close(stream_id, error_code)
    except BaseException as exc:
        conn._error = exc
        return NGHTTP2_ERR_CALLBACK_FAILURE
    return 0


cdef nghttp2_session_callbacks *_make_callbacks() except NULL:
    cdef nghttp2_session_callbacks *cbs = NULL
    if nghttp2_session_callbacks_new(&cbs) != 0:
        raise MemoryError()
    nghttp2_session_callbacks_set_send_callback(cbs, _cb_send)
    nghttp2_session_callbacks_set_send_data_callback(cbs, _cb_send_data)
    nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, _cb_begin_headers)
    nghttp2_session_callbacks_set_on_header_callback(cbs, _cb_header)
    nghttp2_session_callbacks_set_on_invalid_header_callback(cbs, _cb_invalid_header)
    nghttp2_session_callbacks_set_on_begin_frame_callback(cbs, _cb_begin_frame)
    nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, _cb_frame_recv)
    nghttp2_session_callbacks_set_on_frame_send_callback(cbs, _cb_frame_send)
    nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, _cb_invalid_frame)
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, _cb_data_chunk)
    nghttp2_session_callbacks_set_on_stream_close_callback(cbs, _cb_stream_close)
    return cbs


cdef nghttp2_session_callbacks *_CALLBACKS = _make_callbacks()


def libnghttp2_version():
    """The version of the libnghttp2 running the engine: the system library's (whatever
    the dynamic linker loaded, which may differ from the one built against), or the
    pinned release compiled into a vendored build (a wheel)."""
    return nghttp2_version(0).version_str.decode("ascii")


include "h2_connection.pxi"
include "h2_headers.pxi"
