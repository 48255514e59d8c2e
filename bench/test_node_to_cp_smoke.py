"""Smoke test of the node-to-control-plane benchmark's machinery (``bench/node_to_cp.py``):
our server and agent with a mapped port, every figure on tiny sizes (~20 s), the report's
structure, the table, the JSON, and that every byte went through exactly (the
orchestrator's own byte-for-byte check in both ways, the load generator's counts). Never a
timing or a target: the machine may be busy. Needs Go for the load generator; without it
the test is skipped, except in CI where it fails.

    .venv/bin/python -m pytest bench/test_node_to_cp_smoke.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import node_to_cp
from bench._smoke import need_go

pytestmark = pytest.mark.timeout(180)

TINY = [
    "--quick",
    "--runs=1",
    "--bulk-mib=1",
    "--rtt-count=20",
    "--side-conns=2",
    "--side-mib=1",
    "--stall-runs=1",
    "--window=1",
    "--check-mib=1",
    "--echo-checks=5",
]


def test_every_figure_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_go()
    out = tmp_path / "n2cp.json"
    assert node_to_cp.main([*TINY, "--json", str(out)]) == 0
    report = json.loads(out.read_text())

    # Both ways checked byte for byte by the orchestrator, and every transfer exact.
    assert report["check"] == {
        way: {"download": True, "upload": True, "echo": True} for way in node_to_cp.WAYS
    }
    assert report["byte_exact"] is True

    # a. bulk transfers, both ways, both directions.
    assert set(report["transfer"]) == {"down", "up"}
    for figures in report["transfer"].values():
        for way in node_to_cp.WAYS:
            (run,) = figures[way]["runs"]
            assert run["exact"] and run["bytes"] == run["expected_bytes"] == 1 << 20
            assert figures[way]["mb_s"] > 0
        assert figures["ratio"] > 0

    # b. round trips.
    for way in node_to_cp.WAYS:
        (run,) = report["rtt"][way]["runs"]
        assert run["exact"] and run["count"] == 20
        assert 0 < report["rtt"][way]["p50_us"] <= report["rtt"][way]["p99_us"]
    assert report["rtt"]["ratio_p50"] > 0 and report["rtt"]["ratio_p99"] > 0

    # c. forward beside a stalled reverse client: the figures exist; their values are the
    # benchmark's to report (a stalled run may hit its bound).
    for d in ("down", "up"):
        stall = report["stall"][d]
        assert {"alone_mb_s", "stalled_mb_s", "kept_pct", "met", "timed_out"} <= set(stall)
        (alone,) = stall["runs"]["alone"]
        assert alone["exact"]
        assert len(stall["runs"]["stalled"]) == 1
        assert stall["target_pct"] == node_to_cp.KEPT_TARGET
    assert report["stall"]["new_connection"]["tried"] == 1

    table = capsys.readouterr().out
    for needle in ("reverse", "forward", "rev/fwd", "kept", ">= 90%", "byte-for-byte"):
        assert needle in table
