"""The proxy-server's node-to-cp.v1 flags (cli/node_to_cp.py): off by default, repeatable
and comma-separated destinations, and a bad entry or limit is a start-up error."""

from __future__ import annotations

import pytest

from konnectivity_fast.cli import server_options
from konnectivity_fast.cli.node_to_cp import node_to_cp_config


def parse(*args: str) -> server_options.ProxyRunOptions:
    return server_options.parse_args(list(args), environ={}).options


def test_off_by_default() -> None:
    options = parse()
    assert options.allowed_destination == []
    assert options.agent_initiated_dial_timeout == 5.0
    assert options.max_agent_initiated_connections_per_agent == 1000
    assert node_to_cp_config(options) is None


def test_repeatable_and_comma_separated() -> None:
    options = parse(
        "--allowed-destination=localhost:6443,10.0.0.0/8:6443",
        "--allowed-destination=[fd00::1]:443",
        "--agent-initiated-dial-timeout=2s",
        "--max-agent-initiated-connections-per-agent=7",
    )
    config = node_to_cp_config(options)
    assert config is not None
    assert str(config.allowed) == "[fd00::1]:443,localhost:6443,10.0.0.0/8:6443"
    assert (config.dial_timeout, config.max_per_agent) == (2.0, 7)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allowed-destination=*:6443"], "wildcards are not allowed"),
        (["--allowed-destination=:6443"], "empty host"),
        (["--allowed-destination=localhost:0"], "port must be 1-65535"),
        (["--allowed-destination=nonsense"], "want host:port"),
        (["--allowed-destination=a:1", "--agent-initiated-dial-timeout=0s"], "greater than 0"),
        (["--allowed-destination=a:1", "--max-agent-initiated-connections-per-agent=0"], "1"),
    ],
)
def test_bad_values_fail_start_up(args: list[str], message: str) -> None:
    options = parse("--uds-name=/tmp/x.sock", "--server-port=0", *args)
    error = options.validate()
    assert error is not None and message in error
