"""Bad command lines: our proxy-server must refuse what upstream's v0.36.0 refuses, with
the same exit status and the same words where they show (cobra's ``Error: ...`` line on
stderr, followed by the usage, and the klog error line ``error: ...`` that main logs).

Every command line below fails before anything listens; each still binds loopback only
and runs under a timeout, so that one that unexpectedly passes cannot linger.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from upstream import LOOPBACK, Upstream, free_ports

RUN_SECONDS = 30
KLOG_ERROR = re.compile(r"^E\d{4} [\d:.]+ +\d+ [^\]]+\] (.*)$")

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries

# Failing in option validation (flag values are fine, their combination is not).
VALIDATION = [
    ["--mode=foo"],
    ["--server-port=8090"],  # with --uds-name
    ["--agent-port=99999"],
    ["--proxy-strategies=bogus"],
    ["--cipher-suites=FOO"],
    ["--tls-min-version=VersionTLS99"],
    ["--xfr-channel-size=0"],
    ["--cluster-cert=/nonexistent"],
    ["--agent-namespace=x"],
    ["--enable-contention-profiling"],
]
# Failing while parsing flags.
PARSING = [["--v=x"], ["--no-such-flag"], ["--server-port=eighty"], ["--keepalive-time=5"]]
# Failing at start-up: the agent listener without a certificate.
STARTUP = [["--cluster-cert="]]


def base_args(sock_dir: str) -> list[str]:
    agent, health, admin = free_ports(3)
    return [
        f"--uds-name={os.path.join(sock_dir, 'konnectivity.sock')}",
        "--server-port=0",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={agent}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-port={admin}",
    ]


def outcome(command: list[str]) -> tuple[int, list[str], list[str]]:
    """Exit status, cobra's "Error:" lines and the klog error messages."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_SECONDS, check=False)
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    logged = [m.group(1) for line in lines if (m := KLOG_ERROR.match(line))]
    return done.returncode, errors, logged


def compare(upstream: Upstream, sock_dir: str, args: list[str]) -> None:
    common = [*base_args(sock_dir), *args]
    theirs = outcome([str(upstream.proxy_server), *common])
    ours = outcome([sys.executable, "-m", "konnectivity_fast.server", *common])
    assert theirs[0] != 0, "upstream accepted this command line: not a failing case"
    assert ours == theirs, "(exit status, Error: lines, klog error messages): ours, upstream's"


@pytest.mark.parametrize("args", VALIDATION, ids=" ".join)
def test_validation_errors(upstream: Upstream, sock_dir: str, args: list[str]) -> None:
    compare(upstream, sock_dir, args)


@pytest.mark.parametrize("args", PARSING, ids=" ".join)
def test_parse_errors(upstream: Upstream, sock_dir: str, args: list[str]) -> None:
    compare(upstream, sock_dir, args)


@pytest.mark.parametrize("args", STARTUP, ids=" ".join)
def test_startup_errors(upstream: Upstream, sock_dir: str, args: list[str]) -> None:
    compare(upstream, sock_dir, args)


def test_usage_follows_an_error(upstream: Upstream, sock_dir: str) -> None:
    """cobra prints the usage after "Error:" for a parse error and a validation error."""
    for args in (["--mode=foo"], ["--v=x"]):
        for command in (
            [str(upstream.proxy_server)],
            [sys.executable, "-m", "konnectivity_fast.server"],
        ):
            done = subprocess.run(
                [*command, *base_args(sock_dir), *args],
                capture_output=True,
                text=True,
                timeout=RUN_SECONDS,
                check=False,
            )
            lines = done.stderr.splitlines()
            errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
            assert len(errors) == 1, (command[-1], args, done.stderr[-2000:])
            assert lines[errors[0] + 1 : errors[0] + 2] == ["Usage:"], (command[-1], args)
