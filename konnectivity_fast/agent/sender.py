"""Backend -> server: the endpoints of one server stream take turns on it (``FairSender``).

Every tunnel of an agent shares one stream per server, and a gRPC stream is one ordered
byte stream: what is queued on it goes out first, and what the server's window lets out is
spent by whoever sends first. When the server lets little through (a slow frontend on its
side rations the stream, or its socket is full), a backend that reads fast would fill that
queue and spend that window, and every other tunnel's bytes (a 1 KiB reply, a DIAL_RSP's
first DATA) would wait for the slow frontend to take more: its client may take nothing for
tens of milliseconds at a time (a gRPC client acknowledges its window in steps), or ever.

So a *bulk* read (a whole read buffer: its backend had more) goes out only while the
window keeps ``RESERVED_WINDOW`` beyond it, and never queues beyond the window; the reserve
is spent only by *short* reads (the backend had no more: a reply, a prompt), which may also
queue ``UNSENT_LIMIT`` beyond the window, and by the agent's control packets. A read that
may not go out waits with its endpoint (its socket paused); waiting endpoints are served in
turn, one read each, as the server lets bytes through, short reads before bulk ones. While
the stream is congested, endpoints read at most ``endpoint.CONGESTED_READ_SIZE`` at a
time, so that a turn is short. The server's window grows back as it takes what was sent
(our server grants what other tunnels spent even while a slow one holds the stream:
server/buffering.py), so a reply beside a reader that stopped still goes through.

Invariants:
- An endpoint's DATA go out in the order they were read, and before its CLOSE_RSP
  (``flush`` sends a waiting read first).
- At most one read (the data in hand when it paused) per endpoint waits here.
- A bulk read never waits for more window than the stream has shown it can have: the
  reserve is at most a quarter of the largest window seen, and a read larger than the
  rest goes out once the window is that open (crossing it: upstream's server starts at
  64 KiB), so no peer is waited on forever.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from konnectivity_fast.agent.endpoint import CONGESTED_READ_SIZE, READ_SIZE, Endpoint
from konnectivity_fast.transport.call import GrpcCall

__all__ = ["RESERVED_WINDOW", "UNSENT_LIMIT", "FairSender"]

#: Bytes a short read may queue on a server stream beyond what the server lets out now:
#: one small read, so that a window update finds something to send at once, and a reply
#: queued behind it waits ~16 ms at 1 MB/s.
UNSENT_LIMIT = 16 << 10
#: The end of the server's window that bulk reads leave to short ones and control packets:
#: sixteen 1 KiB replies or DIAL_RSPs go out at once beside a slow reader whose tunnel
#: holds the stream, and a bulk tunnel beside a 256 KiB rationed window keeps 15/16 of it.
RESERVED_WINDOW = 16 << 10


class FairSender:
    """The turn-taking of one server stream's endpoints (see the module docstring)."""

    __slots__ = ("_armed", "_bulk", "_peak", "_send", "_short", "call")

    def __init__(self, call: GrpcCall, send: Callable[[int, bytes], None]) -> None:
        self.call = call
        #: ``send(connect_id, data)``: queue one DATA packet on the stream.
        self._send = send
        #: Endpoints waiting with a short read, and with a bulk one, each in turn order.
        self._short: collections.OrderedDict[Endpoint, bytes] = collections.OrderedDict()
        self._bulk: collections.OrderedDict[Endpoint, bytes] = collections.OrderedDict()
        #: The largest window the stream has shown (``_bulk_need``).
        self._peak = 0
        #: ``_serve`` is due (a drain callback is registered).
        self._armed = False

    @property
    def congested(self) -> bool:
        """Endpoints are waiting for their turn, or the server would not let a full-size
        read out at once beside the reserve: it would wait ahead of the next endpoint's
        bytes (one 128 KiB read past a rationed window kept a 1 KiB reply ~0.3 s behind a
        1 MB/s reader)."""
        return (
            bool(self._bulk or self._short) or self.call.send_room() < READ_SIZE + RESERVED_WINDOW
        )

    def offer(self, endpoint: Endpoint, data: bytes) -> bool:
        """Send ``data`` now, or keep it for the endpoint's turn and return False (the
        endpoint then pauses its reads until ``endpoint.resume_reading``)."""
        # An endpoint holds at most one read here, but reads made before its DIAL_RSP went
        # out are offered together (Endpoint.start_reading): keep them in order.
        for waiting in (self._short, self._bulk):
            held = waiting.get(endpoint)
            if held is not None:
                waiting[endpoint] = held + data
                return False
        if _is_short(data):
            if self.call.unsent() < UNSENT_LIMIT:  # passes waiting bulk reads
                self._send(endpoint.connect_id, data)
                return True
            self._short[endpoint] = data
        elif not self._bulk and self._bulk_fits(data):
            self._send(endpoint.connect_id, data)
            return True
        else:
            self._bulk[endpoint] = data
        self._arm()
        return False

    def held(self, endpoint: Endpoint) -> int:
        """Bytes of ``endpoint``'s read waiting for its turn (the admin listing)."""
        data = self._short.get(endpoint) or self._bulk.get(endpoint)
        return 0 if data is None else len(data)

    def flush(self, endpoint: Endpoint) -> None:
        """The endpoint ends: its waiting read goes out now, ahead of its CLOSE_RSP."""
        data = self._short.pop(endpoint, None) or self._bulk.pop(endpoint, None)
        if data is not None:
            self._send(endpoint.connect_id, data)

    def drop(self, endpoint: Endpoint) -> None:
        """The endpoint is closed by the server: its waiting read is not wanted."""
        self._short.pop(endpoint, None)
        self._bulk.pop(endpoint, None)

    def clear(self) -> None:
        self._short.clear()
        self._bulk.clear()

    # -- turns --

    def _bulk_fits(self, data: bytes) -> bool:
        """Whether the bulk read ``data`` may go on the stream now."""
        room = self.call.send_room()  # read once: it asks the engine
        return room >= self._bulk_need(len(data), room)

    def _bulk_need(self, size: int, room: int) -> int:
        """The room a bulk read of ``size`` bytes waits for, given the ``room`` there is
        now: itself and the reserve, cut to the largest window the stream has shown (see
        the invariants)."""
        peak = self._peak = max(self._peak, room)
        reserve = min(RESERVED_WINDOW, peak // 4)
        return reserve + min(size, peak - reserve)

    def _arm(self) -> None:
        if self._armed:
            return
        if self._short:
            self._armed = True
            self.call.when_drained(self._serve, below=UNSENT_LIMIT, unsent=True)
        elif self._bulk:
            self._armed = True
            first = next(iter(self._bulk.values()))
            self.call.when_room(self._serve, self._bulk_need(len(first), self.call.send_room()))

    def _serve(self) -> None:
        """Send what may go now, in turn: short reads first (they are small), then bulk
        ones while the window keeps the reserve beyond them."""
        self._armed = False
        call = self.call
        short, bulk = self._short, self._bulk
        while short and call.unsent() < UNSENT_LIMIT:
            self._take(short)
        while bulk and self._bulk_fits(next(iter(bulk.values()))):
            self._take(bulk)
        self._arm()

    def _take(self, waiting: collections.OrderedDict[Endpoint, bytes]) -> None:
        endpoint, data = waiting.popitem(last=False)
        self._send(endpoint.connect_id, data)
        endpoint.resume_reading()


def _is_short(data: bytes) -> bool:
    """A read smaller than the smallest read buffer: its backend had nothing more."""
    return len(data) < CONGESTED_READ_SIZE
