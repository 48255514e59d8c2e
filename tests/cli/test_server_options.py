"""``proxy-server``'s options: defaults, flag surface, validation messages and order.

``test_default_server_options`` and ``test_validate`` port upstream's
``TestDefaultServerOptions`` and ``TestValidate`` (cmd/server/app/options/options_test.go):
they pin the type and value of each default and the (field, value, message) table, so an
incompatible change fails here first.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import pytest

from konnectivity_fast.cli.flags import FlagError
from konnectivity_fast.cli.server_options import (
    ProxyRunOptions,
    build_flagset,
    parse_args,
    parse_lease_labels,
    parse_proxy_strategies,
    usage,
)
from konnectivity_fast.tunnel.backends import MANAGER_CLASSES
from konnectivity_fast.wire.contract import FrontendMode, ProxyStrategy

from . import flag_surface, read_golden

DEFAULTS: list[tuple[str, Any, type]] = [  # (field, value, type); durations in seconds
    ("server_cert", "", str),
    ("server_key", "", str),
    ("server_ca_cert", "", str),
    ("cluster_cert", "", str),
    ("cluster_key", "", str),
    ("cluster_ca_cert", "", str),
    ("mode", "grpc", str),
    ("uds_name", "", str),
    ("delete_uds_file", True, bool),
    ("server_port", 8090, int),
    ("server_bind_address", "", str),
    ("agent_port", 8091, int),
    ("agent_bind_address", "", str),
    ("health_port", 8092, int),
    ("health_bind_address", "", str),
    ("admin_port", 8095, int),
    ("admin_bind_address", "127.0.0.1", str),
    ("keepalive_time", 3600.0, float),
    ("frontend_keepalive_time", 3600.0, float),
    ("enable_profiling", False, bool),
    ("enable_contention_profiling", False, bool),
    ("server_count", 1, int),
    ("agent_namespace", "", str),
    ("agent_service_account", "", str),
    ("kubeconfig_path", "", str),
    ("kubeconfig_qps", 0.0, float),
    ("kubeconfig_burst", 0, int),
    ("authentication_audience", "", str),
    ("proxy_strategies", "default", str),
    ("cipher_suites", [], list),
    ("tls_min_version", "", str),
    ("xfr_channel_size", 10, int),
    ("api_content_type", "application/vnd.kubernetes.protobuf", str),
    ("enable_lease_controller", False, bool),
    ("lease_namespace", "kube-system", str),
    ("lease_label", "k8s-app=konnectivity-server", str),
    ("graceful_shutdown_timeout", 0.0, float),
    ("backend_dial_timeout", 0.0, float),
    # Ours (cli/extensions.py): off, as upstream has no such thing.
    ("enable_tunnel_flow_control", False, bool),
    ("dial_balance", "random", str),
    ("agent_advertise_address", "", str),
    ("enable_peer_forwarding", False, bool),
    ("peer_port", 0, int),
    ("peer_bind_address", "", str),
    ("peer_endpoints", "", str),
    ("peer_cert", "", str),
    ("peer_key", "", str),
    ("peer_ca_cert", "", str),
    ("allowed_destination", [], list),
    ("agent_initiated_dial_timeout", 5.0, float),
    ("max_agent_initiated_connections_per_agent", 1000, int),
    ("workers", 1, int),
]


@pytest.mark.parametrize(("name", "value", "kind"), DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_default_server_options(name: str, value: Any, kind: type) -> None:
    for options in (ProxyRunOptions(), parse_args([], environ={}).options):
        actual = getattr(options, name)
        assert type(actual) is kind, f"{name} has the wrong type"
        assert actual == value, f"{name} has the wrong value"


def test_every_field_has_a_pinned_default() -> None:
    pinned = {name for name, _, _ in DEFAULTS} | {"server_id", "needs_kubernetes_client"}
    assert {f.name for f in dataclasses.fields(ProxyRunOptions)} == pinned


def test_server_id_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROXY_SERVER_ID", raising=False)
    first, second = ProxyRunOptions().server_id, ProxyRunOptions().server_id
    assert uuid.UUID(first).version == 4 and first != second
    monkeypatch.setenv("PROXY_SERVER_ID", "from-env")
    assert ProxyRunOptions().server_id == "from-env"
    assert parse_args([]).options.server_id == "from-env"
    assert parse_args(["--server-id=from-flag"]).options.server_id == "from-flag"
    assert parse_args([], environ={"PROXY_SERVER_ID": ""}).options.server_id != ""
    assert parse_args([], environ={"PROXY_SERVER_ID": "x"}).options.server_id == "x"


def test_flag_surface_matches_golden() -> None:
    golden = read_golden("proxy-server.txt")
    assert [row[0] for row in golden] == sorted(row[0] for row in golden)
    assert flag_surface(build_flagset(), golden) == golden


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Existing files for every path option (validation only checks existence)."""
    paths = {}
    for key in (
        "server_crt",
        "server_key",
        "ca",
        "cluster_crt",
        "cluster_key",
        "cluster_ca",
        "kubeconfig",
    ):
        (tmp_path / key).write_text("")
        paths[key] = str(tmp_path / key)
    paths["missing"] = str(tmp_path / "missing.pem")
    return paths


