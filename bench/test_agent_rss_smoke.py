"""Smoke test of the agent memory benchmark's machinery (``bench/agent_rss.py``): three of
our servers behind the balancer, our agent holding all three, its memory read. One short
run of our agent only; the budget is the benchmark's to report (``make bench-agent-rss``),
and the modules behind it are guarded by ``tests/agent/test_imports.py``.

    .venv/bin/python -m pytest bench/test_agent_rss_smoke.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import agent_rss

pytestmark = pytest.mark.timeout(180)


def test_our_agent_holds_three_servers_and_is_measured(tmp_path: Path) -> None:
    samples = agent_rss.run(1, 0.5, ours_only=True, leases=False, log_dir=tmp_path)
    assert [(s.agent, s.run) for s in samples] == [("ours", 0)]
    (sample,) = samples
    # VmRSS is RssAnon + RssFile + RssShmem.
    assert 0 < sample.anon_kib < sample.rss_kib
    assert sample.rss_kib >= sample.anon_kib + sample.file_kib
    medians = agent_rss.summary(samples)
    assert set(medians) == {"ours"}
