"""Smoke test of the tunnel benchmark machinery: every scenario, for ours, upstream and
direct TCP, in both frontend modes, on tiny sizes (~1 minute); and the slow-reader
scenarios of the head-of-line family for ours only (~30 s).

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

import pytest

from bench import tunnel
from bench._tunnel_report import SLOW, TARGETS

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
    "--impls=ours",
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
    """The slow-reader plumbing, ours only: every figure and the time series are there,
    whatever their values."""
    _need_go()
    out, png = tmp_path / "hol.json", tmp_path / "hol.png"
    code = tunnel.main([*SLOW_TINY, "--json", str(out), "--chart", str(png)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    results = json.loads(out.read_text())
    cells = results["cells"]
    assert set(cells) == {"slow4", "slow4x8r10", "stallx8"}
    for name, by_target in cells.items():
        assert set(by_target) == {f"ours/{m}" for m in tunnel.MODES}, name
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
    rows = {(r["scenario"], r["metric"], r["mode"]) for r in results["rows"]}
    assert rows == {(n, m, mode) for n, m, *_ in TARGETS if n in cells for mode in tunnel.MODES}
    assert "echo beside a 4 MB/s reader" in printed.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
