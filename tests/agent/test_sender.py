"""agent.sender.FairSender's turns, against a stream whose window the test sets.

The stream here is a stand-in for ``GrpcCall``'s sending side only (room, unsent bytes,
the two drain callbacks); the end-to-end behaviour beside a real server is in
test_flow.py (a reply passes a stopped frontend holding the stream).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from konnectivity_fast.agent.endpoint import CONGESTED_READ_SIZE, READ_SIZE, Endpoint
from konnectivity_fast.agent.sender import RESERVED_WINDOW, UNSENT_LIMIT, FairSender
from konnectivity_fast.transport.call import GrpcCall

KIB = 1 << 10


class Stream:
    """A server stream with a window: what is sent beyond it is unsent."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.queued = 0  # sent and not yet let out by the peer
        self.sent: list[tuple[int, int]] = []  # (connect_id, size)
        self.room_waiters: list[tuple[int, Callable[[], None]]] = []
        self.unsent_waiters: list[tuple[int, Callable[[], None]]] = []

    # -- the GrpcCall side FairSender uses --

    def send_room(self) -> int:
        return max(0, self.window - self.queued)

    def unsent(self) -> int:
        return max(0, self.queued - self.window)

    def when_room(self, callback: Callable[[], None], room: int) -> None:
        self.room_waiters.append((room, callback))

    def when_drained(
        self, callback: Callable[[], None], *, below: int, unsent: bool = False
    ) -> None:
        assert unsent
        self.unsent_waiters.append((below, callback))

    # -- the test's side --

    def send(self, connect_id: int, data: bytes) -> None:
        self.queued += len(data)
        self.sent.append((connect_id, len(data)))

    def peer_takes(self, nbytes: int) -> None:
        """The peer took ``nbytes`` and gave the window back: run what now holds."""
        self.queued = max(0, self.queued - nbytes)
        rooms, self.room_waiters = self.room_waiters, []
        drains, self.unsent_waiters = self.unsent_waiters, []
        for room, callback in rooms:
            if self.send_room() >= room:
                callback()
            else:
                self.room_waiters.append((room, callback))
        for below, callback in drains:
            if self.unsent() < below:
                callback()
            else:
                self.unsent_waiters.append((below, callback))


class Backend:
    def __init__(self, connect_id: int) -> None:
        self.connect_id = connect_id
        self.resumed = 0

    def resume_reading(self) -> None:
        self.resumed += 1


def make(window: int) -> tuple[Stream, FairSender]:
    stream = Stream(window)
    return stream, FairSender(cast(GrpcCall, stream), stream.send)


def offer(sender: FairSender, backend: Backend, size: int) -> bool:
    return sender.offer(cast(Endpoint, backend), b"x" * size)


def test_bulk_reads_leave_the_reserve_and_a_reply_spends_it() -> None:
    stream, sender = make(window=4 * RESERVED_WINDOW)
    bulk, reply = Backend(1), Backend(3)
    sent = 0
    while offer(sender, bulk, CONGESTED_READ_SIZE):
        sent += 1
    # The window's last RESERVED_WINDOW bytes are not for bulk reads.
    assert sent * CONGESTED_READ_SIZE == 3 * RESERVED_WINDOW
    assert sender.congested
    assert sender.held(cast(Endpoint, bulk)) == CONGESTED_READ_SIZE
    # A short read passes the waiting bulk one, into the reserve.
    assert offer(sender, reply, KIB)
    assert stream.unsent() == 0
    assert stream.sent[-1] == (3, KIB)
    # The bulk read goes once the peer gave back a read and the reply.
    stream.peer_takes(CONGESTED_READ_SIZE)
    assert stream.sent[-1] == (3, KIB)
    stream.peer_takes(KIB)
    assert stream.sent[-1] == (1, CONGESTED_READ_SIZE)
    assert bulk.resumed == 1
    assert sender.held(cast(Endpoint, bulk)) == 0


def test_short_reads_queue_a_little_beyond_the_window() -> None:
    stream, sender = make(window=0)
    reply = Backend(3)
    sent = 0
    while offer(sender, reply, KIB):
        sent += 1
    # Sent while less than UNSENT_LIMIT was queued: the one that crossed it, no more.
    assert sent == UNSENT_LIMIT // KIB
    assert sender.held(cast(Endpoint, reply)) == KIB
    stream.window = UNSENT_LIMIT
    stream.peer_takes(0)
    assert sender.held(cast(Endpoint, reply)) == 0
    assert reply.resumed == 1


def test_waiting_bulk_reads_take_turns_in_order() -> None:
    stream, sender = make(window=RESERVED_WINDOW + CONGESTED_READ_SIZE)
    first, second, third = Backend(1), Backend(3), Backend(5)
    assert offer(sender, first, CONGESTED_READ_SIZE)
    assert not offer(sender, second, CONGESTED_READ_SIZE)
    assert not offer(sender, third, CONGESTED_READ_SIZE)
    # The first again: behind the two waiting, though it is not waiting itself.
    assert not offer(sender, first, CONGESTED_READ_SIZE)
    for expected in (3, 5, 1):
        stream.peer_takes(CONGESTED_READ_SIZE)
        assert stream.sent[-1] == (expected, CONGESTED_READ_SIZE)


def test_a_small_window_is_not_waited_on_forever() -> None:
    # Upstream's server starts a stream at 64 KiB: a full 128 KiB read cannot fit with a
    # reserve. It goes once the window is as open as the stream has shown.
    window = 64 * KIB
    stream, sender = make(window=window)
    backend = Backend(1)
    assert sender.congested  # reads would be small here
    assert offer(sender, backend, CONGESTED_READ_SIZE)
    assert not offer(sender, backend, READ_SIZE)
    stream.peer_takes(CONGESTED_READ_SIZE)
    assert stream.sent[-1] == (1, READ_SIZE)


def test_a_closing_endpoint_sends_its_waiting_read_and_a_dropped_one_does_not() -> None:
    stream, sender = make(window=64 * KIB)
    closing, dropped = Backend(1), Backend(3)
    assert offer(sender, Backend(5), 48 * KIB)
    assert not offer(sender, closing, CONGESTED_READ_SIZE)
    assert not offer(sender, dropped, CONGESTED_READ_SIZE)
    sender.flush(cast(Endpoint, closing))
    sender.drop(cast(Endpoint, dropped))
    assert stream.sent[1:] == [(1, CONGESTED_READ_SIZE)]
    stream.peer_takes(64 * KIB)
    assert stream.sent[1:] == [(1, CONGESTED_READ_SIZE)]
