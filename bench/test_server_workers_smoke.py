"""Smoke test of the workers comparison (``bench/server_scale.py --workers-compare``): our
server with ``--workers=1`` and ``--workers=2`` held in turn by a small swarm whose every
agent holds one connection per worker (``loadgen swarm -servers=W``), tunnel set-ups
through the shared frontend socket, the table and the JSON. Never a timing or a target:
the machine may be busy. Needs Go for the load generator; without it the test is skipped,
except in CI where it fails.

    .venv/bin/python -m pytest bench/test_server_workers_smoke.py
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
    "--workers-compare",
    "1",
    "2",
    f"--agents={AGENTS}",
    "--batch=10",
    "--setup-loops=2",
    "--setup-seconds=0.5",
]


def test_one_and_two_workers_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    need_go()
    out = tmp_path / "workers.json"
    assert server_scale.main([*TINY, f"--json={out}"]) == 0
    report = json.loads(out.read_text())

    by_variant = report["workers_compare"]["by_agents"][str(AGENTS)]
    assert set(by_variant) == {"ours-1w", "ours-2w"}
    for workers in (1, 2):
        r = by_variant[f"ours-{workers}w"]
        # Every agent holds one connection to each worker, each worker its own server ID,
        # and every worker told the agents there are `workers` servers.
        assert r["connected"] == AGENTS and r["failures"] == 0
        assert len(r["servers"]) == workers, r["servers"]
        assert sorted(r["servers"].values()) == [AGENTS] * workers
        assert r["server_counts"] == {str(workers): AGENTS * workers}
        assert r["all_workers_held"] is True
        assert r["dials"] >= AGENTS * workers
        # Every figure present; the server's CPU is that of its process tree.
        assert r["connect_cpu_ms"] > 0 and "kib_per_agent" in r
        assert r["worst_connect_ms"] >= r["p50_connect_ms"] > 0 and r["storm_s"] > 0
        assert r["tunnels_per_s"] > 0 and r["server_cpu_ms_per_tunnel"] > 0
    # The supervisor and its two workers.
    assert by_variant["ours-2w"]["processes"] >= 3
    two_ids = sorted(by_variant["ours-2w"]["servers"])
    assert two_ids[0] != two_ids[1] and all(i.rsplit("-", 1)[-1] in ("0", "1") for i in two_ids)

    table = capsys.readouterr().out
    assert f"N = {AGENTS} agents" in table and "2w/1w" in table and "speed-up" in table
