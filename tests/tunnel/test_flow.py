"""flow.v1's arithmetic (tunnel/flow.py): credit spent and reopened, windows that never
promise more than the consumer can hold, growth shared exactly through the budget."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.tunnel.flow import (
    INITIAL_WINDOW,
    MAX_WINDOW,
    OVERSHOOT_LIMIT,
    GrowthBudget,
    ReceiveWindow,
    SendCredit,
)


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


def test_a_fresh_window_grants_nothing_until_a_quarter_is_used() -> None:
    window = ReceiveWindow(GrowthBudget())
    assert window.in_flight == INITIAL_WINDOW
    window.receive(INITIAL_WINDOW // 4 - 1)
    assert window.grant(buffered=INITIAL_WINDOW // 4 - 1) == 0


def test_a_slow_consumer_gets_nothing_more_until_it_drains() -> None:
    window = ReceiveWindow(GrowthBudget())
    window.receive(INITIAL_WINDOW)
    assert window.grant(buffered=INITIAL_WINDOW) == 0  # all of it still queued
    assert window.grant(buffered=INITIAL_WINDOW // 2) == INITIAL_WINDOW // 2
    assert window.in_flight + INITIAL_WINDOW // 2 == window.window


def test_a_fast_consumer_grows_the_window_to_its_cap() -> None:
    budget = GrowthBudget()
    window = ReceiveWindow(budget)
    for _ in range(20):
        window.receive(window.in_flight)  # the peer spends all it has
        window.grant(buffered=0)  # and the consumer took it all at once
    assert window.window == MAX_WINDOW
    assert budget.grown == MAX_WINDOW - INITIAL_WINDOW
    window.release()
    assert budget.grown == 0


def test_growth_stops_at_the_process_budget() -> None:
    budget = GrowthBudget(limit=INITIAL_WINDOW)
    first, second = ReceiveWindow(budget), ReceiveWindow(budget)
    for window in (first, second):
        for _ in range(5):
            window.receive(window.in_flight)
            window.grant(buffered=0)
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
            granted = window.grant(buffered)
            if granted:
                credit.add(granted)
                assert window.in_flight + buffered <= window.window
        assert credit.credit == window.in_flight
        assert INITIAL_WINDOW <= window.window <= MAX_WINDOW
        assert budget.grown == window.window - INITIAL_WINDOW
    window.release()
    assert budget.grown == 0
