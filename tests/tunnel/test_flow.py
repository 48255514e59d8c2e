"""flow.v1's arithmetic (tunnel/flow.py): credit spent and reopened, windows that never
promise more than the consumer can hold, growth shared exactly through the budget."""

from __future__ import annotations

import collections

from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.tunnel.flow import (
    GRANT_DIVISOR,
    INITIAL_WINDOW,
    MAX_WINDOW,
    OVERSHOOT_LIMIT,
    TURN_TIME,
    GrowthBudget,
    ReceiveWindow,
    SendCredit,
)

MIB = 1 << 20


def test_send_credit_closes_at_zero_and_reopens_on_a_grant() -> None:
    credit = SendCredit(100)
    assert credit.open
    assert credit.spend(60)
    assert not credit.spend(60)  # one packet may overshoot
    assert credit.credit == -20 and not credit.open
    assert not credit.add(10)  # still spent: not reopened
    assert credit.add(20)  # now it is
    assert credit.credit == 10
    assert not credit.add(5)  # already open: not a reopening


def test_a_fresh_window_grants_nothing_until_a_grants_worth_is_used() -> None:
    window = ReceiveWindow(GrowthBudget())
    assert window.in_flight == INITIAL_WINDOW
    window.receive(INITIAL_WINDOW // GRANT_DIVISOR - 1)
    assert window.grant(buffered=0, now=0.0) == 0
    window.receive(1)
    assert window.grant(buffered=0, now=0.0) == INITIAL_WINDOW // GRANT_DIVISOR


def test_a_slow_consumer_gets_nothing_more_until_it_drains() -> None:
    window = ReceiveWindow(GrowthBudget())
    window.receive(INITIAL_WINDOW)
    assert window.grant(buffered=INITIAL_WINDOW, now=0.0) == 0  # all of it still queued
    assert window.grant(buffered=INITIAL_WINDOW // 2, now=0.0) == INITIAL_WINDOW // 2
    assert window.in_flight + INITIAL_WINDOW // 2 == window.window


def test_a_fast_consumer_grows_the_window_to_its_cap() -> None:
    budget = GrowthBudget()
    window = ReceiveWindow(budget)
    for _ in range(20):
        window.receive(window.in_flight)  # the peer spends all it has
        window.grant(buffered=0, now=0.0)  # and the consumer took it all at once
    assert window.window == MAX_WINDOW
    assert budget.grown == MAX_WINDOW - INITIAL_WINDOW
    window.release()
    assert budget.grown == 0


def _pipeline(rate: int, delay: int, ticks: int, tick: float) -> tuple[ReceiveWindow, list[int]]:
    """A sender of ``rate`` bytes per tick (in 128 KiB DATA, while its credit lasts) and
    a consumer that takes everything at once, ``delay`` ticks apart each way (DATA one
    way, FLOW_CREDIT the other), a tick lasting ``tick`` s. The receiver's window, and the
    bytes each tick delivered."""
    window, credit = ReceiveWindow(GrowthBudget()), SendCredit()
    data: collections.deque[tuple[int, int]] = collections.deque()
    grants: collections.deque[tuple[int, int]] = collections.deque()
    delivered = []
    for t in range(ticks):
        while grants and grants[0][0] <= t:
            credit.add(grants.popleft()[1])
        left = rate
        while left > 0 and credit.open:
            size = min(128 << 10, left)
            credit.spend(size)
            data.append((t + delay, size))
            left -= size
        got = 0
        while data and data[0][0] <= t:
            got += data.popleft()[1]
        window.receive(got)
        delivered.append(got)
        granted = window.grant(buffered=0, now=t * tick)
        if granted:
            grants.append((t + delay, granted))
    return window, delivered


def test_a_window_bound_tunnel_grows_to_its_cap() -> None:
    """256 KiB per 2 ms tick, 8 ticks of credit round trip: 4 MiB in flight keep it busy.
    Its credit is always on its way back, so the receiver never sees the peer out of it;
    what tells the window is the limit is that it turns (the consumer takes all of it) in
    less than TURN_TIME. Once grown, its grants come in half windows: about one credit
    packet per 2 MiB."""
    window, delivered = _pipeline(rate=256 << 10, delay=4, ticks=400, tick=0.002)
    assert window.window == MAX_WINDOW
    late = delivered[200:]
    assert sum(late) >= 0.95 * len(late) * (256 << 10)  # no longer bound by its window
    packets = 0
    window, credit = ReceiveWindow(GrowthBudget()), SendCredit()
    for t in range(4000):  # the same sender, credit returned at once: count the packets
        window.receive(min(256 << 10, max(credit.credit, 0)))
        credit.spend(min(256 << 10, max(credit.credit, 0)))
        granted = window.grant(buffered=0, now=t * 0.002)
        if granted:
            packets += 1
            credit.add(granted)
    assert window.window == MAX_WINDOW
    assert packets <= 1.25 * window.received / (MAX_WINDOW // GRANT_DIVISOR)


def test_a_slow_sender_keeps_the_initial_window() -> None:
    """64 KiB per 20 ms (3 MB/s): a window turns in 80 ms, more than TURN_TIME; a larger
    window would only reserve growth budget."""
    window, _ = _pipeline(rate=64 << 10, delay=2, ticks=300, tick=0.02)
    assert window.window == INITIAL_WINDOW


def test_a_consumer_behind_for_a_moment_keeps_its_window() -> None:
    """A fast consumer that falls behind (a scheduling delay) holds three quarters of the
    window over many grant decisions within TURN_TIME: the window stays, or the consumer
    would run dry before the next grant arrived."""
    window = ReceiveWindow(GrowthBudget(), initial=INITIAL_WINDOW)
    window._resize(MAX_WINDOW)
    window.grant(buffered=0, now=0.0)
    for i in range(50):
        window.receive(window.in_flight)
        window.grant(buffered=MAX_WINDOW - 1024 * i, now=0.0005 * i)
    assert window.window == MAX_WINDOW


def test_a_slow_consumer_halves_its_window_once_per_turn_time() -> None:
    budget = GrowthBudget()
    window = ReceiveWindow(budget)
    window._resize(MAX_WINDOW)
    window.grant(buffered=0, now=0.0)
    window.receive(window.in_flight)
    now = TURN_TIME * 1.5  # the consumer took nothing in all that time
    window.grant(buffered=MAX_WINDOW, now=now)
    assert window.window == MAX_WINDOW // 2
    window.grant(buffered=MAX_WINDOW, now=now + TURN_TIME / 2)
    assert window.window == MAX_WINDOW // 2  # not again within TURN_TIME
    window.grant(buffered=MAX_WINDOW, now=now + TURN_TIME * 1.5)
    assert window.window == MAX_WINDOW // 4
    assert budget.grown == MAX_WINDOW // 4 - INITIAL_WINDOW


def test_a_grant_is_due_at_the_drain_target() -> None:
    """The consumer's backlog at ``drain_target`` frees a grant's worth of the window: the
    level the adapters wait for, instead of an empty queue."""
    window = ReceiveWindow(GrowthBudget())
    window.receive(INITIAL_WINDOW)
    assert window.grant(buffered=INITIAL_WINDOW, now=0.0) == 0
    target = window.drain_target()
    assert target == INITIAL_WINDOW - INITIAL_WINDOW // GRANT_DIVISOR
    assert window.grant(buffered=target + 1, now=0.0) == 0
    assert window.grant(buffered=target, now=0.0) == INITIAL_WINDOW // GRANT_DIVISOR
    next_target = window.drain_target()
    assert next_target is not None and next_target < target  # once the rest is taken


def test_no_drain_target_while_only_arrivals_can_make_a_grant_due() -> None:
    """The peer holds more than the window less a grant in flight: even an empty queue
    frees less than a grant, so nothing should watch the consumer (the DATA to come will
    bring the next decision)."""
    window = ReceiveWindow(GrowthBudget())
    window.receive(INITIAL_WINDOW // GRANT_DIVISOR - 1)
    assert window.grant(buffered=INITIAL_WINDOW // GRANT_DIVISOR - 1, now=0.0) == 0
    assert window.drain_target() is None
    window.receive(1)
    assert window.drain_target() == 0


def test_growth_stops_at_the_process_budget() -> None:
    budget = GrowthBudget(limit=INITIAL_WINDOW)
    first, second = ReceiveWindow(budget), ReceiveWindow(budget)
    for window in (first, second):
        for _ in range(5):
            window.receive(window.in_flight)
            window.grant(buffered=0, now=0.0)
    assert first.window == 2 * INITIAL_WINDOW  # took the whole budget
    assert second.window == INITIAL_WINDOW
    first.release()
    assert budget.grown == 0


def test_a_breach_beyond_the_overshoot_limit_is_reported() -> None:
    window = ReceiveWindow(GrowthBudget())
    assert window.receive(INITIAL_WINDOW + OVERSHOOT_LIMIT)
    assert not window.receive(1)


@given(
    st.lists(
        st.tuples(st.sampled_from(["send", "consume", "grant"]), st.integers(0, 1 << 21)),
        max_size=200,
    )
)
def test_windows_never_promise_more_than_they_hold(steps: list[tuple[str, int]]) -> None:
    """A sender that respects its credit and a consumer that drains at random: after
    every grant, what is in flight plus what is buffered fits the window, the sender
    never exceeds its credit by more than one packet, and the budget's total is exact."""
    budget = GrowthBudget(limit=3 * INITIAL_WINDOW)
    window = ReceiveWindow(budget)
    credit = SendCredit()
    buffered = 0
    for action, size in steps:
        if action == "send" and credit.open:
            credit.spend(size)
            assert window.receive(size)
            buffered += size
        elif action == "consume":
            buffered -= min(size, buffered)
        elif action == "grant":
            granted = window.grant(buffered, now=0.0)
            if granted:
                credit.add(granted)
                assert window.in_flight + buffered <= window.window
        assert credit.credit == window.in_flight
        assert INITIAL_WINDOW <= window.window <= MAX_WINDOW
        assert budget.grown == window.window - INITIAL_WINDOW
    window.release()
    assert budget.grown == 0
