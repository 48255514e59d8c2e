"""``doctor lb``'s judgement of a tally (sans-IO): every verdict from answers made up
here; the same verdicts from real balancers are in test_doctor.py."""

from __future__ import annotations

import pytest

from konnectivity_fast.cli.doctor.probe import Attempt
from konnectivity_fast.cli.doctor.tlscheck import matches
from konnectivity_fast.cli.doctor.verdict import judge


def answers(*pairs: tuple[str, int]) -> list[Attempt]:
    return [Attempt(server_id, count) for server_id, count in pairs]


@pytest.mark.parametrize(
    ("attempts", "kind", "fix"),
    [
        (answers(("a", 3), ("b", 3), ("c", 3), ("a", 3)), "ok", ""),
        (answers(("a", 1), ("a", 1)), "ok", ""),
        (answers(("a", 3), ("a", 3), ("a", 3)), "sticky", "balance roundrobin"),
        (answers(("a", 3), ("b", 3), ("a", 3), ("b", 3)), "short", "--server-count=2"),
        (answers(("a", 2), ("b", 2), ("c", 2)), "count too low", "--server-count=3"),
        (answers(("a", 3), ("b", 2)), "inconsistent", "--count-server-leases"),
        ([Attempt(error="refused"), Attempt(error="refused")], "unreachable", ""),
    ],
)
def test_verdicts(attempts: list[Attempt], kind: str, fix: str) -> None:
    verdict = judge(attempts)
    assert verdict.kind == kind, verdict
    assert fix in verdict.fix
    assert verdict.ok is (kind == "ok")


def test_failed_tries_do_not_count_as_servers() -> None:
    verdict = judge([Attempt("a", 2), Attempt(error="timed out"), Attempt("b", 2)])
    assert verdict.kind == "ok"


@pytest.mark.parametrize(
    ("names", "host", "ok"),
    [
        (("DNS:konnectivity.example",), "konnectivity.example", True),
        (("DNS:konnectivity.example",), "KONNECTIVITY.example.", True),
        (("DNS:*.example",), "konnectivity.example", True),
        (("DNS:*.example",), "a.b.example", False),
        (("DNS:*.example",), "example", False),
        (("IP:10.0.0.1",), "10.0.0.1", True),
        (("DNS:10.0.0.1",), "10.0.0.1", False),  # Go matches an IP against IP SANs only
        (("IP:::1",), "[::1]", True),
        ((), "konnectivity.example", False),  # Go ignores the common name
    ],
)
def test_name_matching_as_go(names: tuple[str, ...], host: str, ok: bool) -> None:
    assert matches(names, host) is ok


@pytest.mark.parametrize(
    ("days", "start"),
    [(400.0, "ok: "), (12.0, "WARNING: "), (-1.0, "EXPIRED on ")],
)
def test_expiry_words(days: float, start: str) -> None:
    from konnectivity_fast.cli.doctor.lb import _expiry

    assert _expiry(days, "2027-01-01 00:00 UTC", 30.0).startswith(start)
