"""Bad command lines: our proxy-server and proxy-agent must refuse what upstream's v0.36.0
refuses, with the same exit status and the same words where they show (cobra's
``Error: ...`` line on stderr, followed by the usage, and the klog error line
``error: ...`` that main logs).

Every command line below fails before anything listens or connects; each still binds and
connects on loopback only and runs under a timeout, so that one that unexpectedly passes
cannot linger.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.support.net import agent_loopback_args
from tests.support.upstream import LOOPBACK, Upstream, agent_command, free_ports, server_command

RUN_SECONDS = 30
KLOG_ERROR = re.compile(r"^E\d{4} [\d:.]+ +\d+ [^\]]+\] (.*)$")

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries

# (program, kind, extra arguments). Kinds: "validation" (flag values parse, the options
# are refused), "parsing" (pflag refuses a flag), "startup" (the options pass, starting
# fails: the server's agent listener without a certificate, the agent without a CA).
CASES = [
    *(
        ("proxy-server", "validation", args)
        for args in [
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
    ),
    *(
        ("proxy-server", "parsing", args)
        for args in [
            ["--v=x"],
            ["--no-such-flag"],
            ["--server-port=eighty"],
            ["--keepalive-time=5"],
        ]
    ),
    ("proxy-server", "startup", ["--cluster-cert="]),
    *(
        ("proxy-agent", "validation", args)
        for args in [
            ["--agent-cert=/nonexistent"],
            ["--server-count-source=foo"],
            ["--agent-identifiers=%zz"],
            ["--xfr-channel-size=0"],
        ]
    ),
    *(
        ("proxy-agent", "parsing", args)
        for args in [["--v=x"], ["--lease-label-selector=x"], ["--sync-interval=5"]]
    ),
    ("proxy-agent", "startup", []),
]


def base_args(program: str, sock_dir: str) -> list[str]:
    if program == "proxy-agent":
        return agent_loopback_args()
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


def command(program: str, which: str, upstream: Upstream) -> list[str]:
    if program == "proxy-agent":
        return agent_command(which, upstream)
    return server_command(which, upstream)


def outcome(argv: list[str]) -> tuple[int, list[str], list[str]]:
    """Exit status, cobra's "Error:" lines and the klog error messages."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_SECONDS, check=False)
    lines = done.stderr.splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    logged = [m.group(1) for line in lines if (m := KLOG_ERROR.match(line))]
    return done.returncode, errors, logged


@pytest.mark.parametrize(
    ("program", "kind", "args"), CASES, ids=[f"{p}-{k}-{' '.join(a)}" for p, k, a in CASES]
)
def test_refused_like_upstream(
    upstream: Upstream, sock_dir: str, program: str, kind: str, args: list[str]
) -> None:
    common = [*base_args(program, sock_dir), *args]
    theirs = outcome([*command(program, "upstream", upstream), *common])
    ours = outcome([*command(program, "ours", upstream), *common])
    assert theirs[0] != 0, f"upstream accepted this command line: not a {kind} failure"
    assert ours == theirs, "(exit status, Error: lines, klog error messages): ours, upstream's"


@pytest.mark.parametrize("program", ["proxy-server", "proxy-agent"])
@pytest.mark.parametrize("which", ["upstream", "ours"])
def test_usage_follows_an_error(
    upstream: Upstream, sock_dir: str, program: str, which: str
) -> None:
    """cobra prints the usage after "Error:" for a parse error and a validation error."""
    for args in (["--xfr-channel-size=0"], ["--v=x"]):
        done = subprocess.run(
            [*command(program, which, upstream), *base_args(program, sock_dir), *args],
            capture_output=True,
            text=True,
            timeout=RUN_SECONDS,
            check=False,
        )
        lines = done.stderr.splitlines()
        errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
        assert len(errors) == 1, (args, done.stderr[-2000:])
        assert lines[errors[0] + 1 : errors[0] + 2] == ["Usage:"], args