def tcp_options(files: dict[str, str], **changes: Any) -> ProxyRunOptions:
    """Defaults plus the frontend CA that TCP mode requires: upstream's "default" case
    predates that requirement, so its table runs on this base instead."""
    options = ProxyRunOptions(server_ca_cert=files["ca"])
    for name, value in changes.items():
        setattr(options, name, value.format(**files) if isinstance(value, str) else value)
    return options


UPSTREAM_VALIDATE: list[tuple[str, str, Any, str | None]] = [
    ("default", "", None, None),
    (
        "ReservedServerPort",
        "server_port",
        1023,
        "please do not try to use reserved port 1023 for the server port",
    ),
    ("StartValidServerPort", "server_port", 1024, None),
    ("EndValidServerPort", "server_port", 49151, None),
    (
        "StartEphemeralServerPort",
        "server_port",
        49152,
        "please do not try to use ephemeral port 49152 for the server port",
    ),
    (
        "ReservedAdminPort",
        "admin_port",
        1023,
        "please do not try to use reserved port 1023 for the admin port",
    ),
    ("StartValidAdminPort", "admin_port", 1024, None),
    ("EndValidAdminPort", "admin_port", 49151, None),
    (
        "StartEphemeralAdminPort",
        "admin_port",
        49152,
        "please do not try to use ephemeral port 49152 for the admin port",
    ),
    (
        "ReservedHealthPort",
        "health_port",
        1023,
        "please do not try to use reserved port 1023 for the health port",
    ),
    ("StartValidHealthPort", "health_port", 1024, None),
    ("EndValidHealthPort", "health_port", 49151, None),
    (
        "StartEphemeralHealthPort",
        "health_port",
        49152,
        "please do not try to use ephemeral port 49152 for the health port",
    ),
    (
        "CommaSparatedCipherSuites",
        "cipher-suites",
        "TLS_AES_256_GCM_SHA384,TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        None,
    ),
    ("Empty proxy strategies", "proxy_strategies", "", "ProxyStrategies cannot be empty"),
    (
        "Invalid proxy strategies",
        "proxy_strategies",
        "invalid",
        "invalid proxy strategies: unknown proxy strategy: invalid",
    ),
    ("ZeroXfrChannelSize", "xfr_channel_size", 0, "channel size 0 must be greater than 0"),
    ("NegativeXfrChannelSize", "xfr_channel_size", -10, "channel size -10 must be greater than 0"),
    (
        "NegativeGracefulShutdownTimeout",
        "graceful_shutdown_timeout",
        -1.0,
        "graceful-shutdown-timeout must be >= 0, got -1s",
    ),
    ("ZeroGracefulShutdownTimeout", "graceful_shutdown_timeout", 0.0, None),
    ("PositiveGracefulShutdownTimeout", "graceful_shutdown_timeout", 30.0, None),
]


