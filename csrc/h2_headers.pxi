# Header blocks received by H2Connection: a request (server role) or a response and its
# trailers (client role), checked as grpc-go checks them. Functions over the connection's
# internals, kept apart to keep h2_connection.pxi readable.


cdef int _on_request_headers(H2Connection self, _Stream s, bint end_stream) except -1:
    cdef H2Event ev
    cdef dict pseudo = {}
    cdef list metadata = []
    if s.header_overflow:
        s.failed = True
        _check(nghttp2_submit_rst_stream(self._session, NGHTTP2_FLAG_NONE, s.id,
                                         NGHTTP2_FRAME_SIZE_ERROR))
        return 0
    if s.header_blocks > 1:
        # Request trailers: gRPC clients send none; END_STREAM is all that matters.
        if end_stream:
            self._on_remote_end(s)
        return 0
    for name, value in s.headers:
        if name[:1] == b":" or name in (b"content-type", b"te", b"grpc-timeout"):
            pseudo[name] = value
        else:
            metadata.append((name.decode("latin-1"), value.decode("latin-1")))
    s.headers = []
    method = pseudo.get(b":method", b"")
    ctype = pseudo.get(b"content-type", b"")
    if method != b"POST":
        _early_abort(self, s, b"405", GRPC_INTERNAL,
                     f"invalid gRPC request method {_echoed(method)!r}")
    elif not _is_grpc_content_type(ctype):
        _early_abort(self, s, b"415", GRPC_INVALID_ARGUMENT,
                     f"invalid gRPC request content-type {_echoed(ctype)!r}")
    else:
        ev = _event(EV_REQUEST, s.id)
        ev.path = pseudo.get(b":path", b"").decode("latin-1")
        ev.authority = pseudo.get(b":authority", b"").decode("latin-1")
        ev.metadata = metadata
        if b"grpc-timeout" in pseudo:
            try:
                ev.timeout = parse_grpc_timeout(pseudo[b"grpc-timeout"])
            except ValueError as exc:
                _early_abort(self, s, b"200", GRPC_INTERNAL, str(exc))
                return 0
        self._events.append(ev)
        s.announced_in = self._batches
    if end_stream:
        self._on_remote_end(s)
    return 0


cdef int _early_abort(H2Connection self, _Stream s, bytes http_status, int status,
                      str message) except -1:
    """Refuse a request before the application sees it (grpc-go's early abort)."""
    s.failed = True
    s.local_done = True
    self._submit_response(s, [
        (b":status", http_status), (b"content-type", b"application/grpc"),
        (b"grpc-status", str(status).encode()),
        (b"grpc-message", _percent_encode(message))], False)
    return 0


cdef int _on_response_headers(H2Connection self, _Stream s, bint end_stream) except -1:
    cdef H2Event ev
    cdef dict special = {}
    cdef list metadata = []
    if s.header_overflow:
        self._fail_stream(s, GRPC_INTERNAL, "header list size exceeded")
        return 0
    for name, value in s.headers:
        if name[:1] == b":" or name in (b"content-type", b"grpc-status", b"grpc-message"):
            special[name] = value
        else:
            metadata.append((name.decode("latin-1"), value.decode("latin-1")))
    s.headers = []
    if s.header_blocks == 1 and special.get(b":status", b"")[:1] == b"1":
        s.header_blocks = 0  # informational (1xx): grpc-go ignores it, so do we
        return 0
    if s.header_blocks == 1 and not end_stream:
        http_status = special.get(b":status", b"")
        if http_status != b"200":
            code = int(http_status) if http_status.isdigit() else 0
            self._fail_stream(s, _HTTP_TO_GRPC.get(code, GRPC_UNKNOWN),
                              f"unexpected HTTP status code received from server: "
                              f"{http_status.decode('latin-1')}")
            return 0
        ctype = special.get(b"content-type", b"")
        if not _is_grpc_content_type(ctype):
            self._fail_stream(s, GRPC_INTERNAL, f"transport: received unexpected content-type "
                                                f"{_echoed(ctype)!r}")
            return 0
        ev = _event(EV_HEADERS, s.id)
        ev.metadata = metadata
        self._events.append(ev)
        return 0
    # Trailers (or Trailers-Only): the call's outcome.
    s.remote_ended = True
    raw_status = special.get(b"grpc-status")
    if raw_status is None or not _valid_status(raw_status):
        code = int(special.get(b":status", b"0") or 0) if s.header_blocks == 1 else 200
        status = _HTTP_TO_GRPC.get(code, GRPC_UNKNOWN) if code != 200 else GRPC_INTERNAL
        message = ("server closed the stream without sending trailers"
                   if raw_status is None else f"malformed grpc-status {raw_status!r}")
    else:
        status = int(raw_status)
        message = _percent_decode(special.get(b"grpc-message", b""))
    if s.partial():
        status = GRPC_INTERNAL
        message = "grpc: received an incomplete message before the trailers"
    self._finish(s, status, message, metadata)
    if not s.local_done:
        # The server ended the call while we could still send: as grpc-go, reset.
        self.reset_stream(s.id, NGHTTP2_NO_ERROR)
    return 0
