"""Fixtures: the upstream Go peers (tests/support/upstream.py) and certificates
(tests/support/net.py)."""

import pytest

from tests.support.net import Certs, certs, sock_dir
from tests.support.upstream import Processes, Upstream, processes, upstream

from .support import Tools, summary_lines, tools

__all__ = [
    "Certs",
    "Processes",
    "Tools",
    "Upstream",
    "certs",
    "processes",
    "sock_dir",
    "tools",
    "upstream",
]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The matrix's one-line-per-cell table (tests/interop/test_matrix.py)."""
    lines = summary_lines()
    if lines:
        terminalreporter.section("interop matrix")
        for line in lines:
            terminalreporter.write_line(line)
