"""Smoke test of the server-at-scale benchmark's machinery (``bench/server_scale.py``):
our server held by a small swarm of fake agents (``loadgen swarm``), every figure on
tiny counts, tunnel set-ups answered by the swarm's agents, two churn rounds, the table
and the JSON. Never a timing or a target: the machine may be busy. Needs Go for the load
generator; without it the test is skipped, except in CI where it fails.

    .venv/bin/python -m pytest bench/test_server_scale_smoke.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import server_scale
from bench._smoke import need_go

pytestmark = pytest.mark.timeout(180)

AGENTS = 20
TINY = [
    "--impls=ours",
    f"--agents={AGENTS}",
    "--batch=10",
    "--setup-loops=2",
    "--setup-seconds=0.5",
    "--churn=2",
    "--churn-agents=10",
]


def test_every_figure_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_go()
    out = tmp_path / "scale.json"
    assert server_scale.main([*TINY, f"--json={out}"]) == 0
    report = json.loads(out.read_text())

    ours = report["scale"][str(AGENTS)]["ours"]
    assert ours["connected"] == AGENTS  # every fake agent got the server's headers
    assert ours["rss_held_mib"] > 0 and ours["connect_cpu_ms"] > 0
    assert ours["worst_connect_ms"] >= ours["p50_connect_ms"] > 0
    # The server dialled through the swarm's agents, which answered as backends.
    assert ours["tunnels_per_s"] > 0 and ours["failures"] == 0

    churn = report["churn"]["by_impl"]["ours"]
    assert len(churn["held_mib"]) == len(churn["left_mib"]) == 2
    assert churn["last_over_second"] is not None

    table = capsys.readouterr().out
    assert f"N = {AGENTS} agents" in table and "churn: 10 agents x 2 rounds" in table
