"""``proxy-agent``'s options: upstream's flag set, defaults and validation.

``GrpcProxyAgentOptions`` mirrors upstream's struct (cmd/agent/app/options, v0.36.0):
fields in upstream order, snake case, durations in float seconds. ``_FLAGS`` maps them to
upstream's flag names; ``tests/data/flags/proxy-agent.txt`` pins the surface, including
klog's flags and ``--help``.

``--lease-label`` is a plain string, as in v0.36.0: with ``--count-server-leases`` it must
be a ``k=v,k2=v2`` list (checked by validation with the server's ``parse_lease_labels``
messages); the agent then reads it as a Kubernetes label selector
(``parse_label_selector``).

``validate()`` applies upstream's checks in upstream's order and returns the first
failure's message, or ``None``; upstream's ``Run`` prefixes it with
``failed to validate agent options with ``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from konnectivity_fast.cli.command import CommandLine, parse_command
from konnectivity_fast.cli.extensions import (
    AGENT_EXTENSION_FLAGS,
    EXTENSION_FLAGS,
    add_extension_flags,
    check_discovery,
    check_node_to_cp,
)
from konnectivity_fast.cli.flags import (
    BOOL,
    DURATION,
    INT,
    STRING,
    STRING_SLICE,
    FlagSet,
    ValueType,
    command_usage,
)
from konnectivity_fast.cli.goparse import (
    GoError,
    format_duration,
    go_quote,
    new_uuid,
    seconds_to_ns,
)
from konnectivity_fast.cli.klog import KlogOptions, V, register_klog_flags
from konnectivity_fast.kube.labels import parse_lease_labels
from konnectivity_fast.wire.contract import decode_agent_identifiers
from konnectivity_fast.wire.endpoints import parse_address_list

__all__ = [
    "SERVER_COUNT_SOURCES",
    "AgentCommandLine",
    "GrpcProxyAgentOptions",
    "LabelRequirement",
    "build_flagset",
    "default_agent_id",
    "parse_args",
    "parse_label_selector",
    "usage",
]

log = logging.getLogger(__name__)

PROGRAM = "proxy-agent"
AGENT_ID_ENV = "PROXY_AGENT_ID"
SERVER_COUNT_SOURCES = ("", "default", "max")
DEFAULT_LEASE_SELECTOR = "k8s-app=konnectivity-server"


def default_agent_id(environ: Mapping[str, str] | None = None) -> str:
    """``$PROXY_AGENT_ID`` when non-empty, otherwise a UUIDv4 made once per process run;
    ``--agent-id`` wins over both."""
    environ = os.environ if environ is None else environ
    return environ.get(AGENT_ID_ENV) or new_uuid()


@dataclass
class GrpcProxyAgentOptions:
    """Upstream's ``GrpcProxyAgentOptions``, field for field."""

    # mTLS towards the proxy-server: client pair (both or neither) and the server's CA.
    agent_cert: str = ""
    agent_key: str = ""
    ca_cert: str = ""
    # Where the proxy-server (or its load balancer) is; the host is also the TLS name.
    proxy_server_host: str = "127.0.0.1"
    proxy_server_port: int = 8091
    # Extra ALPN protocols, offered before h2.
    alpn_protos: list[str] = field(default_factory=list)
    # Health server (/healthz, /readyz, /metrics) and admin server (metrics, pprof).
    health_server_host: str = ""
    health_server_port: int = 8093
    admin_bind_address: str = "127.0.0.1"
    admin_server_port: int = 8094
    enable_profiling: bool = False
    enable_contention_profiling: bool = False
    # Identity sent to servers, and URL-query-encoded identifiers (host=, ipv4=, ...).
    agent_id: str = field(default_factory=default_agent_id)
    agent_identifiers: str = ""
    # Connection upkeep, seconds: base sync period, readiness probe period, backoff cap.
    sync_interval: float = 1.0
    probe_interval: float = 1.0
    sync_interval_cap: float = 10.0
    keepalive_time: float = 3600.0
    # File with the bearer token for token authentication, re-read on each connect.
    service_account_token_path: str = ""
    warn_on_channel_limit: bool = False
    # Keep dialing even once every server is connected.
    sync_forever: bool = False
    # Queue capacity per direction per tunneled connection.
    xfr_channel_size: int = 150
    # Count servers from their Leases.
    count_server_leases: bool = False
    lease_namespace: str = "kube-system"
    lease_label: str = DEFAULT_LEASE_SELECTOR
    # How the server count is combined: "" or "default", or "max".
    server_count_source: str = "default"
    # Kubernetes client for leases; empty path means in-cluster configuration.
    kubeconfig_path: str = ""
    api_content_type: str = "application/vnd.kubernetes.protobuf"
    # konnectivity-fast extensions (cli/extensions.py); off: behave as upstream.
    enable_tunnel_flow_control: bool = False
    proxy_server_list: str = ""
    server_discovery: str = ""
    proxy_server_service: str = ""
    proxy_server_tls_name: str = ""
    # Node-to-control-plane tunneling (docs/node-to-control-plane.md).
    apiserver_port_mappings: list[str] = field(default_factory=list)
    bind_address: str = "127.0.0.1"
    feature_gates: str = ""
    apiserver_port_mapping_dial_timeout: float = 10.0

    def validate(self) -> str | None:
        """The first failing check's message, in upstream's order, or ``None``."""
        if self.agent_key:
            if (err := _stat_error(self.agent_key)) is not None:
                return f"error checking agent key {self.agent_key}, got {err}"
            if not self.agent_cert:
                return f'cannot have agent cert empty when agent key is set to "{self.agent_key}"'
        if self.agent_cert:
            if (err := _stat_error(self.agent_cert)) is not None:
                return f"error checking agent cert {self.agent_cert}, got {err}"
            if not self.agent_key:
                return f'cannot have agent key empty when agent cert is set to "{self.agent_cert}"'
        if self.ca_cert and (err := _stat_error(self.ca_cert)) is not None:
            return f"error checking agent CA cert {self.ca_cert}, got {err}"
        for name, port in (
            ("proxy server", self.proxy_server_port),
            ("health server", self.health_server_port),
            ("admin server", self.admin_server_port),
        ):
            if port <= 0:
                return f"{name} port {port} must be greater than 0"
        if self.xfr_channel_size <= 0:
            return f"channel size {self.xfr_channel_size} must be greater than 0"
        if self.enable_contention_profiling and not self.enable_profiling:
            return "if --enable-contention-profiling is set, --enable-profiling must also be set"
        if self.sync_interval > self.sync_interval_cap:
            return (
                f"sync interval {format_duration(seconds_to_ns(self.sync_interval))} must "
                "be less than sync interval cap "
                f"{format_duration(seconds_to_ns(self.sync_interval_cap))}"
            )
        token = self.service_account_token_path
        if token and (err := _stat_error(token)) is not None:
            return f"error checking service account token path {token}, got {err}"
        try:
            decode_agent_identifiers(self.agent_identifiers)
        except ValueError as exc:
            return f"agent address is invalid: {exc}"
        if self.kubeconfig_path and (err := _stat_error(self.kubeconfig_path)) is not None:
            return f"error checking KubeconfigPath {go_quote(self.kubeconfig_path)}, got {err}"
        if self.count_server_leases:
            try:
                parse_lease_labels(self.lease_label)
            except ValueError as exc:
                return str(exc)
        if self.server_count_source not in SERVER_COUNT_SOURCES:
            return (
                "--server-count-source must be one of '', 'default', 'max', got "
                f"{self.server_count_source}"
            )
        return self._validate_direct() or check_node_to_cp(
            self.apiserver_port_mappings,
            self.feature_gates,
            self.apiserver_port_mapping_dial_timeout,
        )

    def _validate_direct(self) -> str | None:
        """Our direct-endpoint flags (cli/extensions.py AGENT_EXTENSION_FLAGS)."""
        try:
            parse_address_list(self.proxy_server_list)
        except ValueError as exc:
            return f"--proxy-server-list: {exc}"
        error = check_discovery(
            self.server_discovery, self.proxy_server_service, self.count_server_leases
        )
        if error is not None:
            return error
        if not self.proxy_server_host and not (self.proxy_server_list or self.server_discovery):
            return (
                "--proxy-server-host may be empty only with --proxy-server-list or "
                "--server-discovery"
            )
        return None

    def log_values(self, logger: logging.Logger = log) -> None:
        """Log every option at V(1), as upstream does before validating."""
        for f in fields(self):
            logger.log(V(1), "option %s = %r", f.name, getattr(self, f.name))


