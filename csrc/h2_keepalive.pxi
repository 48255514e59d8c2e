# Keepalive and ping enforcement of one HTTP/2 connection, as grpc-go's client and server
# do them. Pure bookkeeping on times given in; H2Connection sends the frames.

# Results of _Keepalive.due().
cdef enum:
    _KA_IDLE = 0        # nothing to do
    _KA_PING = 1        # send a keepalive PING now
    _KA_DEAD = 2        # the PING's ACK is late: the connection is dead


cdef class _Keepalive:
    # Keepalive (both roles): ping after `time` without receiving anything, give up when
    # the ACK is not back within `timeout`. time <= 0 disables.
    cdef double time
    cdef double timeout
    cdef bint without_streams
    cdef double last_recv
    cdef double ping_sent       # < 0: no keepalive ping outstanding
    # Enforcement (server role, grpc-go's EnforcementPolicy). min_ping < 0 disables.
    cdef double min_ping
    cdef bint ping_without_streams
    cdef double last_ping_at
    cdef int strikes
    cdef bint forgive           # we sent headers/data since the peer's last ping

    cdef inline void on_receive(self, double now):
        """Any traffic proves the peer alive (grpc-go: activity)."""
        self.last_recv = now
        self.ping_sent = -1.0

    cdef object deadline(self):
        if self.time <= 0:
            return None
        if self.ping_sent >= 0:
            return self.ping_sent + self.timeout
        return self.last_recv + self.time

    cdef int due(self, double now, bint has_streams):
        if self.time <= 0:
            return _KA_IDLE
        if self.ping_sent >= 0:
            return _KA_DEAD if now >= self.ping_sent + self.timeout else _KA_IDLE
        if now < self.last_recv + self.time:
            return _KA_IDLE
        if has_streams or self.without_streams:
            self.ping_sent = now
            return _KA_PING
        self.last_recv = now
        return _KA_IDLE

    cdef bint ping_breaks_policy(self, double now, bint has_streams):
        """A PING arrived at `now`: True once the peer has earned more than
        MAX_PING_STRIKES strikes (grpc-go then sends GOAWAY "too_many_pings")."""
        cdef double interval
        if self.min_ping < 0:
            return False
        if self.forgive:
            self.forgive = False
            self.strikes = 0
            self.last_ping_at = now
            return False
        interval = (PING_IDLE_INTERVAL if not has_streams and not self.ping_without_streams
                    else self.min_ping)
        if self.last_ping_at + interval > now:
            self.strikes += 1
        self.last_ping_at = now
        return self.strikes > MAX_PING_STRIKES
