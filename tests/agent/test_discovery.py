"""The direct-endpoint book and the sticky detector: pure decisions, driven by hand with an
explicit clock."""

from __future__ import annotations

from random import Random

from konnectivity_fast.agent.discovery import MAX_DIRECT_ENDPOINTS, EndpointBook, Source
from konnectivity_fast.agent.policy import StickyDetector
from konnectivity_fast.wire.endpoints import Address

A = Address("10.0.0.1", 8132)
B = Address("10.0.0.2", 8132)
C = Address("10.0.0.3", 8132)


def book() -> EndpointBook:
    return EndpointBook(1.0, 10.0, Random(3))


def test_static_addresses_are_due_until_connected() -> None:
    b = book()
    b.set_source(Source.STATIC, {A: "", B: ""})
    assert b.due(0.0, set()) == [A, B]
    b.started(A)
    assert b.due(0.0, set()) == [B]  # one attempt per address at a time
    b.connected(A, "s1", kept=True)
    assert b.due(0.0, {"s1"}) == [B]
    assert b.counts()[Source.STATIC] == 2


def test_a_duplicate_is_not_retried_until_its_id_is_lost() -> None:
    b = book()
    b.set_source(Source.STATIC, {A: ""})
    b.started(A)
    b.connected(A, "s1", kept=False)  # s1 was already held through the balancer
    assert b.due(100.0, {"s1"}) == []
    assert b.next_due({"s1"}) is None
    assert b.due(100.0, set()) == [A]  # s1 lost: try the address again


def test_claimed_ids_skip_held_servers_without_dialling() -> None:
    b = book()
    b.set_source(Source.HEADER, {A: "s1", B: "s2"})
    assert b.claimed_ids() == {"s1", "s2"}
    assert b.due(0.0, {"s1"}) == [B]


def test_what_a_connection_saw_beats_a_claim() -> None:
    b = book()
    b.set_source(Source.HEADER, {A: "old"})
    b.started(A)
    b.connected(A, "new", kept=False)
    assert b.due(0.0, {"old"}) == [A]
    assert b.due(0.0, {"new"}) == []


def test_failures_back_off_per_address_up_to_the_cap() -> None:
    b = book()
    b.set_source(Source.STATIC, {A: "", B: ""})
    now = 0.0
    waits = []
    assert b.due(now, set()) == [A, B]
    b.started(B)  # B stays in flight: only A is waiting below
    for _ in range(10):
        b.started(A)
        b.failed(A, now)
        assert b.due(now, set()) == []  # A waits
        due_at = b.next_due(set())
        assert due_at is not None
        waits.append(due_at - now if due_at > now else 0.0)
        now = max(due_at, now) + 1e-9
        assert A in b.due(now, set())
    # apimachinery's sequence from 1 s, x1.5, capped at 10 s, each with up to 10 % jitter.
    bases = [1.0, 1.5, 2.25, 3.375, 5.0625, 7.59375, 10.0, 10.0, 10.0, 10.0]
    for wait, base in zip(waits, bases, strict=True):
        assert base <= wait <= base * 1.1


def test_a_lost_connection_is_redialled_after_the_interval() -> None:
    b = book()
    b.set_source(Source.STATIC, {A: ""})
    b.started(A)
    b.connected(A, "s1", kept=True)
    assert b.due(5.0, {"s1"}) == []
    b.lost(A, 5.0)
    assert b.due(5.0, set()) == []
    assert b.due(6.2, set()) == [A]


def test_addresses_no_source_lists_are_forgotten_unless_in_flight() -> None:
    b = book()
    b.set_source(Source.STATIC, {A: ""})
    b.set_source(Source.SERVICE, {A: "", B: ""})
    b.started(B)
    b.set_source(Source.SERVICE, {})
    assert len(b) == 2  # A still static, B connecting
    assert b.counts() == {Source.STATIC: 1, Source.SERVICE: 0, Source.LEASE: 0, Source.HEADER: 0}
    assert b.due(0.0, set()) == [A]  # B has no source: never proposed again
    b.failed(B, 0.0)
    assert len(b) == 1


def test_the_book_is_bounded() -> None:
    b = book()
    many = {
        Address(f"10.1.{i // 256}.{i % 256}", 8132): "" for i in range(MAX_DIRECT_ENDPOINTS * 2)
    }
    b.set_source(Source.SERVICE, many)
    assert len(b) == MAX_DIRECT_ENDPOINTS
    b.set_source(Source.HEADER, {C: "s3"})
    assert len(b) == MAX_DIRECT_ENDPOINTS  # full: a new address waits for room
    b.set_source(Source.SERVICE, {})
    b.set_source(Source.HEADER, {C: "s3"})
    assert b.due(0.0, set()) == [C]


def test_sticky_is_suspected_after_the_window_and_cleared_when_satisfied() -> None:
    d = StickyDetector()
    window = StickyDetector.window(3)
    assert window == 9
    results = [d.duplicate("s1", held=1, count=3) for _ in range(window)]
    assert results == [False] * (window - 1) + [True]  # newly suspected once
    assert d.suspected and d.recent == {"s1": window}
    assert not d.duplicate("s1", held=1, count=3)  # already suspected: not "newly"
    assert not d.may_move(3)  # the window is full: retry at the normal interval
    d.satisfied()
    assert not d.suspected and d.in_a_row == 0


def test_a_new_server_breaks_the_streak() -> None:
    d = StickyDetector()
    for _ in range(4):
        d.duplicate("s1", held=1, count=3)
    assert d.may_move(3)
    d.new_server()
    assert d.in_a_row == 0 and d.may_move(3)


def test_duplicates_while_holding_every_server_are_not_suspicious() -> None:
    d = StickyDetector()
    for _ in range(50):
        assert not d.duplicate("s1", held=3, count=3)
    assert not d.suspected and d.in_a_row == 0
    assert StickyDetector.window(1) == 5  # the floor