@pytest.mark.parametrize(
    ("desc", "name", "value", "expected"),
    UPSTREAM_VALIDATE,
    ids=[case[0] for case in UPSTREAM_VALIDATE],
)
def test_validate(
    files: dict[str, str], desc: str, name: str, value: Any, expected: str | None
) -> None:
    if name == "cipher-suites":  # upstream sets this one through the flag
        argv = [f"--cipher-suites={value}", f"--server-ca-cert={files['ca']}"]
        options = parse_args(argv, environ={}).options
    else:
        options = tcp_options(files, **({name: value} if name else {}))
    assert options.validate() == expected


VALIDATION: list[tuple[dict[str, Any], str | None]] = [
    # One rule per row, in upstream's order; paths are formatted with the fixture's files.
    (
        {"server_key": "{missing}"},
        "error checking server key {missing}, got stat {missing}: no such file or directory",
    ),
    (
        {"server_key": "{server_key}"},
        'cannot have server cert empty when server key is set to "{server_key}"',
    ),
    (
        {"server_cert": "{missing}"},
        "error checking server cert {missing}, got stat {missing}: no such file or directory",
    ),
    (
        {"server_cert": "{server_crt}"},
        'cannot have server key empty when server cert is set to "{server_crt}"',
    ),
    (
        {"server_ca_cert": "{missing}"},
        "error checking server CA cert {missing}, got stat {missing}: no such file or directory",
    ),
    (
        {"cluster_key": "{missing}"},
        "error checking cluster key {missing}, got stat {missing}: no such file or directory",
    ),
    (
        {"cluster_key": "{cluster_key}"},
        'cannot have cluster cert empty when cluster key is set to "{cluster_key}"',
    ),
    (
        {"cluster_cert": "{missing}"},
        "error checking cluster cert {missing}, got stat {missing}: no such file or directory",
    ),
    (
        {"cluster_cert": "{cluster_crt}"},
        'cannot have cluster key empty when cluster cert is set to "{cluster_crt}"',
    ),
    (
        {"cluster_ca_cert": "{missing}"},
        "error checking cluster CA cert {missing}, got stat {missing}: no such file or directory",
    ),
    ({"mode": "http"}, "mode must be set to either 'grpc' or 'http-connect' not \"http\""),
    ({"mode": "GRPC"}, "mode must be set to either 'grpc' or 'http-connect' not \"GRPC\""),
    ({"mode": "http-connect"}, None),
    ({"uds_name": "/run/k.sock"}, "server port should be set to 0 not 8090 for UDS"),
    (
        {
            "uds_name": "/run/k.sock",
            "server_port": 0,
            "server_key": "{server_key}",
            "server_cert": "{server_crt}",
        },
        "server key should not be set for UDS",
    ),
    (
        {
            "uds_name": "/run/k.sock",
            "server_port": 0,
            "server_ca_cert": "",
            "server_cert": "",
            "server_key": "",
        },
        None,
    ),
    ({"uds_name": "/run/k.sock", "server_port": 0}, "server ca cert should not be set for UDS"),
    ({"server_ca_cert": ""}, "server ca cert must be set when in TCP mode (uds-name is empty)"),
    ({"agent_port": 49152}, "please do not try to use ephemeral port 49152 for the agent port"),
    ({"agent_port": 0}, "please do not try to use reserved port 0 for the agent port"),
    ({"server_port": -1}, "please do not try to use reserved port -1 for the server port"),
    (
        {"enable_contention_profiling": True},
        "if --enable-contention-profiling is set, --enable-profiling must also be set",
    ),
    ({"enable_contention_profiling": True, "enable_profiling": True}, None),
    (
        {"agent_namespace": "kube-system", "cluster_ca_cert": "{cluster_ca}"},
        "--cluster-ca-cert can not be used when agent authentication is enabled",
    ),
    (
        {"agent_service_account": "konnectivity-agent"},
        "--agent-namespace cannot be empty when agent authentication is enabled",
    ),
    (
        {"agent_namespace": "kube-system"},
        "--agent-service-account cannot be empty when agent authentication is enabled",
    ),
    (
        {"agent_namespace": "kube-system", "agent_service_account": "konnectivity-agent"},
        "--authentication-audience cannot be empty when agent authentication is enabled",
    ),
    (
        {
            "agent_namespace": "kube-system",
            "agent_service_account": "konnectivity-agent",
            "authentication_audience": "system:konnectivity-server",
        },
        None,
    ),
    (
        {"kubeconfig_path": "{missing}"},
        'checking KubeconfigPath "{missing}", got stat {missing}: no such file or directory',
    ),
    ({"kubeconfig_path": "{kubeconfig}", "cluster_ca_cert": "{cluster_ca}"}, None),
    ({"proxy_strategies": ","}, "invalid proxy strategies: proxy strategies cannot be empty"),
    ({"proxy_strategies": "destHost,,default"}, None),
    (
        {"proxy_strategies": "destHost,DefaultRoute"},
        "invalid proxy strategies: unknown proxy strategy: DefaultRoute",
    ),
    (
        {"tls_min_version": "VersionTLS1.2"},
        'unsupported TLS version "VersionTLS1.2", supported values are: VersionTLS10, '
        "VersionTLS11, VersionTLS12, VersionTLS13",
    ),
    ({"tls_min_version": "VersionTLS10"}, None),  # below 1.2 only warns
    ({"tls_min_version": "VersionTLS13"}, None),
    (
        {"cipher_suites": ["TLS_RSA_WITH_RC4_128_SHA"]},
        "cipher suite TLS_RSA_WITH_RC4_128_SHA not supported, doesn't exist or considered as "
        "insecure",
    ),
    (
        {"cipher_suites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "nope"]},
        "cipher suite nope not supported, doesn't exist or considered as insecure",
    ),
    ({"lease_label": ""}, None),  # checked only with the lease controller
    ({"enable_lease_controller": True, "lease_label": ""}, "empty string provided"),
    ({"enable_lease_controller": True, "lease_label": "a=b,c"}, "invalid label format: c"),
    ({"enable_lease_controller": True, "lease_label": "a = b, c=d"}, None),
    ({"backend_dial_timeout": -0.5}, "backend-dial-timeout must be >= 0, got -500ms"),
    ({"graceful_shutdown_timeout": -90.0}, "graceful-shutdown-timeout must be >= 0, got -1m30s"),
    # Ours (cli/extensions.py).
    ({"agent_advertise_address": "lb.example:8141"}, None),
    ({"agent_advertise_address": "[2001:db8::1]:8091"}, None),
    (
        {"agent_advertise_address": "lb.example"},
        "--agent-advertise-address: 'lb.example' is not host:port ([ipv6]:port for IPv6)",
    ),
    (
        {"agent_advertise_address": "lb.example:0"},
        "--agent-advertise-address: 'lb.example:0' has no valid port (1-65535)",
    ),
]


@pytest.mark.parametrize(("changes", "expected"), VALIDATION, ids=lambda v: repr(v)[:60])
def test_validation_message(
    files: dict[str, str], changes: dict[str, Any], expected: str | None
) -> None:
    options = tcp_options(files, **changes)
    assert options.validate() == (expected.format(**files) if expected else None)


ORDER: list[tuple[dict[str, Any], str]] = [
    # Several problems at once: the first in upstream's order is reported.
    ({"server_key": "{missing}", "mode": "x"}, "error checking server key"),
    ({"cluster_ca_cert": "{missing}", "mode": "x"}, "error checking cluster CA cert"),
    ({"mode": "x", "uds_name": "/s"}, "mode must be set"),
    ({"uds_name": "/s", "agent_port": 80}, "server port should be set to 0"),
    ({"server_port": 80, "health_port": 60000}, "please do not try to use ephemeral port 60000"),
    (
        {"agent_port": 80, "server_port": 81},
        "please do not try to use reserved port 81 for the server port",
    ),
    ({"admin_port": 80, "enable_contention_profiling": True}, "please do not try to use reserved"),
    ({"enable_contention_profiling": True, "agent_namespace": "x"}, "if --enable-contention"),
    ({"agent_namespace": "x", "kubeconfig_path": "{missing}"}, "--agent-service-account"),
    ({"kubeconfig_path": "{missing}", "proxy_strategies": ""}, "checking KubeconfigPath"),
    ({"proxy_strategies": "", "xfr_channel_size": 0}, "ProxyStrategies cannot be empty"),
    ({"xfr_channel_size": 0, "tls_min_version": "x"}, "channel size 0"),
    ({"tls_min_version": "x", "cipher_suites": ["x"]}, "unsupported TLS version"),
    (
        {"cipher_suites": ["x"], "enable_lease_controller": True, "lease_label": ""},
        "cipher suite x",
    ),
    (
        {"enable_lease_controller": True, "lease_label": "", "graceful_shutdown_timeout": -1.0},
        "empty string provided",
    ),
    (
        {"graceful_shutdown_timeout": -1.0, "backend_dial_timeout": -1.0},
        "graceful-shutdown-timeout",
    ),
]


@pytest.mark.parametrize(("changes", "prefix"), ORDER, ids=lambda v: repr(v)[:60])
def test_validation_order(files: dict[str, str], changes: dict[str, Any], prefix: str) -> None:
    message = tcp_options(files, **changes).validate()
    assert message is not None and message.startswith(prefix.format(**files))


def test_needs_kubernetes_client(files: dict[str, str]) -> None:
    options = tcp_options(files)
    assert options.validate() is None and not options.needs_kubernetes_client
    leases = tcp_options(files, enable_lease_controller=True)
    assert leases.validate() is None and leases.needs_kubernetes_client
    token = tcp_options(
        files, agent_namespace="a", agent_service_account="b", authentication_audience="c"
    )
    assert token.validate() is None and token.needs_kubernetes_client


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("default", ["default"]),
        ("destHost,default", ["destHost", "default"]),
        ("destHost,,defaultRoute,", ["destHost", "defaultRoute"]),
        (",", "proxy strategies cannot be empty"),
        ("", "proxy strategies cannot be empty"),
        ("default,random", "unknown proxy strategy: random"),
        (" default", "unknown proxy strategy:  default"),
    ],
)
def test_parse_proxy_strategies(text: str, expected: list[str] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=f"^{expected}$"):
            parse_proxy_strategies(text)
    else:
        assert parse_proxy_strategies(text) == expected


