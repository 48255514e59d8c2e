"""Backend -> server: the endpoints of one server stream take turns on it (``FairSender``).

Every tunnel of an agent shares one stream per server, and a gRPC stream is one ordered
byte stream: what is queued on it goes out first. When the server lets little through (a
slow frontend on its side rations the stream, or its socket is full), a backend that reads
fast would fill that queue and every other tunnel's bytes (a 1 KiB reply, a DIAL_RSP's
first DATA) would wait behind all of it. So the bytes queued beyond what the server lets
out now (``GrpcCall.unsent``) are kept under ``UNSENT_LIMIT``; past it an endpoint with
data waits with that one read in hand (its socket paused), and waiting endpoints are
served in turn, one read each, as the server lets bytes through. While the stream is
congested, endpoints read at most ``endpoint.CONGESTED_READ_SIZE`` at a time, so that a
turn is short.

Invariants:
- An endpoint's DATA go out in the order they were read, and before its CLOSE_RSP
  (``flush`` sends a waiting read first).
- At most one read (the data in hand when it paused) per endpoint waits here.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from konnectivity_fast.agent.endpoint import READ_SIZE, Endpoint
from konnectivity_fast.transport.call import GrpcCall

__all__ = ["UNSENT_LIMIT", "FairSender"]

#: Bytes an agent queues on a server stream beyond what the server lets out now: one small
#: read, so that a window update finds something to send at once while the endpoints read
#: more, and a reply queued behind it waits ~16 ms at 1 MB/s (64 KiB: the echo beside a
#: 4 MB/s reader took 40-70 ms at p50 in bench/ slow4; 16 KiB with small reads: 40 ms,
#: and the bulk transfers kept their throughput).
UNSENT_LIMIT = 16 << 10


class FairSender:
    """The turn-taking of one server stream's endpoints (see the module docstring)."""

    __slots__ = ("_send", "_waiting", "call")

    def __init__(self, call: GrpcCall, send: Callable[[int, bytes], None]) -> None:
        self.call = call
        #: ``send(connect_id, data)``: queue one DATA packet on the stream.
        self._send = send
        self._waiting: collections.OrderedDict[Endpoint, bytes] = collections.OrderedDict()

    @property
    def congested(self) -> bool:
        """Endpoints are waiting for their turn, or the server would not let a full-size
        read out at once: it would queue ahead of the next endpoint's bytes (one 128 KiB
        read past a rationed window kept a 1 KiB reply ~0.3 s behind a 1 MB/s reader)."""
        return bool(self._waiting) or self.call.send_room() < READ_SIZE

    def offer(self, endpoint: Endpoint, data: bytes) -> bool:
        """Send ``data`` now, or keep it for the endpoint's turn and return False (the
        endpoint then pauses its reads until ``endpoint.resume_reading``)."""
        waiting = self._waiting
        if not waiting and self.call.unsent() < UNSENT_LIMIT:
            self._send(endpoint.connect_id, data)
            return True
        held = waiting.get(endpoint)
        # An endpoint holds at most one read here, but reads made before its DIAL_RSP went
        # out are offered together (Endpoint.start_reading): keep them in order.
        waiting[endpoint] = data if held is None else held + data
        if len(waiting) == 1 and held is None:
            self.call.when_drained(self._serve, below=UNSENT_LIMIT, unsent=True)
        return False

    def held(self, endpoint: Endpoint) -> int:
        """Bytes of ``endpoint``'s read waiting for its turn (the admin listing)."""
        data = self._waiting.get(endpoint)
        return 0 if data is None else len(data)

    def flush(self, endpoint: Endpoint) -> None:
        """The endpoint ends: its waiting read goes out now, ahead of its CLOSE_RSP."""
        data = self._waiting.pop(endpoint, None)
        if data is not None:
            self._send(endpoint.connect_id, data)

    def drop(self, endpoint: Endpoint) -> None:
        """The endpoint is closed by the server: its waiting read is not wanted."""
        self._waiting.pop(endpoint, None)

    def clear(self) -> None:
        self._waiting.clear()

    def _serve(self) -> None:
        waiting = self._waiting
        call = self.call
        while waiting:
            if call.unsent() >= UNSENT_LIMIT:
                call.when_drained(self._serve, below=UNSENT_LIMIT, unsent=True)
                return
            endpoint, data = waiting.popitem(last=False)
            self._send(endpoint.connect_id, data)
            endpoint.resume_reading()
