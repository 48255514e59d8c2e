"""The agent's node-to-control-plane flags (cli/extensions.py NODE_TO_CP_FLAGS,
agent/portmap.py): the command lines k0s's fork and PR #176 wrote parse, bad values fail
validation with a clear message, and ``node-to-cp.v1`` is offered only when the feature
is active."""

from __future__ import annotations

import pytest

from konnectivity_fast.agent.portmap import (
    PortMapping,
    node_to_master_gate,
    parse_mapping,
    parse_mappings,
)
from konnectivity_fast.cli import proxy_agent
from konnectivity_fast.cli.agent_options import parse_args
from konnectivity_fast.cli.extensions import node_to_cp_active
from konnectivity_fast.wire.contract import Extension

K0S = [
    "--feature-gates=NodeToMasterTraffic=true",
    "--bind-address=10.0.0.7",
    "--apiserver-port-mapping=6443:localhost:6443",
    "--proxy-server-host=konnectivity.example",
    "--proxy-server-port=8132",
]


def test_k0s_fork_command_line_parses_and_is_active() -> None:
    options = parse_args(K0S, environ={}).options
    assert options.validate() is None
    assert options.apiserver_port_mappings == ["6443:localhost:6443"]
    assert options.bind_address == "10.0.0.7"
    assert options.apiserver_port_mapping_dial_timeout == 10.0
    assert node_to_cp_active(options.apiserver_port_mappings, options.feature_gates)
    assert Extension.NODE_TO_CP in proxy_agent._offered(options)
    config = proxy_agent._node_to_cp(options)
    assert config is not None
    assert list(config.mappings) == [PortMapping(6443, "localhost", 6443)]
    assert config.bind_address == "10.0.0.7"


def test_gate_false_turns_it_off() -> None:
    # k0s rendered this for clusters without tunneled networking.
    options = parse_args(
        ["--feature-gates=NodeToMasterTraffic=false", "--apiserver-port-mapping=6443:a:1"],
        environ={},
    ).options
    assert options.validate() is None
    assert not node_to_cp_active(options.apiserver_port_mappings, options.feature_gates)
    assert Extension.NODE_TO_CP not in proxy_agent._offered(options)
    assert proxy_agent._node_to_cp(options) is None


def test_gate_alone_or_nothing_is_off() -> None:
    for argv in ([], ["--feature-gates=NodeToMasterTraffic=true"]):
        options = parse_args(argv, environ={}).options
        assert options.validate() is None
        assert proxy_agent._offered(options) == frozenset()
        assert proxy_agent._node_to_cp(options) is None


def test_repeated_and_comma_separated_mappings() -> None:
    options = parse_args(
        [
            "--apiserver-port-mapping=6443:127.0.0.1:6443,7443:[::1]:443",
            "--apiserver-port-mapping=8443:api.example.:443",
            "--apiserver-port-mapping-dial-timeout=2s",
        ],
        environ={},
    ).options
    assert options.validate() is None
    assert parse_mappings(options.apiserver_port_mappings) == (
        PortMapping(6443, "127.0.0.1", 6443),
        PortMapping(7443, "::1", 443),
        PortMapping(8443, "api.example", 443),
    )
    assert PortMapping(7443, "::1", 443).address == "[::1]:443"
    assert options.apiserver_port_mapping_dial_timeout == 2.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--apiserver-port-mapping=80:h:443"], "local port 80 in mapping '80:h:443' is not"),
        (["--apiserver-port-mapping=50000:h:443"], "is not in 1024-49151"),
        (["--apiserver-port-mapping=6443:h:0"], "port 0 in mapping '6443:h:0' is not in 1-65535"),
        (["--apiserver-port-mapping=6443:h:70000"], "is not in 1-65535"),
        (["--apiserver-port-mapping=6443:::1:443"], "needs brackets"),
        (["--apiserver-port-mapping=6443:[nope]:443"], "invalid IPv6 address"),
        (["--apiserver-port-mapping=6443:*:443"], "not an IP or a DNS name"),
        (["--apiserver-port-mapping=6443:h"], "is not <local_port>:<host>:<port>"),
        (["--apiserver-port-mapping=6443::443"], "is not <local_port>:<host>:<port>"),
        (
            ["--apiserver-port-mapping=6443:a:1", "--apiserver-port-mapping=6443:b:2"],
            "local port 6443 is mapped twice",
        ),
        (["--feature-gates=Other=true"], "--feature-gates: unrecognized feature gate: Other"),
        (["--feature-gates=NodeToMasterTraffic=yes"], "invalid value of NodeToMasterTraffic"),
        (["--feature-gates=NodeToMasterTraffic"], "missing bool value"),
        (
            ["--apiserver-port-mapping-dial-timeout=0s"],
            "--apiserver-port-mapping-dial-timeout must be greater than 0",
        ),
    ],
)
def test_bad_values_fail_validation(argv: list[str], message: str) -> None:
    error = parse_args(argv, environ={}).options.validate()
    assert error is not None and message in error, error


def test_mapping_and_gate_parsers() -> None:
    assert parse_mapping("1024:10.0.0.1:1") == PortMapping(1024, "10.0.0.1", 1)
    assert parse_mapping("49151:[2001:DB8::1]:65535").host == "2001:db8::1"
    assert parse_mapping("6443:Kubernetes.Default.svc:443").host == "kubernetes.default.svc"
    assert node_to_master_gate("") is None
    assert node_to_master_gate(" NodeToMasterTraffic = false ") is False
    assert node_to_master_gate("NodeToMasterTraffic=1,NodeToMasterTraffic=T") is True
