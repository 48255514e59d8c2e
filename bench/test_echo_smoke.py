"""Smoke test of the echo benchmark machinery: both servers, every cell, ~1 s each.

Only correctness is asserted (every echo equal to what was sent, in order; counts above
zero; statuses OK; the JSON complete), never a timing: the machine may be busy.

    .venv/bin/python -m pytest bench/test_echo_smoke.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import echo
from bench._echo_proc import ChildError
from bench._echo_report import METRICS, missing_keys

IDLE_STREAMS = 200


@pytest.mark.timeout(180)
def test_echo_benchmark_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "echo.json"
    code = echo.main(
        [
            "--quick",
            "--duration",
            "1",
            "--warmup",
            "0.3",
            "--runs",
            "1",
            "--idle-streams",
            str(IDLE_STREAMS),
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    assert missing_keys(results) == []
    assert results["ok"] is True
    assert set(results["servers"]) == {"ours", "grpcio"}
    for kind, server in results["servers"].items():
        assert set(server["sizes"]) == {"1024", "32768"}, kind
        for size, entry in server["sizes"].items():
            for run in entry["runs"]:
                where = f"{kind} {size}: {run}"
                assert run["ok"], where
                assert run["window_msgs"] > 0, where
                assert run["mismatches"] == 0, where
                assert run["recv_msgs"] == run["sent_msgs"] > 0, where
                assert run["recv_bytes"] == run["sent_bytes"] == run["sent_msgs"] * int(size)
                assert run["bad_statuses"] == 0 and run["errors"] == [], where
                assert all(run[m] > 0 for m in METRICS if m != "other_cpu_pct"), where
                assert run["other_cpu_pct"] >= 0, where
        for run in server["idle"]["runs"]:
            assert run["echoed"] == run["streams"] == IDLE_STREAMS, run
            assert run["open_streams"] == IDLE_STREAMS, run
            assert run["mismatches"] == 0 and run["bad_statuses"] == 0, run
    assert set(results["ratios"]) == {"1024", "32768", "idle"}
    # The table was printed, with both servers and the targets.
    assert "grpc.aio" in printed.out and "target" in printed.out


def test_missing_keys_reports_gaps() -> None:
    assert "machine" in missing_keys({})
    broken = {
        "machine": {},
        "config": {},
        "servers": {"ours": {"sizes": {"1024": {}}}},
        "ratios": {},
        "ok": True,
    }
    gaps = missing_keys(broken)
    assert "machine.nproc" in gaps
    assert "servers.ours.sizes.1024.msgs_per_s" in gaps
    assert "servers.ours.idle" in gaps


def test_children_are_gone_after_a_failure(tmp_path: Path) -> None:
    """A load process that cannot reach its server fails the run, and no child survives."""
    config = echo.Config(
        duration=0.5, warmup=0.1, runs=1, servers=("ours",), sizes=(1024,), idle_streams=10
    )
    bench = echo.Bench(config, progress=lambda _: None)
    pids: list[int] = []
    try:
        server, _ = bench.start_server("ours")
        pids.append(server.pid)
        with pytest.raises(ChildError):
            bench.throughput(server, str(tmp_path / "nowhere.sock"), 1024)
    finally:
        bench.close()
    assert pids
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
