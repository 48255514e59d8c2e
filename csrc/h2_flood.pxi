# Flood guards of one HTTP/2 connection: what a peer may make us do without sending any
# application data. Pure bookkeeping on frames and times given in; H2Connection refuses
# the peer (GOAWAY ENHANCE_YOUR_CALM) when a guard trips.
#
# - _FrameBudget: control frames (SETTINGS, PING, RST_STREAM, PRIORITY, GOAWAY, empty DATA
#   that ends nothing) are paid for from a token bucket. Each costs a callback, most an
#   answer (an ACK), and an RST_STREAM the work of the stream it ends; a peer that spends
#   the bucket is flooding, whether or not it reads our answers. WINDOW_UPDATE is not
#   charged: it asks for no answer and costs nghttp2 an addition, and a grpcio peer sends
#   two for every message it reads (bench/ echo: 900,000 1 KiB messages a second to
#   grpc.aio spent the bucket in well under a second and the server was refused).
# - Streams reset before the application saw them: a request whose stream the peer reset
#   within the same read (HTTP/2 "rapid reset") is never reported, so a reset flood costs
#   the engine's work only, no call, no handler, no log line.

from libc.stdint cimport uint64_t


cdef extern from "kf_nghttp2.h":
    int kf_option_disable_stream_reset_rate_limit(nghttp2_option *option)
    int kf_option_disable_glitch_rate_limit(nghttp2_option *option)


# Control frames a peer may send at once, and per second after that, before it is refused
# with GOAWAY ENHANCE_YOUR_CALM "too_many_control_frames". One costs well under a
# microsecond (an RST_STREAM: the stream it ends, tens of microseconds when a call was
# opened), so the rate bounds a flooding connection to a few percent of a core. Legitimate
# peers send a handful per connection plus one RST_STREAM per cancelled call, far below.
# grpc-go sets no such limit; nghttp2's own stream-reset limit (1000 at once, 33 per
# second, in nghttp2 >= 1.57 and Debian 12's 1.52) is switched off for this one, which
# counts every kind of control frame and allows kube-apiserver's cancellations (one
# RST_STREAM per tunnel on a shared connection) a much higher rate.
CONTROL_FRAME_BURST = 10000
CONTROL_FRAME_RATE = 1000.0
# A HEADERS or DATA frame we send earns the peer one control frame back: a grpc-go peer
# answers our data with bandwidth-estimation PINGs (and WINDOW_UPDATEs, not charged).
CONTROL_FRAME_REFUND = 1.0
# A header block over max_header_list_size refuses its stream (RST_STREAM); one that goes on
# to this many times the limit (its fields are still decoded, then dropped) is a
# CONTINUATION flood and refuses the connection, as x/net/http2 does past twice grpc-go's
# 16 MiB limit. nghttp2 >= 1.61 (and Debian 12's 1.52) already ends a header block after 8
# CONTINUATION frames, at most 9 x 16 KiB; this guard is for the libraries without that.
HEADER_FLOOD_FACTOR = 16

_TOO_MANY_CONTROL_FRAMES = b"too_many_control_frames"


cdef class _FrameBudget:
    """A token bucket of control frames, refilled with time and by our own output."""

    cdef double burst
    cdef double rate
    cdef double tokens
    cdef double updated

    cdef inline void start(self, double burst, double rate, double now):
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.updated = now

    cdef inline bint spend(self, double now):
        """One control frame arrived at `now`: False once the bucket is empty."""
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        self.tokens -= 1.0
        return self.tokens >= 0.0

    cdef inline void refund(self):
        if self.tokens < self.burst:
            self.tokens += CONTROL_FRAME_REFUND


cdef inline bint _is_control_frame(const nghttp2_frame_hd *hd):
    """A received frame that carries no application data (see _FrameBudget)."""
    cdef int t = hd.type
    if t == NGHTTP2_DATA:
        return hd.length == 0 and not (hd.flags & NGHTTP2_FLAG_END_STREAM)
    return t != NGHTTP2_HEADERS and t != NGHTTP2_WINDOW_UPDATE


cdef int _spend_control_frame(H2Connection self, const nghttp2_frame_hd *hd) except -1:
    """Charge a received frame to the control budget; refuse the peer when it is spent.
    Called as each frame is complete (_on_frame_recv), but for PRIORITY frames as they
    begin (_cb_begin_frame): nghttp2 1.68 and later ignore them and call nothing else."""
    if _is_control_frame(hd) and not self._budget.spend(self._now):
        self._refuse(NGHTTP2_ENHANCE_YOUR_CALM, _TOO_MANY_CONTROL_FRAMES,
                     "too many control frames (SETTINGS, PING, RST_STREAM, empty DATA, ...) "
                     "from the peer")
    return 0


cdef int _forget_unseen_stream(H2Connection self, _Stream s, uint32_t error_code) except -1:
    """The peer reset `s`: if its request is still among the undelivered events, drop every
    event of the stream (take_events filters them) and return 1; else 0."""
    if not self.server or error_code == NGHTTP2_NO_ERROR:
        return 0
    if s.announced_in != self._batches:
        return 0
    if self._unseen is None:
        self._unseen = set()
    self._unseen.add(s.id)
    return 1


cdef list _without_unseen(H2Connection self, list events):
    cdef set unseen = self._unseen
    self._unseen = None
    return [ev for ev in events if (<H2Event>ev).stream_id not in unseen]
