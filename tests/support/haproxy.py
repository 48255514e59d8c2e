"""HAProxy as the tests' real load balancer: found once, required (a test is skipped
without it, except in CI, where scripts/bootstrap.sh installs it), and configured from
sections, each a TCP frontend and its backend."""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import pytest

from tests.support.upstream import in_ci

HAPROXY = shutil.which("haproxy")

#: One frontend and its backend: (name, the host:port it binds, its balance algorithm,
#: its ``server ...`` lines).
Section = tuple[str, str, str, Sequence[str]]


def require_haproxy() -> str:
    """HAProxy's path; skips the test without it, fails it in CI."""
    if HAPROXY is None:
        message = "haproxy is not installed (scripts/bootstrap.sh installs it)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return HAPROXY


def haproxy_config(sections: Sequence[Section]) -> str:
    """A TCP-mode configuration with ``sections`` (timeouts long enough for a test's
    tunnels to idle)."""
    lines = [
        "defaults",
        "    mode tcp",
        "    timeout connect 5s",
        "    timeout client 1h",
        "    timeout server 1h",
    ]
    for name, bind, balance, members in sections:
        lines += [f"frontend {name}", f"    bind {bind}", f"    default_backend {name}"]
        lines += [f"backend {name}", f"    balance {balance}", *members]
    return "\n".join(lines) + "\n"
