"""The server's flow.v1 adapter (server/flow.py ``FlowControl``) against a fake frontend and
agent call, no sockets: a source is paused once when its credit runs out, however many
messages its last read still delivers; and a grant is asked for when the frontend's queue
is down to where a grant's worth is free, not only once it is empty."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from konnectivity_fast.metrics import flow as flow_metrics
from konnectivity_fast.server.flow import FlowControl
from konnectivity_fast.transport.call import GrpcCall
from konnectivity_fast.tunnel.flow import GRANT_DIVISOR, INITIAL_WINDOW
from konnectivity_fast.wire.codec import decode_packet
from konnectivity_fast.wire.packets import FlowCredit


class FakeAgent:
    """The agent's call: keeps what is sent on it."""

    stream_id = 1

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sent.append(message)

    def credits(self) -> list[int]:
        out = []
        for message in self.sent:
            payload = decode_packet(message).payload
            assert isinstance(payload, FlowCredit)
            out.append(payload.bytes)
        return out


class FakeSource:
    """The frontend side of one tunnel: a queue of ``backlog`` bytes toward it."""

    def __init__(self) -> None:
        self.backlog = 0
        self.pauses = 0
        self.resumes = 0
        self.waits: list[tuple[int, Callable[[], None]]] = []

    def flow_backlog(self) -> int:
        return self.backlog

    def when_drained_to(self, level: int, callback: Callable[[], None]) -> None:
        self.waits.append((level, callback))

    def pause_for_credit(self) -> None:
        self.pauses += 1

    def resume_for_credit(self) -> None:
        self.resumes += 1

    def flow_breached(self) -> None:
        raise AssertionError("no breach here")


def test_a_source_is_paused_once_per_spent_credit() -> None:
    """A gRPC frontend's read delivers every message it holds after ``pause_reading``: the
    messages past zero credit pause nothing more and count no second stall."""
    flow = FlowControl()
    source = FakeSource()
    tunnel = flow.tunnel(cast(GrpcCall, FakeAgent()), 2, source)
    stalls = flow_metrics.CREDIT_STALLS.value
    for _ in range(INITIAL_WINDOW // (16 << 10) + 30):
        flow.sent(tunnel, 16 << 10)
    assert source.pauses == 1
    assert flow_metrics.CREDIT_STALLS.value == stalls + 1
    flow.credit(tunnel, -tunnel.credit.credit + 2 * INITIAL_WINDOW)
    assert source.resumes == 1
    flow.sent(tunnel, INITIAL_WINDOW)
    assert source.pauses == 1  # still open
    flow.sent(tunnel, INITIAL_WINDOW)
    assert source.pauses == 2


def test_a_grant_is_asked_for_before_the_frontend_runs_dry() -> None:
    """The agent filled the window and the frontend holds all of it: the server asks to
    hear back once the frontend's queue is down to where a grant's worth is free, and then
    grants it, while the frontend still has bytes to take."""

    async def main() -> None:
        flow = FlowControl()
        agent, source = FakeAgent(), FakeSource()
        tunnel = flow.tunnel(cast(GrpcCall, agent), 2, source)
        source.backlog = INITIAL_WINDOW
        flow.received(tunnel, INITIAL_WINDOW)
        await asyncio.sleep(0)  # the grant decision at the end of the loop turn
        assert agent.sent == []  # nothing free yet
        [(level, callback)] = source.waits
        assert level == INITIAL_WINDOW - INITIAL_WINDOW // GRANT_DIVISOR
        source.backlog = level
        callback()
        await asyncio.sleep(0)
        assert agent.credits() == [INITIAL_WINDOW // GRANT_DIVISOR]
        assert source.waits[-1][0] < level  # and the next grant after that

    asyncio.run(main())