# Near misses of each name: the command line must refuse what the layers below do not know.
STRATEGY_CANDIDATES = [*ProxyStrategy, "Default", "desthost", "defaultroute", "random", "dest-host"]
MODE_CANDIDATES = [*FrontendMode, "GRPC", "http_connect", "httpconnect", "connect", "http"]


@pytest.mark.parametrize("name", STRATEGY_CANDIDATES)
def test_command_line_strategies_are_the_routers(files: dict[str, str], name: str) -> None:
    """A strategy is known to every layer or to none: the flag accepts exactly the
    contract's names, and the router has a backend manager for each of them."""
    message = tcp_options(files, proxy_strategies=name).validate()
    known = name in set(ProxyStrategy)
    assert (message is None) == known, message
    if known:
        assert MANAGER_CLASSES[ProxyStrategy(name)].strategy == name
        assert name in usage()


def test_every_strategy_has_a_manager() -> None:
    assert set(MANAGER_CLASSES) == set(ProxyStrategy)


@pytest.mark.parametrize("name", MODE_CANDIDATES)
def test_command_line_modes_are_the_routers(files: dict[str, str], name: str) -> None:
    """The flag accepts exactly the contract's modes (server/app.py picks a listener for
    each, which mypy checks), and the help names each of them."""
    message = tcp_options(files, mode=name).validate()
    known = name in set(FrontendMode)
    assert (message is None) == known, message
    if known:
        assert f"'{name}'" in usage()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k8s-app=konnectivity-server", {"k8s-app": "konnectivity-server"}),
        (" a = 1 ,b=2", {"a": "1", "b": "2"}),
        ("a=", {"a": ""}),
        ("", "empty string provided"),
        ("a=b=c", "invalid label format: a=b=c"),
        ("a=b,", "invalid label format: "),
    ],
)
def test_parse_lease_labels(text: str, expected: dict[str, str] | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError) as info:
            parse_lease_labels(text)
        assert str(info.value) == expected
    else:
        assert parse_lease_labels(text) == expected


