"""``proxy-agent``'s options: defaults, flag surface, validation, identifiers, selectors.

``test_default_agent_options`` and ``test_validate`` port upstream's
``TestDefaultServerOptions`` (sic, the agent's twin) and ``TestValidate``
(cmd/agent/app/options/options_test.go); like upstream, the validate table sets values
through the flags, so selector errors surface while parsing.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest

from konnectivity_fast.cli.agent_options import (
    GrpcProxyAgentOptions,
    LabelRequirement,
    build_flagset,
    parse_args,
    parse_label_selector,
    usage,
)
from konnectivity_fast.cli.flags import FlagError
from konnectivity_fast.cli.klog import KLOG_PREFIX
from konnectivity_fast.wire.contract import decode_agent_identifiers

from . import flag_surface, read_golden

DEFAULTS: list[tuple[str, Any, type]] = [  # (field, value, type); durations in seconds
    ("agent_cert", "", str),
    ("agent_key", "", str),
    ("ca_cert", "", str),
    ("proxy_server_host", "127.0.0.1", str),
    ("proxy_server_port", 8091, int),
    ("alpn_protos", [], list),
    ("health_server_host", "", str),
    ("health_server_port", 8093, int),
    ("admin_bind_address", "127.0.0.1", str),
    ("admin_server_port", 8094, int),
    ("enable_profiling", False, bool),
    ("enable_contention_profiling", False, bool),
    ("agent_identifiers", "", str),
    ("sync_interval", 1.0, float),
    ("probe_interval", 1.0, float),
    ("sync_interval_cap", 10.0, float),
    ("keepalive_time", 3600.0, float),
    ("service_account_token_path", "", str),
    ("warn_on_channel_limit", False, bool),
    ("sync_forever", False, bool),
    ("xfr_channel_size", 150, int),
    ("count_server_leases", False, bool),
    ("lease_namespace", "kube-system", str),
    ("lease_label", "k8s-app=konnectivity-server", str),
    ("server_count_source", "default", str),
    ("kubeconfig_path", "", str),
    ("api_content_type", "application/vnd.kubernetes.protobuf", str),
    # Ours (cli/extensions.py): off, as upstream has no such thing.
    ("enable_tunnel_flow_control", False, bool),
    ("proxy_server_list", "", str),
    ("server_discovery", "", str),
    ("proxy_server_service", "", str),
    ("proxy_server_tls_name", "", str),
    # Node-to-control-plane (docs/node-to-control-plane.md): no mapping, nothing listens.
    ("apiserver_port_mappings", [], list),
    ("bind_address", "127.0.0.1", str),
    ("feature_gates", "", str),
    ("apiserver_port_mapping_dial_timeout", 10.0, float),
]


@pytest.mark.parametrize(("name", "value", "kind"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_default_agent_options(name: str, value: Any, kind: type) -> None:
    for options in (GrpcProxyAgentOptions(), parse_args([], environ={}).options):
        actual = getattr(options, name)
        assert type(actual) is kind, f"{name} has the wrong type"
        assert actual == value, f"{name} has the wrong value"


def test_every_field_has_a_pinned_default() -> None:
    pinned = {name for name, _, _ in DEFAULTS} | {"agent_id"}
    assert {f.name for f in dataclasses.fields(GrpcProxyAgentOptions)} == pinned


def test_agent_id_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXY_AGENT_ID", raising=False)
    generated = parse_args([]).options.agent_id
    assert uuid.UUID(generated).version == 4
    monkeypatch.setenv("PROXY_AGENT_ID", "node-1")
    assert GrpcProxyAgentOptions().agent_id == "node-1"
    assert parse_args([]).options.agent_id == "node-1"
    assert parse_args(["--agent-id", "flag-wins"]).options.agent_id == "flag-wins"


def test_flag_surface_matches_golden() -> None:
    golden = read_golden("proxy-agent.txt")
    assert [row[0] for row in golden] == sorted(row[0] for row in golden)
    assert flag_surface(build_flagset(), golden) == golden


UPSTREAM_VALIDATE: list[tuple[str, dict[str, Any], str]] = [
    # (name, flags, expected message fragment; "" means valid)
    ("default", {}, ""),
    ("ZeroProxyServerPort", {"proxy-server-port": 0}, "proxy server port 0 must be greater than 0"),
    (
        "NegativeProxyServerPort",
        {"proxy-server-port": -1},
        "proxy server port -1 must be greater than 0",
    ),
    ("ReservedProxyServerPort", {"proxy-server-port": 1023}, ""),
    ("StartValidProxyServerPort", {"proxy-server-port": 1024}, ""),
    ("EndValidProxyServerPort", {"proxy-server-port": 49151}, ""),
    ("StartEphemeralProxyServerPort", {"proxy-server-port": 49152}, ""),
    (
        "ZeroHealthServerPort",
        {"health-server-port": 0},
        "health server port 0 must be greater than 0",
    ),
    (
        "NegativeHealthServerPort",
        {"health-server-port": -1},
        "health server port -1 must be greater than 0",
    ),
    ("ReservedHealthServerPort", {"health-server-port": 1023}, ""),
    ("StartValidHealthServerPort", {"health-server-port": 1024}, ""),
    ("EndValidHealthServerPort", {"health-server-port": 49151}, ""),
    ("StartEphemeralHealthServerPort", {"health-server-port": 49152}, ""),
    ("ZeroAdminServerPort", {"admin-server-port": 0}, "admin server port 0 must be greater than 0"),
    (
        "NegativeAdminServerPort",
        {"admin-server-port": -1},
        "admin server port -1 must be greater than 0",
    ),
    ("ReservedAdminServerPort", {"admin-server-port": 1023}, ""),
    ("StartValidAdminServerPort", {"admin-server-port": 1024}, ""),
    ("EndValidAdminServerPort", {"admin-server-port": 49151}, ""),
    ("StartEphemeralAdminServerPort", {"admin-server-port": 49152}, ""),
    (
        "ContentionProfilingRequiresProfiling",
        {"enable-contention-profiling": "true", "enable-profiling": "false"},
        "if --enable-contention-profiling is set, --enable-profiling must also be set",
    ),
    ("ZeroXfrChannelSize", {"xfr-channel-size": 0}, "channel size 0 must be greater than 0"),
    (
        "NegativeXfrChannelSize",
        {"xfr-channel-size": -10},
        "channel size -10 must be greater than 0",
    ),
    (
        "ServerCountSource",
        {"server-count-source": "foobar"},
        "--server-count-source must be one of '', 'default', 'max', got foobar",
    ),
    # v0.36.0: a plain string, checked only when leases are counted.
    ("LeaseLabelValid", {"lease-label": "k8s-app=konnectivity-server"}, ""),
    ("LeaseLabelEmptyUnused", {"lease-label": ""}, ""),
    ("LeaseLabelInvalidUnused", {"lease-label": "*notavalidlabel*"}, ""),
    (
        "LeaseLabelEmpty",
        {"lease-label": "", "count-server-leases": "true"},
        "empty string provided",
    ),
    (
        "LeaseLabelInvalidFormat",
        {"lease-label": "*notavalidlabel*", "count-server-leases": "true"},
        "invalid label format: *notavalidlabel*",
    ),
    (
        "LeaseLabelMultipleValid",
        {
            "lease-label": "k8s-app=konnectivity-server,component=proxy",
            "count-server-leases": "true",
        },
        "",
    ),
]


@pytest.mark.parametrize(
    ("desc", "flags", "expected"), UPSTREAM_VALIDATE, ids=[case[0] for case in UPSTREAM_VALIDATE]
)
def test_validate(desc: str, flags: dict[str, Any], expected: str) -> None:
    argv = [f"--{name}={value}" for name, value in flags.items()]
    try:
        actual = parse_args(argv, environ={}, warn=lambda _: None).options.validate()
    except FlagError as exc:
        actual = str(exc)
    if expected:
        assert actual is not None and expected in actual
    else:
        assert actual is None


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for key in ("cert", "key", "ca", "token", "kubeconfig"):
        (tmp_path / key).write_text("")
        paths[key] = str(tmp_path / key)
    paths["missing"] = str(tmp_path / "missing")
    return paths


VALIDATION: list[tuple[dict[str, Any], str | None]] = [
    (
        {"agent_key": "{missing}"},
        "error checking agent key {missing}, got stat {missing}: no such file or directory",
    ),
    ({"agent_key": "{key}"}, 'cannot have agent cert empty when agent key is set to "{key}"'),
    (
        {"agent_cert": "{missing}"},
        "error checking agent cert {missing}, got stat {missing}: no such file or directory",
    ),
    ({"agent_cert": "{cert}"}, 'cannot have agent key empty when agent cert is set to "{cert}"'),
    ({"agent_cert": "{cert}", "agent_key": "{key}", "ca_cert": "{ca}"}, None),
    (
        {"ca_cert": "{missing}"},
        "error checking agent CA cert {missing}, got stat {missing}: no such file or directory",
    ),
    (
        {"sync_interval": 5.0, "sync_interval_cap": 1.5},
        "sync interval 5s must be less than sync interval cap 1.5s",
    ),
    ({"sync_interval": 10.0}, None),  # equal to the cap is allowed
    (
        {"service_account_token_path": "{missing}"},
        "error checking service account token path {missing}, got stat {missing}: no such file "
        "or directory",
    ),
    ({"service_account_token_path": "{token}"}, None),
    (
        {
            "agent_identifiers": "host=node1&ipv4=10.0.0.1&ipv6=::1&cidr=10.0.0.0/8&"
            "default-route=true"
        },
        None,
    ),
    ({"agent_identifiers": "ipv4=${{HOST_IP}}"}, None),  # values are not checked
    ({"agent_identifiers": "zone=a"}, "agent address is invalid: unknown address type: zone"),
    (
        {"agent_identifiers": "host=a;ipv4=b"},
        "agent address is invalid: invalid semicolon separator in query",
    ),
    ({"agent_identifiers": "host=%zz"}, 'agent address is invalid: invalid URL escape "%zz"'),
    (
        {"kubeconfig_path": "{missing}"},
        'error checking KubeconfigPath "{missing}", got stat {missing}: no such file or directory',
    ),
    ({"kubeconfig_path": "{kubeconfig}"}, None),
    ({"server_count_source": ""}, None),
    ({"server_count_source": "max"}, None),
    (
        {"server_count_source": "Max"},
        "--server-count-source must be one of '', 'default', 'max', got Max",
    ),
    ({"proxy_server_port": 70000}, None),  # the agent checks no upper bound
    ({"probe_interval": -1.0, "keepalive_time": 0.0}, None),  # nor these
]


@pytest.mark.parametrize(("changes", "expected"), VALIDATION, ids=lambda v: repr(v)[:60])
def test_validation_message(
    files: dict[str, str], changes: dict[str, Any], expected: str | None
) -> None:
    options = GrpcProxyAgentOptions()
    for name, value in changes.items():
        setattr(options, name, value.format(**files) if isinstance(value, str) else value)
    assert options.validate() == (expected.format(**files) if expected else None)


ORDER: list[tuple[dict[str, Any], str]] = [
    ({"agent_key": "{missing}", "proxy_server_port": 0}, "error checking agent key"),
    ({"ca_cert": "{missing}", "proxy_server_port": 0}, "error checking agent CA cert"),
    ({"proxy_server_port": 0, "health_server_port": 0}, "proxy server port"),
    ({"health_server_port": 0, "admin_server_port": 0}, "health server port"),
    ({"admin_server_port": 0, "xfr_channel_size": 0}, "admin server port"),
    ({"xfr_channel_size": 0, "enable_contention_profiling": True}, "channel size"),
    ({"enable_contention_profiling": True, "sync_interval": 99.0}, "if --enable-contention"),
    ({"sync_interval": 99.0, "service_account_token_path": "{missing}"}, "sync interval"),
    (
        {"service_account_token_path": "{missing}", "agent_identifiers": "x=1"},
        "error checking service account token path",
    ),
    ({"agent_identifiers": "x=1", "kubeconfig_path": "{missing}"}, "agent address is invalid"),
    ({"kubeconfig_path": "{missing}", "server_count_source": "x"}, "error checking Kubeconfig"),
]


@pytest.mark.parametrize(("changes", "prefix"), ORDER, ids=lambda v: repr(v)[:60])
def test_validation_order(files: dict[str, str], changes: dict[str, Any], prefix: str) -> None:
    options = GrpcProxyAgentOptions()
    for name, value in changes.items():
        setattr(options, name, value.format(**files) if isinstance(value, str) else value)
    message = options.validate()
    assert message is not None and message.startswith(prefix)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("host=node1&host=node1.example.com", {"host": ["node1", "node1.example.com"]}),
        ("ipv6=%3A%3A1&cidr=10.0.0.0%2F8", {"ipv6": ["::1"], "cidr": ["10.0.0.0/8"]}),
        ("host=a+b", {"host": ["a b"]}),
        ("default-route", {"default-route": [""]}),
        ("&&ipv4=1.2.3.4&", {"ipv4": ["1.2.3.4"]}),
        ("host=a&zone=b&rack=c", "unknown address type: zone"),
        ("host=%4", 'invalid URL escape "%4"'),
        ("%zzz=1", 'invalid URL escape "%zz"'),
        ("host=%zz&a;b", "invalid semicolon separator in query"),  # Go lets this one overwrite
        ("a;b&host=%zz", "invalid semicolon separator in query"),
    ],
)
def test_decode_agent_identifiers(text: str, expected: dict[str, list[str]] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError) as info:
            decode_agent_identifiers(text)
        assert str(info.value) == expected
    else:
        assert decode_agent_identifiers(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        (
            "k8s-app=konnectivity-server",
            (LabelRequirement("k8s-app", "=", ("konnectivity-server",)),),
        ),
        ("a==b, c!=d", (LabelRequirement("a", "==", ("b",)), LabelRequirement("c", "!=", ("d",)))),
        (
            "env in (prod, staging),!legacy,tier",
            (
                LabelRequirement("env", "in", ("prod", "staging")),
                LabelRequirement("legacy", "!"),
                LabelRequirement("tier", "exists"),
            ),
        ),
        ("x notin (a)", (LabelRequirement("x", "notin", ("a",)),)),
        ("example.com/role=proxy", (LabelRequirement("example.com/role", "=", ("proxy",)),)),
        ("n>3,m<-1", (LabelRequirement("n", "gt", ("3",)), LabelRequirement("m", "lt", ("-1",)))),
        ("a=", (LabelRequirement("a", "=", ("",)),)),
    ],
)
def test_label_selector(text: str, expected: tuple[LabelRequirement, ...]) -> None:
    assert parse_label_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("*notavalidlabel*", 'invalid label key "*notavalidlabel*"'),
        ("a=b=c", "found '=', expected: ',' or 'end of string'"),
        ("a,", "found '', expected: identifier after ','"),
        (",a", "found ',', expected: identifier"),
        ("a in b", "found 'b', expected: '('"),
        ("a in (b", "found '', expected: ',' or ')'"),
        ("a=-bad-", 'invalid label value "-bad-"'),
        ("UPPER.example/x=1", 'invalid label key "UPPER.example/x"'),
        ("n>x", "the value must be an integer"),
        ("a b", "found 'b', expected: '=', '!=', '==', 'in', 'notin', '>' or '<'"),
        ("!a=b", "found '=', expected: ',' or 'end of string'"),
        ("k=" + "v" * 64, "invalid label value"),
    ],
)
def test_bad_label_selector(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_label_selector(text)
    assert fragment in str(info.value)


def test_upstream_framework_command_line(files: dict[str, str]) -> None:
    """Upstream's integration framework runs an external agent with every option flag
    rendered by pflag as ``--name=<Go value>``; that must parse back to the defaults.
    pflag does not read its own ``[]`` back: ``--alpn-proto=[]`` yields ``["[]"]``."""
    fs = build_flagset()
    argv = [
        f"--{flag.name}={flag.def_value}"
        for flag in fs
        if not flag.dest.startswith(KLOG_PREFIX)
        and flag.name != "help"
        # upstream's framework renders upstream's flags; ours with a [] default would
        # read back as ["[]"] as --alpn-proto does, which is no valid port mapping
        and not (flag.extension and flag.def_value == "[]")
    ]
    assert "--alpn-proto=[]" in argv and "--keepalive-time=1h0m0s" in argv
    assert "--lease-label=k8s-app=konnectivity-server" in argv
    line = parse_args(argv, environ={}, warn=lambda _: None)
    expected = dataclasses.replace(GrpcProxyAgentOptions(), alpn_protos=["[]"])
    expected.agent_id = line.options.agent_id
    assert line.options == expected
    assert line.options.validate() is None


def test_openshift_style_command_line(files: dict[str, str]) -> None:
    """Space-separated values, -v with a separate value, ALPN and identifiers."""
    argv = [
        "--logtostderr=true",
        "--ca-cert",
        files["ca"],
        "--agent-cert",
        files["cert"],
        "--agent-key",
        files["key"],
        "--proxy-server-host",
        "konnectivity.example.com",
        "--proxy-server-port",
        "443",
        "--health-server-port",
        "2041",
        "--agent-identifiers=default-route=true",
        "--keepalive-time",
        "30s",
        "--probe-interval",
        "5s",
        "--sync-interval",
        "5s",
        "--sync-interval-cap",
        "30s",
        "--alpn-proto=konnectivity",
        "--sync-forever",
        "--count-server-leases",
        "--v",
        "3",
    ]
    line = parse_args(argv, environ={})
    opts = line.options
    assert opts.validate() is None
    assert (opts.proxy_server_port, opts.keepalive_time, opts.sync_interval_cap) == (
        443,
        30.0,
        30.0,
    )
    assert opts.alpn_protos == ["konnectivity"] and opts.sync_forever and opts.count_server_leases
    assert line.klog.v == 3 and line.klog.logtostderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--xfr-channel-size"], "flag needs an argument: --xfr-channel-size"),
        (
            ["--target=6443:localhost:6443"],  # KEP-2025's name, never implemented
            "unknown flag: --target",
        ),
        (
            ["--sync-interval=1"],
            'invalid argument "1" for "--sync-interval" flag: time: missing unit in duration "1"',
        ),
        (
            ["--sync-forever=yes"],
            'invalid argument "yes" for "--sync-forever" flag: strconv.ParseBool: parsing "yes": '
            "invalid syntax",
        ),
    ],
)
def test_parse_errors(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError) as info:
        parse_args(argv, environ={})
    assert str(info.value) == message


def test_help() -> None:
    assert parse_args(["-h"], environ={}).help_requested
    text = usage()
    assert "\nUsage:\n  proxy-agent [flags]\n\nFlags:\n" in text
    for flag in build_flagset():
        assert (f"--{flag.name} " in text) is not flag.hidden, flag.name
    assert "--lease-label string " in text
    assert "--alpn-proto strings " in text and '(default "127.0.0.1")' in text
