"""Smoke test of the tunnel benchmark machinery: every scenario, for ours, upstream and
direct TCP, in both frontend modes, on tiny sizes (~1 minute); the slow-reader scenarios
of the head-of-line family for ours, without and with flow.v1 (~1 minute); the bulk
transfers with flow.v1 on and off (~20 s); and which pairing each target is judged on.

Only the machinery is asserted (every load generator ran and reported, every figure is
present, the JSON, table and chart were written), never a timing or a target: the machine
may be busy. Needs Go (the load generator and upstream's binaries are built on demand);
without it the test is skipped, except in CI where it fails.

    .venv/bin/python -m pytest bench/test_tunnel_smoke.py
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from bench import tunnel
from bench._tunnel_procs import FLOW, MIXED
from bench._tunnel_report import SLOW, TARGETS, render, target_rows

IDLE_TUNNELS = 20
# Every scenario but the slow readers (test_slow_readers_tiny).
CLASSIC = [s for s in tunnel.SCENARIOS if s not in SLOW]
TINY = [
    "--quick",
    "--scenarios",
    *CLASSIC,
    "--single-mib=2",
    "--multi-mib=1",
    "--setup-seconds=0.2",
    "--rtt-count=50",
    f"--idle-tunnels={IDLE_TUNNELS}",
    "--hol-mib=1",
    "--hol-window=1",
    "--hol-probe=1",
    "--settle=0",
]
TARGET_KEYS = {"direct", *(f"{i}/{m}" for i in ("ours", "upstream") for m in tunnel.MODES)}
# One slow-reader scenario of each kind: an echo, downloads read at a set rate, downloads
# beside a reader that never reads.
SLOW_TINY = [
    "--family=hol",
    "--quick",
    "--impls",
    "ours",
    FLOW,
    "--scenarios",
    "slow4",
    "slow4x8r10",
    "stallx8",
    "--slow-base=0.3",
    "--slow-fill=0.5",
    "--slow-measure=0.5",
    "--stall-seconds=1",
    "--settle=0",
]


def _need_go() -> None:
    if shutil.which("go") is None and not os.environ.get("GO"):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no Go toolchain: the load generator cannot be built")
        pytest.skip("no Go toolchain: the load generator cannot be built")


@pytest.mark.timeout(1800)  # the first use may build upstream's binaries
def test_tunnel_benchmark_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _need_go()
    out, png = tmp_path / "tunnel.json", tmp_path / "tunnel.png"
    code = tunnel.main([*TINY, "--json", str(out), "--chart", str(png)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    cells = results["cells"]
    assert set(cells) == set(CLASSIC)
    for name in tunnel.SHARED:
        assert set(cells[name]) == TARGET_KEYS, name
    for name in set(tunnel.FRESH) & set(CLASSIC):
        assert set(cells[name]) == TARGET_KEYS - {"direct"}, name
    for name, by_target in cells.items():
        for key, cell in by_target.items():
            assert len(cell["runs"]) == 1, (name, key)
            # The head-of-line phases may legitimately move nothing (a blocked pair).
            assert cell["failed"] == 0, (name, key, cell["runs"])
            assert cell["metrics"], (name, key)
    for key, cell in cells["idle"].items():
        assert cell["runs"][0]["tunnels"] == IDLE_TUNNELS, key
    for name in tunnel.SHARED:
        for key in TARGET_KEYS - {"direct"}:
            mets = cells[name][key]["metrics"]
            assert "server_cpu_pct" in mets and "loadgen_cpu_pct" in mets, (name, key)
    # Every target row (TARGETS) is present for both modes.
    wanted = {(n, m, mode) for n, m, *_ in TARGETS if n in CLASSIC for mode in tunnel.MODES}
    assert {(r["scenario"], r["metric"], r["mode"]) for r in results["rows"]} == wanted
    assert "ours/up" in printed.out and "loadgen %" in printed.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(600)
def test_slow_readers_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The slow-reader plumbing, ours without and with flow.v1: every figure and the time
    series are there, whatever their values, and flow.v1 carried credit."""
    _need_go()
    out, png = tmp_path / "hol.json", tmp_path / "hol.png"
    code = tunnel.main([*SLOW_TINY, "--json", str(out), "--chart", str(png)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    cells = results["cells"]
    assert set(cells) == {"slow4", "slow4x8r10", "stallx8"}
    for name, by_target in cells.items():
        assert set(by_target) == {f"{i}/{m}" for i in ("ours", FLOW) for m in tunnel.MODES}
        for key, cell in by_target.items():
            assert cell["failed"] == 0, (name, key, cell["runs"])
            wanted = {m for n, m, *_ in TARGETS if n == name}
            assert wanted <= set(cell["metrics"]), (name, key, wanted - set(cell["metrics"]))
            run = cell["runs"][0]
            if SLOW[name][0] == "echo":
                assert run["echo_count"] >= 1 and run["setup_count"] >= 1, (name, key)
            else:
                series = run["series"]
                assert len(series["kib"]) == 8 and series["t_ms"].split(), (name, key)
            # Credit is counted on the flow.v1 pairing only; the 8 downloads at 10 MB/s
            # move far more than their initial windows, so it must have been granted.
            assert ("flow_credit_granted_bytes" in run) == key.startswith(FLOW), (name, key)
            if name == "slow4x8r10" and key.startswith(FLOW):
                assert run["flow_credit_granted_bytes"] > 0, (name, key)
    rows = {(r["scenario"], r["metric"], r["mode"]) for r in results["rows"]}
    assert rows == {(n, m, mode) for n, m, *_ in TARGETS if n in cells for mode in tunnel.MODES}
    assert "echo beside a 4 MB/s reader" in printed.out and "ours, flow.v1" in printed.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(600)
def test_flow_on_off_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The bulk transfers with flow.v1 on and off in the same run, on two pairs of each
    pairing (``--pairs``): both pairings ran on both of their pairs, the flow.v1 one
    exchanged credit each way, and the on-vs-off rows are there."""
    _need_go()
    out = tmp_path / "flow.json"
    args = ["--quick", "--impls", "ours", FLOW, "--no-direct", "--scenarios", "down1", "up1"]
    args += ["--runs=2", "--pairs=2"]
    code = tunnel.main([*args, "--single-mib=4", "--settle=0", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    for name, direction in (("down1", "granted"), ("up1", "received")):
        cell = results["cells"][name]
        assert set(cell) == {f"{i}/{m}" for i in ("ours", FLOW) for m in tunnel.MODES}
        for key in cell:
            assert [run["pair"] for run in cell[key]["runs"]] == [0, 1], (name, key)
        for mode in tunnel.MODES:
            for run in cell[f"{FLOW}/{mode}"]["runs"]:
                assert run[f"flow_credit_{direction}_bytes"] > 0, (name, mode, run)
    on_off = {(r["scenario"], r["mode"]) for r in results["rows"] if r["kind"] == "off_min"}
    assert on_off == {(n, m) for n in ("down1", "up1") for m in tunnel.MODES}
    assert "flow.v1 on vs off" in printed.out and "flow/ours" in printed.out


def _add(cells: dict[str, dict[str, Any]], name: str, key: str, metric: str, v: float) -> None:
    cell = cells.setdefault(name, {}).setdefault(key, {"runs": [{}], "failed": 0, "metrics": {}})
    cell["metrics"][metric] = {"median": v, "min": v, "max": v}


def test_targets_judged_per_pairing() -> None:
    """The "any agent" targets are judged on ours and ours-upstream-agent, the flow.v1 ones
    on ours-flow only, flow on vs off as ours-flow / ours (no processes: made-up medians)."""
    values = {
        ("slow4", "echo_p99_ms"): {"upstream": 100.0, "ours": 90.0, MIXED: 120.0, FLOW: 5.0},
        ("slow4", "echo_added_ms"): {"upstream": 90.0, "ours": 80.0, MIXED: 110.0, FLOW: 3.0},
        ("stallx8", "kept_pct"): {"upstream": 0.0, "ours": 10.0, MIXED: 5.0, FLOW: 85.0},
        ("hol", "kept_pct"): {"upstream": 0.0, "ours": 0.0, FLOW: 95.0},
        ("holsmall", "kept_pct"): {"upstream": 0.0, "ours": 97.0, FLOW: 10.0},
        ("down1", "mb_s"): {"upstream": 100.0, "ours": 400.0, FLOW: 390.0},
        ("up1", "mb_s"): {"upstream": 100.0, "ours": 400.0, FLOW: 370.0},
    }
    cells: dict[str, dict[str, Any]] = {}
    for (name, metric), by_impl in values.items():
        for impl, v in by_impl.items():
            _add(cells, name, f"{impl}/grpc", metric, v)
    rows = target_rows(cells, {"modes": ["grpc"]})
    by = {(r["scenario"], r["metric"], r["kind"]): r for r in rows}
    assert by["slow4", "echo_p99_ms", "up_max"]["met_by"] == {"ours": True, MIXED: False}
    assert by["slow4", "echo_added_ms", "abs_max"]["met_by"] == {FLOW: True}
    assert "with flow.v1" in by["slow4", "echo_added_ms", "abs_max"]["target"]
    assert by["stallx8", "kept_pct", "abs_min"]["met_by"] == {FLOW: False}
    assert by["hol", "kept_pct", "abs_min"]["met_by"] == {FLOW: True}
    assert by["holsmall", "kept_pct", "abs_min"]["met_by"] == {"ours": True}
    assert by["down1", "mb_s", "off_min"]["met_by"] == {FLOW: True}  # 97.5 %
    assert by["up1", "mb_s", "off_min"]["met_by"] == {FLOW: False}  # 92.5 %
    assert by["down1", "mb_s", "up_min"]["met_by"] == {"ours": True}
    machine = {"date": "-", "nproc": 2, "cpu_model": "-", "kernel": "-", "python": "-"}
    text = render(
        {"cells": cells, "rows": rows, "machine": {**machine, "loadavg": []}, "config": {"runs": 1}}
    )
    assert "NOT met (ours-upstream-agent)" in text and "flow.v1 on vs off" in text


def test_quick_config_is_small() -> None:
    """--quick keeps every figure but shrinks it (the mode must stay under 3 minutes), with
    the short form of the slow readers; --family hol runs that family alone, every pairing."""
    quick, _ = tunnel.parse_args(["--quick"])
    full, _ = tunnel.parse_args([])
    assert quick.runs == 1 and full.runs >= 3
    assert quick.single_bytes < full.single_bytes and quick.idle_tunnels < full.idle_tunnels
    assert full.scenarios == tunnel.SCENARIOS
    assert set(CLASSIC) <= set(quick.scenarios) < set(full.scenarios)
    assert quick.slow_base < full.slow_base and quick.slow_measure < full.slow_measure
    hol, _ = tunnel.parse_args(["--family=hol"])
    hol_quick, _ = tunnel.parse_args(["--family=hol", "--quick"])
    assert hol.scenarios == tunnel.HOL_FAMILY and set(hol.impls) == set(tunnel.IMPLS)
    assert set(hol_quick.scenarios) < set(hol.scenarios) and hol_quick.runs == 1
