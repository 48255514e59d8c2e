"""A short run of the HTTP/2 engine fuzz harness (``fuzz_h2.py``), and proof that it can fail.

The harness runs in a subprocess under atheris/libFuzzer, seeded from a copy of
``tests/fuzz/corpus_h2/`` (the corpus it grows stays in a temporary directory).
``KF_FUZZ_SECONDS`` sets the length of the run (default 10).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESS = HERE / "fuzz_h2.py"
SEEDS = HERE / "corpus_h2"
SECONDS = int(os.environ.get("KF_FUZZ_SECONDS", "10"))
MAX_LEN = 8192


def run_harness(
    work: Path, seconds: int, env_extra: dict[str, str] | None = None
) -> tuple[int, str, list[Path]]:
    corpus = work / "corpus"
    shutil.copytree(SEEDS, corpus)
    cmd = [
        sys.executable,
        str(HARNESS),
        str(corpus),
        f"-max_total_time={seconds}",
        f"-max_len={MAX_LEN}",
        f"-artifact_prefix={work}/",
        "-timeout=30",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
    ]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=seconds + 300,
        cwd=work,
        env={**os.environ, **(env_extra or {})},
    )
    output = proc.stdout + proc.stderr
    crashes = (
        sorted(work.glob("crash-*")) + sorted(work.glob("timeout-*")) + sorted(work.glob("oom-*"))
    )
    return proc.returncode, output, crashes


def _finding(output: str) -> str:
    start = output.find("=== Uncaught Python exception")
    return output[start : start + 4000] if start >= 0 else output[-4000:]


def test_seed_corpus_is_there() -> None:
    seeds = list(SEEDS.iterdir())
    assert len(seeds) >= 20
    modes = {p.read_bytes()[0] for p in seeds}
    assert any(m & 0x02 for m in modes) and any(not m & 0x02 for m in modes)


def test_fuzz_h2(tmp_path: Path) -> None:
    status, output, crashes = run_harness(tmp_path, SECONDS)
    assert not crashes, (
        f"finding, input {crashes[0].read_bytes()[:256].hex()} (kept in {crashes[0]}):\n"
        f"{_finding(output)}"
    )
    assert status == 0, _finding(output)
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", output)
    assert runs and int(runs[-1]) > 1000, output[-2000:]  # it really ran
    assert "corpus" in output


def test_fuzz_h2_reports_a_planted_bug(tmp_path: Path) -> None:
    """With a planted bug (a server seeing a request raises), the run ends
    with a finding, its input kept, and the exception shown."""
    status, output, crashes = run_harness(tmp_path, 30, {"KF_FUZZ_H2_PLANT": "1"})
    assert status != 0
    assert crashes, output[-2000:]
    assert "Finding: planted" in output
