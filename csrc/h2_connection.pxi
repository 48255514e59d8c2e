# The H2Connection class (see h2.pxi for the invariants).


cdef class H2Connection:
    """One HTTP/2 connection carrying gRPC calls, server or client role, sans-IO.

    Server role: h2c with prior knowledge (Unix sockets) or h2 after TLS ALPN; the first
    bytes received must be the client preface. Client role: the preface is the first output.
    """

    cdef nghttp2_session *_session
    cdef readonly bint server
    cdef dict _streams
    cdef list _events
    cdef bytearray _out
    # Bytes of ``_out`` in use: ``_out`` is grown by doubling, ahead of what it holds, so a
    # batch of frames costs O(n) copying instead of a realloc (and copy) per 12.5 % growth.
    cdef Py_ssize_t _out_len
    cdef set _to_consume
    cdef Py_ssize_t _conn_unconsumed
    cdef object _error
    cdef readonly Py_ssize_t max_message_size
    cdef readonly Py_ssize_t max_header_list_size
    cdef readonly bint terminated
    cdef bytes _user_agent
    cdef double _now
    cdef _Keepalive _ka
    # Set when we refuse the peer: the rest of the current read is not processed.
    cdef bint _stop_input
    # The peer's GOAWAY(NO_ERROR) was malformed (grpc-go clients name their own last
    # stream): nghttp2 answers GOAWAY(PROTOCOL_ERROR), but the peer only meant to leave.
    cdef bint _peer_left
    # Flood guards (h2_flood.pxi): the control-frame budget, the number of event batches
    # taken so far, and the streams reset before their request was taken.
    cdef _FrameBudget _budget
    cdef Py_ssize_t _batches
    cdef set _unseen

    def __cinit__(self):
        self._session = NULL

    def __init__(self, bint server, *, max_message_size=None,
                 int max_concurrent_streams=DEFAULT_MAX_CONCURRENT_STREAMS,
                 int stream_window=DEFAULT_STREAM_WINDOW,
                 int connection_window=DEFAULT_CONNECTION_WINDOW,
                 Py_ssize_t max_header_list_size=DEFAULT_MAX_HEADER_LIST_SIZE,
                 double keepalive_time=0.0, double keepalive_timeout=DEFAULT_KEEPALIVE_TIMEOUT,
                 bint keepalive_without_streams=True,
                 double min_ping_interval=-1.0, bint ping_without_streams=False,
                 double control_frame_burst=CONTROL_FRAME_BURST,
                 double control_frame_rate=CONTROL_FRAME_RATE,
                 str user_agent="konnectivity-fast", double now=0.0):
        cdef nghttp2_option *opt = NULL
        cdef nghttp2_settings_entry iv[4]
        cdef int rv, niv = 0
        self.server = server
        self._streams = {}
        self._events = []
        self._out = bytearray()
        self._out_len = 0
        self._to_consume = set()
        self.max_message_size = (DEFAULT_MAX_RECEIVE_MESSAGE_SIZE
                                 if max_message_size is None else max_message_size)
        self.max_header_list_size = max_header_list_size
        self._user_agent = user_agent.encode("ascii")
        self._now = now
        self._ka = _Keepalive.__new__(_Keepalive)
        self._ka.time = keepalive_time
        self._ka.timeout = keepalive_timeout
        self._ka.without_streams = keepalive_without_streams
        self._ka.min_ping = min_ping_interval if server else -1.0
        self._ka.ping_without_streams = ping_without_streams
        self._ka.last_ping_at = -1e18
        self._ka.on_receive(now)
        self._budget = _FrameBudget.__new__(_FrameBudget)
        self._budget.start(control_frame_burst, control_frame_rate, now)
        if nghttp2_option_new(&opt) != 0:
            raise MemoryError()
        try:
            nghttp2_option_set_no_auto_window_update(opt, 1)
            nghttp2_option_set_max_outbound_ack(opt, MAX_OUTBOUND_ACK)
            # We ACK pings ourselves, after the ping policy: the ping that breaks it gets
            # GOAWAY, not an ACK (as grpc-go).
            nghttp2_option_set_no_auto_ping_ack(opt, 1)
            # grpc-go sends grpc-message values with edge spaces unencoded: accept them.
            nghttp2_option_set_no_rfc9113_leading_and_trailing_ws_validation(opt, 1)
            # Resets and glitches (newer nghttp2) are counted by the control-frame
            # budget instead, the same on every release (h2_flood.pxi, kf_nghttp2.h).
            kf_option_disable_stream_reset_rate_limit(opt)
            kf_option_disable_glitch_rate_limit(opt)
            if server:
                rv = nghttp2_session_server_new2(&self._session, _CALLBACKS, <void *>self, opt)
            else:
                rv = nghttp2_session_client_new2(&self._session, _CALLBACKS, <void *>self, opt)
        finally:
            nghttp2_option_del(opt)
        if rv != 0:
            raise MemoryError(nghttp2_strerror(rv).decode())
        iv[niv].settings_id = NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE
        iv[niv].value = stream_window
        niv += 1
        iv[niv].settings_id = NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE
        iv[niv].value = <uint32_t>max_header_list_size
        niv += 1
        if server:
            iv[niv].settings_id = NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS
            iv[niv].value = max_concurrent_streams
        else:
            iv[niv].settings_id = NGHTTP2_SETTINGS_ENABLE_PUSH
            iv[niv].value = 0
        niv += 1
        _check(nghttp2_submit_settings(self._session, NGHTTP2_FLAG_NONE, iv, niv))
        _check(nghttp2_session_set_local_window_size(
            self._session, NGHTTP2_FLAG_NONE, 0, connection_window))

    def __dealloc__(self):
        if self._session is not NULL:
            nghttp2_session_del(self._session)
            self._session = NULL

    # ---- input ------------------------------------------------------------------------

    def receive_data(self, data, now=None):
        """Feed bytes read from the transport; returns the events they caused."""
        cdef Py_buffer view
        cdef ssize_t rv
        if now is not None:
            self._now = now
        self._ka.on_receive(self._now)
        if self.terminated:
            return self.take_events()
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            rv = nghttp2_session_mem_recv(self._session, <const uint8_t *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        self._raise_callback_error()
        if rv == NGHTTP2_ERR_FLOODED:
            self._terminate("http2: too many SETTINGS and PING acknowledgements queued for "
                            "a peer that does not read", NGHTTP2_ENHANCE_YOUR_CALM)
        elif rv < 0:
            self._terminate(f"http2: {nghttp2_strerror(<int>rv).decode()}",
                            NGHTTP2_PROTOCOL_ERROR)
        return self.take_events()

    def take_events(self):
        """Events queued since the last call (sending can close streams, too)."""
        cdef list events = self._events
        self._events = []
        self._batches += 1
        if self._unseen is not None:
            return _without_unseen(self, events)
        return events

    # ---- output -----------------------------------------------------------------------

    def data_to_send(self):
        """All bytes ready to go out, as one buffer (b"" when none). Gives back the flow
        control window of consumed, unpaused streams first."""
        cdef int rv
        cdef bytearray out
        if self._session is NULL:
            return b""
        self._consume()
        rv = nghttp2_session_send(self._session)
        self._raise_callback_error()
        if rv < 0:
            self._terminate(f"http2: {nghttp2_strerror(rv).decode()}")
        if self._out_len == 0:
            return b""
        out = self._out
        PyByteArray_Resize(out, self._out_len)
        self._out = bytearray()
        self._out_len = 0
        return out

    @property
    def want_close(self):
        """True once the connection has nothing left to read or write."""
        return self.terminated or (not nghttp2_session_want_read(self._session)
                                   and not nghttp2_session_want_write(self._session))

    @property
    def open_streams(self):
        return len(self._streams)

    @property
    def queued_frames(self):
        """Frames other than DATA (ACKs, RST_STREAMs, HEADERS, ...) waiting to be written:
        what a peer that does not read has made us owe it."""
        return nghttp2_session_get_outbound_queue_size(self._session)

    def outbound_pending(self, int32_t stream_id):
        """Bytes queued on a stream and not yet framed (flow control or not sent yet)."""
        cdef _Stream s = self._streams.get(stream_id)
        return 0 if s is None else s.out_pending

    def send_window(self, int32_t stream_id):
        """Bytes of DATA the peer lets us send on a stream now (the smaller of its stream
        and connection windows); 0 means our output waits for the peer to read."""
        cdef int32_t stream = nghttp2_session_get_stream_remote_window_size(
            self._session, stream_id)
        cdef int32_t conn = nghttp2_session_get_remote_window_size(self._session)
        return max(0, min(stream, conn))

    # ---- server role ------------------------------------------------------------------

    def send_headers(self, int32_t stream_id, metadata=()):
        """Response headers with custom metadata (e.g. serverid, servercount)."""
        cdef _Stream s = self._live(stream_id)
        if s.provider:
            raise RuntimeError(f"stream {stream_id}: headers already sent")
        headers = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        headers += _metadata_out(metadata)
        self._submit_response(s, headers, True)

    def send_trailers(self, int32_t stream_id, int status=GRPC_OK, str message="", metadata=()):
        """End the call with a status. Trailers-Only when no headers went out yet."""
        cdef _Stream s = self._live(stream_id)
        trailers = [(b"grpc-status", str(status).encode())]
        if message:
            trailers.append((b"grpc-message", _percent_encode(message)))
        trailers += _metadata_out(metadata)
        s.local_done = True
        if not s.provider:
            self._submit_response(
                s, [(b":status", b"200"), (b"content-type", b"application/grpc")] + trailers,
                False)
            return
        s.trailers = trailers
        self._resume(s)

    # ---- client role ------------------------------------------------------------------

    def start_request(self, str path, metadata=(), str authority="localhost",
                      str scheme="http", timeout=None):
        """Open a call; returns its stream ID. Messages may be sent at once."""
        cdef _Stream s = _Stream.__new__(_Stream)
        if self.server:
            raise RuntimeError("start_request needs the client role")
        if self.terminated:
            raise RuntimeError("the connection is closed")
        headers = [(b":method", b"POST"), (b":scheme", scheme.encode()),
                   (b":path", path.encode()), (b":authority", authority.encode()),
                   (b"content-type", b"application/grpc"),
                   (b"user-agent", self._user_agent), (b"te", b"trailers")]
        if timeout is not None:
            headers.append((b"grpc-timeout", encode_grpc_timeout(timeout)))
        headers += _metadata_out(metadata)
        s.provider = True
        s.id = self._submit(headers, s, 0, True)
        self._streams[s.id] = s
        return s.id

    def end_stream(self, int32_t stream_id):
        """Half-close: no more messages from us on this call."""
        cdef _Stream s = self._live(stream_id)
        s.local_done = True
        s.end_queued = True
        self._resume(s)

    # ---- both roles -------------------------------------------------------------------

    def send_message(self, int32_t stream_id, message):
        """Queue one gRPC message (the serialized Packet; the 5-byte prefix is added here).
        The buffer is referenced, not copied, until it is framed: do not mutate it."""
        cdef _Stream s = self._writable(stream_id)
        s.queue(message_prefix(len(message)))
        s.queue(message)
        self._resume(s)

    def send_framed(self, int32_t stream_id, framed):
        """Queue bytes that already hold whole gRPC messages, prefixes included."""
        cdef _Stream s = self._writable(stream_id)
        s.queue(framed)
        self._resume(s)

    def send_data_packet(self, int32_t stream_id, long long connect_id, payload):
        """Queue a DATA Packet for `connect_id` around `payload`, without copying it."""
        cdef _Stream s = self._writable(stream_id)
        s.queue(data_header(connect_id, len(payload)))
        s.queue(payload)
        self._resume(s)

    def reset_stream(self, int32_t stream_id, unsigned int error_code=NGHTTP2_CANCEL):
        """RST_STREAM (CANCEL by default: the peer sees CANCELLED)."""
        cdef _Stream s = self._streams.get(stream_id)
        if s is None:
            return
        s.local_done = True
        s.finished = True
        s.reset_sent = True
        _check(nghttp2_submit_rst_stream(self._session, NGHTTP2_FLAG_NONE, stream_id,
                                         error_code))

    def pause_reading(self, int32_t stream_id):
        """Stop giving the peer window on this stream: it can send at most its window."""
        cdef _Stream s = self._streams.get(stream_id)
        if s is not None:
            s.paused = True

    def resume_reading(self, int32_t stream_id):
        cdef _Stream s = self._streams.get(stream_id)
        if s is not None and s.paused:
            s.paused = False
            if s.unconsumed:
                self._to_consume.add(s)

    def receive_window(self, int32_t stream_id):
        """Bytes the peer may still send on a stream before it needs more window (what
        was granted and not yet used, WINDOW_UPDATEs queued here included)."""
        if stream_id not in self._streams:
            return 0
        return max(0, nghttp2_session_get_stream_local_window_size(self._session, stream_id))

    def grant_window(self, int32_t stream_id, Py_ssize_t nbytes):
        """A paused stream: give the peer back up to ``nbytes`` of what it sent, at once.
        Consumption (resume_reading) sends WINDOW_UPDATE only once half the window is
        consumed (nghttp2's rule); a paused stream rationed by its application needs
        small grants to arrive now. Returns the bytes granted."""
        cdef _Stream s = self._streams.get(stream_id)
        cdef Py_ssize_t n
        cdef int32_t owed
        if s is None or not s.paused or nbytes <= 0 or s.unconsumed <= 0:
            return 0
        n = min(nbytes, s.unconsumed)
        _check(nghttp2_session_consume_stream(self._session, stream_id, n))
        s.unconsumed -= n
        # What nghttp2 holds as consumed but not yet acknowledged: every byte received
        # and not window-updated is either that or still unconsumed (ours). Acknowledge
        # it now; nghttp2 takes it off its consumed count, so nothing is given twice.
        owed = nghttp2_session_get_stream_effective_recv_data_length(
            self._session, stream_id) - <int32_t>s.unconsumed
        if owed > 0:
            _check(nghttp2_submit_window_update(self._session, NGHTTP2_FLAG_NONE,
                                                stream_id, owed))
        return n

    def ping(self, bytes opaque=_KEEPALIVE_OPAQUE):
        if len(opaque) != 8:
            raise ValueError("PING payload must be 8 bytes")
        _check(nghttp2_submit_ping(self._session, NGHTTP2_FLAG_NONE, opaque))

    def goaway(self, unsigned int error_code=NGHTTP2_NO_ERROR, bytes debug=b""):
        """Final GOAWAY: streams up to the last one we processed may finish."""
        _check(nghttp2_submit_goaway(
            self._session, NGHTTP2_FLAG_NONE,
            nghttp2_session_get_last_proc_stream_id(self._session), error_code, debug,
            len(debug)))

    # ---- time -------------------------------------------------------------------------

    def get_timer(self):
        """When handle_timer next has work, or None."""
        return None if self.terminated else self._ka.deadline()

    def handle_timer(self, double now):
        """Run keepalive at `now`: send a ping after keepalive_time of silence, fail the
        connection when its ACK is late. Returns the events caused."""
        cdef int due
        self._now = now
        if not self.terminated:
            due = self._ka.due(now, bool(self._streams))
            if due == _KA_PING:
                self.ping()
            elif due == _KA_DEAD:
                self._terminate("keepalive ping failed to receive ACK within timeout")
        return self.take_events()

    # ---- internals: output ------------------------------------------------------------

    cdef int _append_out(self, const uint8_t *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t need = self._out_len + n
        cdef Py_ssize_t size = PyByteArray_GET_SIZE(self._out)
        if need > size:
            PyByteArray_Resize(self._out, max(need, 2 * size))
        memcpy(PyByteArray_AS_STRING(self._out) + self._out_len, p, n)
        self._out_len = need
        return 0

    cdef ssize_t _read_outbound(self, _Stream s, size_t length, uint32_t *flags) except? -1:
        """nghttp2 asks for up to `length` bytes of DATA on `s` (data source callback)."""
        cdef Py_ssize_t n = min(<Py_ssize_t>length, s.out_pending)
        if n == 0 and not (s.end_queued or s.trailers is not None):
            s.deferred = True
            return NGHTTP2_ERR_DEFERRED
        if n:
            flags[0] |= NGHTTP2_DATA_FLAG_NO_COPY
        if n == s.out_pending:
            if s.trailers is not None:
                flags[0] |= NGHTTP2_DATA_FLAG_EOF | NGHTTP2_DATA_FLAG_NO_END_STREAM
                self._submit_trailer(s)
            elif s.end_queued:
                flags[0] |= NGHTTP2_DATA_FLAG_EOF
        return n

    cdef int _resume(self, _Stream s) except -1:
        if s.deferred:
            s.deferred = False
            _check(nghttp2_session_resume_data(self._session, s.id))
        return 0

    cdef _Stream _live(self, int32_t stream_id):
        cdef _Stream s = self._streams.get(stream_id)
        if s is None:
            raise KeyError(f"stream {stream_id} is not open")
        return s

    cdef _Stream _writable(self, int32_t stream_id):
        cdef _Stream s = self._live(stream_id)
        if s.local_done:
            raise RuntimeError(f"stream {stream_id} is closed for sending")
        if not s.provider:
            self.send_headers(stream_id)
        return s

    cdef int32_t _submit(self, list headers, _Stream s, int32_t stream_id,
                         bint with_data) except -1:
        """Submit a request (stream_id 0) or a response header block."""
        cdef nghttp2_nv *nva = _nv_array(headers)
        cdef nghttp2_data_provider prd
        cdef int32_t rv
        prd.source.ptr = <void *>s
        prd.read_callback = _cb_read
        try:
            if stream_id == 0:
                rv = nghttp2_submit_request(self._session, NULL, nva, len(headers),
                                            &prd if with_data else NULL, NULL)
            else:
                rv = nghttp2_submit_response(self._session, stream_id, nva, len(headers),
                                             &prd if with_data else NULL)
        finally:
            free(nva)
        _check(rv)
        return rv

    cdef int _submit_response(self, _Stream s, list headers, bint with_data) except -1:
        s.provider = True
        self._submit(headers, s, s.id, with_data)
        return 0

    cdef int _submit_trailer(self, _Stream s) except -1:
        cdef list trailers = s.trailers
        cdef nghttp2_nv *nva = _nv_array(trailers)
        try:
            _check(nghttp2_submit_trailer(self._session, s.id, nva, len(trailers)))
        finally:
            free(nva)
        s.trailers = None
        return 0

    cdef int _consume(self) except -1:
        """Give window back. The connection window is returned for every byte received at
        once, as grpc-go does, so a paused stream cannot stall its neighbours; the stream
        window only for unpaused streams, which is the per-stream backpressure. Memory held
        is thus bounded per stream by its window."""
        cdef _Stream s
        cdef set keep = set()
        for s in self._to_consume:
            if s.paused:
                keep.add(s)
            elif s.unconsumed:
                _check(nghttp2_session_consume_stream(self._session, s.id, s.unconsumed))
                s.unconsumed = 0
        self._to_consume = keep
        if self._conn_unconsumed:
            _check(nghttp2_session_consume_connection(self._session, self._conn_unconsumed))
            self._conn_unconsumed = 0
        return 0

    cdef int _terminate(self, str why, uint32_t code=NGHTTP2_NO_ERROR) except -1:
        """The connection cannot go on: queue GOAWAY (if nghttp2 has not) and EV_ERROR."""
        cdef H2Event ev
        if self.terminated:
            return 0
        self.terminated = True
        nghttp2_submit_goaway(self._session, NGHTTP2_FLAG_NONE,
                              nghttp2_session_get_last_proc_stream_id(self._session),
                              code, NULL, 0)
        ev = _event(EV_ERROR, 0)
        ev.message = why
        self._events.append(ev)
        return 0

    cdef int _raise_callback_error(self) except -1:
        if self._error is not None:
            err = self._error
            self._error = None
            raise err
        return 0

    # ---- internals: input -------------------------------------------------------------

    cdef int _on_begin_headers(self, int32_t stream_id, int cat) except -1:
        cdef _Stream s
        if self.server and cat == NGHTTP2_HCAT_REQUEST:
            s = _Stream.__new__(_Stream)
            s.id = stream_id
            self._streams[stream_id] = s
        else:
            s = self._streams.get(stream_id)
            if s is None:
                return 0
            s.headers = []
            s.header_bytes = 0
        return 0

    cdef int _on_header(self, int32_t stream_id, const uint8_t *name, size_t namelen,
                        const uint8_t *value, size_t valuelen) except -1:
        cdef _Stream s = self._streams.get(stream_id)
        if s is None or self._stop_input:
            return 0
        # RFC 7541 section 4.1 size: name + value + 32 per field.
        s.header_bytes += namelen + valuelen + 32
        if s.header_bytes > HEADER_FLOOD_FACTOR * self.max_header_list_size:
            self._refuse(NGHTTP2_ENHANCE_YOUR_CALM, b"",
                         "header list far above the limit (CONTINUATION flood)")
            return 0
        if s.header_bytes > self.max_header_list_size:
            s.header_overflow = True
            s.headers = []
            return 0
        s.headers.append((PyBytes_FromStringAndSize(<const char *>name, namelen),
                          PyBytes_FromStringAndSize(<const char *>value, valuelen)))
        return 0

    cdef int _on_frame_recv(self, const nghttp2_frame *frame) except -1:
        cdef int t = frame.hd.type
        cdef _Stream s
        cdef H2Event ev
        if t != NGHTTP2_PRIORITY:  # charged as it began (_cb_begin_frame)
            _spend_control_frame(self, &frame.hd)
        if self._stop_input:
            return 0
        if t == NGHTTP2_DATA:
            if frame.hd.flags & NGHTTP2_FLAG_END_STREAM:
                s = self._streams.get(frame.hd.stream_id)
                if s is not None:
                    self._on_remote_end(s)
        elif t == NGHTTP2_HEADERS:
            s = self._streams.get(frame.hd.stream_id)
            if s is not None:
                s.header_blocks += 1
                if self.server:
                    _on_request_headers(self, s, frame.hd.flags & NGHTTP2_FLAG_END_STREAM)
                else:
                    _on_response_headers(self, s, frame.hd.flags & NGHTTP2_FLAG_END_STREAM)
        elif t == NGHTTP2_PING:
            if frame.hd.flags & NGHTTP2_FLAG_ACK:
                ev = _event(EV_PING_ACK, 0)
                ev.data = PyBytes_FromStringAndSize(<const char *>frame.ping.opaque_data, 8)
                self._events.append(ev)
            else:
                if self._ka.ping_breaks_policy(self._now, bool(self._streams)):
                    # grpc-go's words (internal/transport/http2_server.go handlePing).
                    self._refuse(NGHTTP2_ENHANCE_YOUR_CALM, b"too_many_pings",
                                 "got too many pings from the client")
                if not self.terminated and nghttp2_submit_ping(
                        self._session, NGHTTP2_FLAG_ACK, frame.ping.opaque_data) < 0:
                    # nghttp2 refuses to queue more ACKs for a peer that does not read.
                    self._terminate("http2: ping flood from a peer that does not read",
                                    NGHTTP2_ENHANCE_YOUR_CALM)
                    self._stop_input = True
        elif t == NGHTTP2_GOAWAY:
            ev = _event(EV_GOAWAY, frame.goaway.last_stream_id)
            ev.error_code = frame.goaway.error_code
            ev.data = PyBytes_FromStringAndSize(<const char *>frame.goaway.opaque_data,
                                                frame.goaway.opaque_data_len)
            self._events.append(ev)
        return 0

    cdef int _on_invalid_frame(self, const nghttp2_frame *frame, int lib_error_code) except -1:
        cdef H2Event ev
        if (lib_error_code == NGHTTP2_ERR_HTTP_HEADER
                or lib_error_code == NGHTTP2_ERR_HTTP_MESSAGING):
            # nghttp2 found a malformed request or response (RFC 9113 8.1.1) and reset
            # its stream: end the connection instead (see _malformed).
            self._malformed(frame.hd.stream_id, "malformed message")
            return 0
        if (frame.hd.type == NGHTTP2_GOAWAY and frame.goaway.error_code == NGHTTP2_NO_ERROR
                and not self._peer_left):
            # A client's clean shutdown that nghttp2 finds malformed (its last-stream-id is
            # one of the client's own streams): report the GOAWAY the peer meant.
            self._peer_left = True
            ev = _event(EV_GOAWAY, frame.goaway.last_stream_id)
            ev.error_code = NGHTTP2_NO_ERROR
            ev.data = PyBytes_FromStringAndSize(<const char *>frame.goaway.opaque_data,
                                                frame.goaway.opaque_data_len)
            self._events.append(ev)
        return 0

    cdef int _on_frame_send(self, const nghttp2_frame *frame) except -1:
        cdef int t = frame.hd.type
        cdef _Stream s
        cdef H2Event ev
        if t == NGHTTP2_GOAWAY and frame.goaway.error_code != NGHTTP2_NO_ERROR:
            if self._peer_left:
                self.terminated = True  # the peer left cleanly: not a violation
            elif not self.terminated:
                # nghttp2 found a protocol error in the peer's input and is closing.
                self.terminated = True
                ev = _event(EV_ERROR, 0)
                ev.message = f"http2: peer violated the protocol (GOAWAY error code " \
                             f"{frame.goaway.error_code} sent)"
                self._events.append(ev)
            return 0
        if (t == NGHTTP2_RST_STREAM and frame.rst_stream.error_code == NGHTTP2_PROTOCOL_ERROR
                and not self.terminated):
            s = self._streams.get(frame.hd.stream_id)
            if s is None or not s.reset_sent:
                # A reset that nghttp2 sent, not the application (reset_stream): a stream
                # error it found where it calls no callback (nghttp2 1.52: DATA longer
                # than its content-length; a stream over our limit once the peer has our
                # SETTINGS). The same rule as in _on_invalid_frame.
                self._malformed(frame.hd.stream_id, "stream error (RST_STREAM PROTOCOL_ERROR)")
                return 0
        if t == NGHTTP2_HEADERS or t == NGHTTP2_DATA:
            # grpc-go forgives a client's earlier pings once the server has sent something.
            self._ka.forgive = True
            self._budget.refund()
            if (self.server and t == NGHTTP2_HEADERS
                    and frame.hd.flags & NGHTTP2_FLAG_END_STREAM):
                s = self._streams.get(frame.hd.stream_id)
                if s is not None and not s.remote_ended:
                    # The call is over but the client still sends: tell it to stop, as
                    # grpc-go does (RST_STREAM NO_ERROR after the trailers).
                    _check(nghttp2_submit_rst_stream(self._session, NGHTTP2_FLAG_NONE,
                                                     s.id, NGHTTP2_NO_ERROR))
        return 0

    cdef int _on_data_chunk(self, int32_t stream_id, const uint8_t *data,
                            size_t length) except -1:
        cdef _Stream s = self._streams.get(stream_id)
        self._conn_unconsumed += length
        if s is None:
            return 0
        s.unconsumed += length
        self._to_consume.add(s)
        if not s.failed:
            s.feed(self, data, length)
        return 0

    cdef int _on_stream_close(self, int32_t stream_id, uint32_t error_code) except -1:
        cdef _Stream s = self._streams.pop(stream_id, None)
        cdef H2Event ev
        if s is None:
            return 0
        if _forget_unseen_stream(self, s, error_code):
            self._to_consume.discard(s)
            return 0
        if not self.server and not s.finished:
            if error_code == NGHTTP2_CANCEL:
                status = GRPC_CANCELLED
            elif error_code == NGHTTP2_REFUSED_STREAM:
                status = GRPC_UNAVAILABLE
            else:
                status = GRPC_INTERNAL
            self._finish(s, status, f"stream terminated by RST_STREAM with error code: "
                                    f"{error_code}", [])
        self._to_consume.discard(s)
        s.unconsumed = 0
        ev = _event(EV_CLOSED, stream_id)
        ev.error_code = error_code
        self._events.append(ev)
        return 0

    cdef int _on_remote_end(self, _Stream s) except -1:
        s.remote_ended = True
        if s.failed or s.finished:
            return 0
        if s.partial():
            self._fail_stream(s, GRPC_INTERNAL, "grpc: received an incomplete message before "
                                                "the end of the stream")
            return 0
        if self.server:
            self._events.append(_event(EV_END, s.id))
        else:
            self._finish(s, GRPC_INTERNAL, "server closed the stream without sending trailers",
                         [])
            if not s.local_done:
                self.reset_stream(s.id, NGHTTP2_NO_ERROR)
        return 0

    cdef int _emit_message(self, int32_t stream_id, bytes msg) except -1:
        cdef H2Event ev = _event(EV_MESSAGE, stream_id)
        ev.data = msg
        self._events.append(ev)
        return 0

    cdef int _fail_stream(self, _Stream s, int status, str message) except -1:
        """Our side cannot accept this call's input: end it with `status`."""
        cdef H2Event ev
        s.failed = True
        s.body = None
        s.prefix_len = 0
        if self.server:
            s.outq = []
            s.out_pending = 0
            if s.local_done:
                # Our trailers are already on their way: only a reset can stop the input.
                self.reset_stream(s.id, NGHTTP2_CANCEL)
            else:
                self.send_trailers(s.id, status, message)
            ev = _event(EV_ABORTED, s.id)
            ev.status = status
            ev.message = message
            self._events.append(ev)
        else:
            self._finish(s, status, message, [])
            self.reset_stream(s.id, NGHTTP2_CANCEL)
        return 0

    cdef int _finish(self, _Stream s, int status, str message, list metadata) except -1:
        """Client role: report the call's outcome once."""
        cdef H2Event ev
        if s.finished:
            return 0
        s.finished = True
        ev = _event(EV_TRAILERS, s.id)
        ev.status = status
        ev.message = message
        ev.metadata = metadata
        self._events.append(ev)
        return 0

    cdef int _malformed(self, int32_t stream_id, str what) except -1:
        """The peer sent a malformed request or response on `stream_id` (`what` says
        which fault): GOAWAY PROTOCOL_ERROR, and the rest of the current read is not
        processed.

        RFC 9113 8.1.1 makes this a stream error, which 5.4.1 lets an endpoint treat as a
        connection error. nghttp2 1.68 does so itself, and no option turns that off short
        of dropping its HTTP validation; 1.52 and 1.70 reset the stream. grpc-go resets
        the stream (docs/differences.md).
        Ending the connection in every release keeps the engine the same whichever
        libnghttp2 it runs on (the system's, or a wheel's). Nothing of value is lost: the
        peers of a Konnectivity server and agent speak gRPC through grpc-go, which sends
        no malformed message, so one comes from a broken or hostile peer, and a
        connection that ends cannot be used to make us reset streams without bound."""
        cdef _Stream s
        if self.terminated:
            return 0
        if not self.server:
            # nghttp2 closes the stream when its reset goes out, maybe in a later
            # data_to_send: the call's outcome must come now, before EV_ERROR.
            s = self._streams.get(stream_id)
            if s is not None:
                self._finish(s, GRPC_INTERNAL, "malformed response from the server", [])
        self._refuse(NGHTTP2_PROTOCOL_ERROR, b"",
                     f"http2: {what} from the peer on stream {stream_id}")
        return 0

    cdef int _refuse(self, uint32_t code, bytes debug, str why) except -1:
        """The peer broke a rule (ping policy, a flood guard): GOAWAY `code` with `debug`,
        EV_ERROR `why`, and the rest of the current read is not processed."""
        cdef H2Event ev
        if not self.terminated:
            self.terminated = True
            self._stop_input = True
            _check(nghttp2_submit_goaway(
                self._session, NGHTTP2_FLAG_NONE,
                nghttp2_session_get_last_proc_stream_id(self._session),
                code, debug, len(debug)))
            ev = _event(EV_ERROR, 0)
            ev.message = why
            self._events.append(ev)
        return 0


cdef inline int _check(int rv) except -1:
    if rv < 0:
        raise RuntimeError(f"nghttp2: {nghttp2_strerror(rv).decode()}")
    return 0


cdef nghttp2_nv *_nv_array(list headers) except NULL:
    """`headers` ((bytes, bytes) pairs) as the name/value array an nghttp2 submit call takes.
    The array points into the bytes objects of `headers`, which must outlive it; nghttp2
    copies the fields during the call, so the caller frees the array right after it."""
    cdef Py_ssize_t i, n = len(headers)
    cdef nghttp2_nv *nva = <nghttp2_nv *>malloc(max(n, 1) * sizeof(nghttp2_nv))
    if nva is NULL:
        raise MemoryError()
    try:
        for i in range(n):
            name, value = headers[i]
            nva[i].name = <uint8_t *><char *>name
            nva[i].namelen = len(name)
            nva[i].value = <uint8_t *><char *>value
            nva[i].valuelen = len(value)
            nva[i].flags = NGHTTP2_NV_FLAG_NONE
    except BaseException:
        free(nva)
        raise
    return nva
