"""``RateLimitedLog``: a burst of lines per interval, the rest counted and reported."""

from __future__ import annotations

import logging

import pytest

from konnectivity_fast.transport.ratelog import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_counted_then_reported(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("test.ratelog")
    limited = RateLimitedLog(logger, burst=3, interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog"):
        written = [limited("peer %d refused", i) for i in range(10)]
        assert written == [True] * 3 + [False] * 7
        clock.now += 4.0
        assert not limited("peer %d refused", 10)
        clock.now += 6.0  # a new interval
        assert limited("peer %d refused", 11)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:3] == ["peer 0 refused", "peer 1 refused", "peer 2 refused"]
    assert messages[3] == "peer 11 refused (8 similar lines suppressed in the last 10s)"
    assert len(messages) == 4


def test_disabled_level_costs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.ratelog2"), logging.DEBUG, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.ratelog2"):
        assert not any(limited("x") for _ in range(100))
    assert caplog.records == []
