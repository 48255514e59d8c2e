"""A short run of the codec fuzz harness, on both twins; and proof that it can fail.

The pure twin is fuzzed against the official protobuf runtime, the compiled twin against
the pure one. ``KF_FUZZ_SECONDS`` sets the length of a run (default 10; ``make fuzz`` and
``make fuzz-long`` run ``tests/fuzz/run.py`` for longer).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

RUN = Path(__file__).resolve().parent / "run.py"
SECONDS = int(os.environ.get("KF_FUZZ_SECONDS", "10"))


def run_harness(against: str, seconds: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(RUN),
            "--harness",
            "codec",
            "--seconds",
            str(seconds),
            "--against",
            against,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
    )


def test_fuzz_codec(codec: ModuleType) -> None:
    against = "official" if codec.__name__.endswith("._codec") else "compiled"
    proc = run_harness(against, SECONDS)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{summary}\n{proc.stderr[-4000:]}"
    assert summary.startswith(f"fuzz codec: pure vs {against},")
    assert summary.endswith(": OK")
    runs = int(summary.split(" runs,")[0].rsplit(" ", 1)[1])
    assert runs > 100, summary  # it really ran


def test_fuzz_reports_a_planted_bug() -> None:
    """Against a pure twin with a planted bug, the harness reports a finding and its input."""
    proc = run_harness("mutant", 60)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 1, f"{summary}\n{proc.stderr[-4000:]}"
    assert ": FINDING, input " in summary
    assert "Discrepancy" in proc.stderr