def _stat_error(path: str) -> str | None:
    """Go's ``os.Stat`` error text when ``path`` does not exist; upstream only tests
    ``os.IsNotExist``, so other failures pass."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"stat {path}: no such file or directory"
    except (OSError, ValueError):
        return None
    return None


# -- --lease-label-selector (Kubernetes label selector syntax) -------------------------------


@dataclass(frozen=True)
class LabelRequirement:
    """One term of a selector. ``operator`` is one of ``exists``, ``!``, ``=``, ``==``,
    ``!=``, ``in``, ``notin``, ``gt``, ``lt``."""

    key: str
    operator: str
    values: tuple[str, ...] = ()


_SELECTOR_TOKEN = re.compile(r"\s*(?:(!=|==|[!=(),<>])|([^\s!=(),<>]+))")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_MAX_LABEL = 63
_MAX_PREFIX = 253


def _check_key(key: str) -> None:
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > _MAX_PREFIX or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        raise GoError(
            f"invalid label key {go_quote(key)}: the prefix before '/' must be a "
            "lowercase DNS subdomain"
        )
    if not name or len(name) > _MAX_LABEL or not _LABEL_NAME.fullmatch(name):
        raise GoError(
            f"invalid label key {go_quote(key)}: the name must be 1-63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit"
        )


def _check_value(value: str) -> None:
    if value and (len(value) > _MAX_LABEL or not _LABEL_NAME.fullmatch(value)):
        raise GoError(
            f"invalid label value {go_quote(value)}: it must be at most 63 letters, "
            "digits, '-', '_' or '.', starting and ending with a letter or digit"
        )


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _SELECTOR_TOKEN.match(text, pos)
        if m is None:  # only trailing whitespace is left
            break
        tokens.append(m.group(0).strip())
        pos = m.end()
    return tokens


def parse_label_selector(text: str) -> tuple[LabelRequirement, ...]:
    """Kubernetes selector syntax: ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
    ``k notin (a)``, ``k``, ``!k``, ``k>1``, ``k<1``, joined by commas; empty selects all.
    Raises ``GoError`` naming the problem."""
    return _SelectorParser(text).parse()


class _SelectorParser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def _peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _take(self) -> str:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def _expected(self, what: str) -> GoError:
        return GoError(f"found '{self._peek() or ''}', expected: {what}")

    def parse(self) -> tuple[LabelRequirement, ...]:
        reqs: list[LabelRequirement] = []
        while self.toks:
            reqs.append(self._requirement())
            tok = self._peek()
            if tok is None:
                break
            if tok != ",":
                raise self._expected("',' or 'end of string'")
            self.i += 1
            if self._peek() is None:
                raise self._expected("identifier after ','")
        return tuple(reqs)

    def _requirement(self) -> LabelRequirement:
        negate = self._peek() == "!"
        self.i += negate
        tok = self._peek()
        if tok is None or not _is_word(tok):
            raise self._expected("identifier")
        key = self._take()
        _check_key(key)
        tok = self._peek()
        if negate or tok in (None, ","):
            return LabelRequirement(key, "!" if negate else "exists")
        if tok in ("in", "notin"):
            self.i += 1
            values = self._value_set()
            for value in values:
                _check_value(value)
            return LabelRequirement(key, str(tok), values)
        if tok not in ("=", "==", "!=", ">", "<"):
            raise self._expected("'=', '!=', '==', 'in', 'notin', '>' or '<'")
        op = {">": "gt", "<": "lt"}.get(self._take(), str(tok))
        nxt = self._peek()
        value = self._take() if nxt is not None and _is_word(nxt) else ""
        if op in ("gt", "lt"):
            if not re.fullmatch(r"-?[0-9]+", value):
                raise GoError(
                    f"for 'gt', 'lt' operators, the value must be an integer: {go_quote(value)}"
                )
        else:
            _check_value(value)
        return LabelRequirement(key, op, (value,))

    def _value_set(self) -> tuple[str, ...]:
        if self._peek() != "(":
            raise self._expected("'('")
        self.i += 1
        values = []
        while True:
            tok = self._peek()
            # "(a,,b)" and "()" hold an empty value, as in Kubernetes
            values.append(self._take() if tok is not None and _is_word(tok) else "")
            tok = self._peek()
            self.i += 1
            if tok == ")":
                return tuple(values)
            if tok != ",":
                self.i -= 1
                raise self._expected("',' or ')'")


def _is_word(token: str) -> bool:
    return token not in ("!", "!=", "=", "==", "(", ")", ",", "<", ">")


# (flag, field, type, help)
_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "agent-cert",
        "agent_cert",
        STRING,
        "Client certificate (PEM) presented to the proxy-server; needs --agent-key.",
    ),
    ("agent-key", "agent_key", STRING, "Private key (PEM) for --agent-cert."),
    ("ca-cert", "ca_cert", STRING, "CA bundle that the proxy-server's certificate must chain to."),
    (
        "proxy-server-host",
        "proxy_server_host",
        STRING,
        "Host name or address of the proxy-server (or its load balancer); also the TLS "
        "server name.",
    ),
    ("proxy-server-port", "proxy_server_port", INT, "Port of the proxy-server's agent listener."),
    (
        "alpn-proto",
        "alpn_protos",
        STRING_SLICE,
        "Extra ALPN protocols to offer, before h2; lets the proxy-server share an address "
        "with another TLS service.",
    ),
    (
        "health-server-host",
        "health_server_host",
        STRING,
        "Address of the health server; empty means all interfaces.",
    ),
    (
        "health-server-port",
        "health_server_port",
        INT,
        "Port of the health server (/healthz, /readyz, /metrics).",
    ),
    (
        "admin-bind-address",
        "admin_bind_address",
        STRING,
        "Address of the admin server; empty means all interfaces.",
    ),
    (
        "admin-server-port",
        "admin_server_port",
        INT,
        "Port of the admin server (metrics, profiling).",
    ),
    (
        "enable-profiling",
        "enable_profiling",
        BOOL,
        "Serve profiling endpoints under /debug/pprof on the admin port.",
    ),
    (
        "enable-contention-profiling",
        "enable_contention_profiling",
        BOOL,
        "Also profile lock contention; needs --enable-profiling.",
    ),
    (
        "agent-id",
        "agent_id",
        STRING,
        "Unique ID of this agent, sent to proxy-servers; defaults to a random UUID.",
    ),
    (
        "agent-identifiers",
        "agent_identifiers",
        STRING,
        "Destinations this agent serves, URL-query encoded, for the servers' destHost and "
        "defaultRoute strategies, e.g. host=node1&ipv4=10.0.0.5&cidr=10.0.0.0/24&"
        "default-route=true.",
    ),
    (
        "sync-interval",
        "sync_interval",
        DURATION,
        "How often to check that every proxy-server is connected; also the first retry delay.",
    ),
    (
        "probe-interval",
        "probe_interval",
        DURATION,
        "How often each connection's readiness is checked.",
    ),
    (
        "sync-interval-cap",
        "sync_interval_cap",
        DURATION,
        "Longest retry delay while the proxy-server cannot be reached.",
    ),
    (
        "keepalive-time",
        "keepalive_time",
        DURATION,
        "Idle time after which the agent pings its proxy-server connections.",
    ),
    (
        "service-account-token-path",
        "service_account_token_path",
        STRING,
        "File holding a service-account token to authenticate to the proxy-server.",
    ),
    (
        "warn-on-channel-limit",
        "warn_on_channel_limit",
        BOOL,
        "Log a warning whenever a connection's queue is full.",
    ),
    (
        "sync-forever",
        "sync_forever",
        BOOL,
        "Keep looking for proxy-servers even once the expected number is connected.",
    ),
    (
        "xfr-channel-size",
        "xfr_channel_size",
        INT,
        "Packets queued per direction per tunneled connection before reading pauses.",
    ),
    (
        "count-server-leases",
        "count_server_leases",
        BOOL,
        "Learn the number of proxy-servers from their Leases.",
    ),
    ("lease-namespace", "lease_namespace", STRING, "Namespace of the proxy-server Leases."),
    (
        "lease-label",
        "lease_label",
        STRING,
        "Labels of the proxy-server Leases to count (k=v,k2=v2).",
    ),
    (
        "server-count-source",
        "server_count_source",
        STRING,
        "How to combine the server counts seen: 'default' or '' (leases when counting them, "
        "else what the servers report) or 'max' (the larger of the two).",
    ),
    (
        "kubeconfig",
        "kubeconfig_path",
        STRING,
        "Kubeconfig used to read Leases; empty means in-cluster configuration.",
    ),
    (
        "kube-api-content-type",
        "api_content_type",
        STRING,
        "Content type of requests to the Kubernetes API.",
    ),
)
_DESCRIPTION = """\
Konnectivity proxy-agent (konnectivity-fast): keeps tunnels open to every proxy-server
replica and opens the connections that kube-apiserver asks for through them, to nodes,
pods and services on this network."""


def build_flagset(
    defaults: GrpcProxyAgentOptions | None = None, klog_defaults: KlogOptions | None = None
) -> FlagSet:
    """``proxy-agent``'s complete flag set: upstream's options, klog's and ``--help``."""
    defaults = defaults or GrpcProxyAgentOptions()
    fs = FlagSet(PROGRAM)
    for name, dest, kind, text in _FLAGS:
        fs.add(
            name,
            kind,
            getattr(defaults, dest),
            text,
            dest=dest,
            env=AGENT_ID_ENV if dest == "agent_id" else "",
        )
    add_extension_flags(fs, defaults, EXTENSION_FLAGS + AGENT_EXTENSION_FLAGS)
    register_klog_flags(fs, klog_defaults)
    fs.add("help", BOOL, False, f"Show this help for {PROGRAM} and exit.", shorthand="h")
    return fs


AgentCommandLine = CommandLine[GrpcProxyAgentOptions]


def parse_args(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> AgentCommandLine:
    """Parse ``argv`` (without the program name); raises ``FlagError`` with pflag's text."""
    defaults = GrpcProxyAgentOptions(agent_id=default_agent_id(environ))
    return parse_command(
        build_flagset(defaults), GrpcProxyAgentOptions, argv, environ=environ, warn=warn
    )


def usage() -> str:
    """The ``--help`` text."""
    return command_usage(_DESCRIPTION, PROGRAM, build_flagset())
