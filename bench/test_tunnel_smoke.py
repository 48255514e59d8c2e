"""Smoke test of the tunnel benchmark machinery: every scenario, for ours, upstream and
direct TCP, in both frontend modes, on tiny sizes (~1 minute).

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
from bench._tunnel_report import TARGETS

IDLE_TUNNELS = 20
TINY = [
    "--quick",
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
TARGET_KEYS = {"direct", *(f"{i}/{m}" for i in tunnel.IMPLS for m in tunnel.MODES)}


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
    assert set(cells) == set(tunnel.SCENARIOS)
    for name in tunnel.SHARED:
        assert set(cells[name]) == TARGET_KEYS, name
    for name in tunnel.FRESH:
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
    # Every target row of the issue is present for both modes.
    wanted = {(n, m, mode) for n, m, *_ in TARGETS for mode in tunnel.MODES}
    assert {(r["scenario"], r["metric"], r["mode"]) for r in results["rows"]} == wanted
    assert "ours/up" in printed.out and "loadgen %" in printed.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_config_is_small() -> None:
    """--quick keeps every figure but shrinks it (the mode must stay under 2 minutes)."""
    quick, _ = tunnel.parse_args(["--quick"])
    full, _ = tunnel.parse_args([])
    assert quick.runs == 1 and full.runs >= 3
    assert quick.single_bytes < full.single_bytes and quick.idle_tunnels < full.idle_tunnels
    assert quick.scenarios == full.scenarios == tunnel.SCENARIOS
