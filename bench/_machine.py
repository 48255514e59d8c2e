"""What a benchmark ran on, for its JSON: the machine, the Python, upstream's version if it
ran, the load, and the commit measured with the files of konnectivity_fast/ that differ
from it (the working tree is what runs)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from bench._echo_proc import REPO_ROOT

__all__ = ["describe_machine", "source_state"]


def describe_machine(upstream_bin: Path | None = None) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "upstream": "apiserver-network-proxy v0.36.0" if upstream_bin else None,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        **source_state(),
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and the files of konnectivity_fast/ that differ from it (the
    working tree is what runs)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    dirty = git("status", "--porcelain", "--", "konnectivity_fast").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "dirty": [d.split()[-1] for d in dirty]}