def test_gke_command_line(files: dict[str, str]) -> None:
    """kube-up's GCE static pod, gRPC over UDS with token authentication."""
    argv = [
        "--log-file=/var/log/konnectivity-server.log",
        "--logtostderr=false",
        "--log-file-max-size=0",
        f"--cluster-cert={files['cluster_crt']}",
        f"--cluster-key={files['cluster_key']}",
        "--uds-name=/etc/srv/k/konnectivity.socket",
        "--delete-existing-uds-file",
        "--mode=grpc",
        "--server-port=0",
        "--agent-namespace=kube-system",
        "--agent-service-account=konnectivity-agent",
        "--authentication-audience=system:konnectivity-server",
        f"--kubeconfig={files['kubeconfig']}",
        "--proxy-strategies=default",
        "--agent-port=8132",
        "--health-port=8133",
        "--admin-port=8134",
        "--kubeconfig-qps=75",
        "--kubeconfig-burst=150",
        "--keepalive-time=60s",
        "--frontend-keepalive-time=60s",
        "--v=2",
    ]
    line = parse_args(argv, environ={})
    opts = line.options
    assert opts.validate() is None
    assert (opts.uds_name, opts.server_port, opts.agent_port, opts.kubeconfig_qps) == (
        "/etc/srv/k/konnectivity.socket",
        0,
        8132,
        75.0,
    )
    assert opts.keepalive_time == 60.0 and opts.kubeconfig_burst == 150
    assert (line.klog.logtostderr, line.klog.log_file_max_size, line.klog.v) == (False, 0, 2)
    assert "kubeconfig-qps" in line.explicit and "mode" in line.explicit
    assert not line.help_requested and line.args == ()


def test_k0s_style_command_line(files: dict[str, str]) -> None:
    """Space-separated values, HTTP CONNECT over mTLS, two strategies, cipher list."""
    argv = [
        "--logtostderr=true",
        "--cluster-cert",
        files["cluster_crt"],
        "--cluster-key",
        files["cluster_key"],
        "--server-ca-cert",
        files["ca"],
        "--server-cert",
        files["server_crt"],
        "--server-key",
        files["server_key"],
        "--mode",
        "http-connect",
        "--proxy-strategies",
        "destHost,defaultRoute",
        "--keepalive-time",
        "30s",
        "--server-count",
        "3",
        "--cipher-suites",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "--cipher-suites",
        "TLS_AES_128_GCM_SHA256",
        "-v",
        "3",
    ]
    line = parse_args(argv, environ={})
    assert line.options.validate() is None
    assert line.options.cipher_suites == [
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_AES_128_GCM_SHA256",
    ]
    assert (line.options.server_count, line.options.mode, line.klog.v) == (3, "http-connect", 3)


def test_deprecated_warn_on_channel_limit() -> None:
    notices: list[str] = []
    line = parse_args(["--warn-on-channel-limit=false"], environ={}, warn=notices.append)
    assert line.explicit == {"warn-on-channel-limit"}
    assert len(notices) == 1
    assert notices[0].startswith("Flag --warn-on-channel-limit has been deprecated, ")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--xfr-channel-size"], "flag needs an argument: --xfr-channel-size"),
        (["--frontend-write-channel-size=5"], "unknown flag: --frontend-write-channel-size"),
        (
            ["--server-port=80a"],
            'invalid argument "80a" for "--server-port" flag: strconv.ParseInt: parsing "80a": '
            "invalid syntax",
        ),
        (
            ["--keepalive-time=60"],
            'invalid argument "60" for "--keepalive-time" flag: '
            'time: missing unit in duration "60"',
        ),
    ],
)
def test_parse_errors(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError) as info:
        parse_args(argv, environ={})
    assert str(info.value) == message


def test_help() -> None:
    assert parse_args(["-h"], environ={}).help_requested
    assert parse_args(["--help"], environ={}).help_requested
    text = usage()
    assert text.startswith("Konnectivity proxy-server")
    assert "\nUsage:\n  proxy-server [flags]\n\nFlags:\n" in text
    for flag in build_flagset():
        assert (f"--{flag.name} " in text) is not flag.hidden, flag.name
    assert "--mode string " in text and '(default "grpc")' in text
    assert "(default 1h0m0s)" in text and "  -v, --v Level " in text
