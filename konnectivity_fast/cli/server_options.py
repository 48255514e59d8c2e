"""``proxy-server``'s options: upstream's flag set, defaults and validation.

``ProxyRunOptions`` mirrors upstream's struct of the same name (cmd/server/app/options,
v0.36.0): fields in upstream order, named in snake case (``UdsName`` -> ``uds_name``,
``APIContentType`` -> ``api_content_type``). Durations are float seconds. The flag table
(``_FLAGS``) gives each field its upstream flag name and type; defaults come from the
dataclass, and ``tests/data/flags/proxy-server.txt`` pins the whole surface, klog's flags
and cobra's ``--help`` included.

``validate()`` applies upstream's checks in upstream's order and returns upstream's message
for the first failure (``None`` when all pass). Upstream's ``Run`` prefixes it with
``failed to validate server options with `` and exits 1.

``--warn-on-channel-limit`` is a deprecated no-op kept so old command lines still start.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields

from konnectivity_fast.cli.command import CommandLine, parse_command
from konnectivity_fast.cli.extensions import (
    EXTENSION_FLAGS,
    SERVER_EXTENSION_FLAGS,
    add_extension_flags,
    check_advertise_address,
    check_dial_balance,
    check_workers,
)
from konnectivity_fast.cli.flags import (
    BOOL,
    DURATION,
    FLOAT32,
    INT,
    STRING,
    STRING_SLICE,
    FlagSet,
    ValueType,
    command_usage,
)
from konnectivity_fast.cli.goparse import format_duration, go_quote, new_uuid, seconds_to_ns
from konnectivity_fast.cli.klog import KlogOptions, V, register_klog_flags
from konnectivity_fast.cli.node_to_cp import (
    DEFAULT_DIAL_TIMEOUT,
    DEFAULT_MAX_PER_AGENT,
    NODE_TO_CP_SERVER_FLAGS,
    check_node_to_cp,
)
from konnectivity_fast.cli.peering import check_peering
from konnectivity_fast.kube.labels import parse_lease_labels
from konnectivity_fast.wire.contract import FrontendMode, ProxyStrategy, parse_proxy_strategies

__all__ = [
    "GO_CIPHER_SUITES",
    "TLS_VERSIONS",
    "ProxyRunOptions",
    "ServerCommandLine",
    "build_flagset",
    "default_server_id",
    "parse_args",
    "parse_lease_labels",
    "parse_proxy_strategies",
    "usage",
]

log = logging.getLogger(__name__)

PROGRAM = "proxy-server"
SERVER_ID_ENV = "PROXY_SERVER_ID"
_MODES = frozenset(FrontendMode)
TLS_VERSIONS = {
    "VersionTLS10": 0x0301,
    "VersionTLS11": 0x0302,
    "VersionTLS12": 0x0303,
    "VersionTLS13": 0x0304,
}
# Go's tls.CipherSuites(): the names --cipher-suites accepts (the insecure list is refused).
GO_CIPHER_SUITES = frozenset(
    {
        "TLS_RSA_WITH_AES_128_CBC_SHA",
        "TLS_RSA_WITH_AES_256_CBC_SHA",
        "TLS_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_AES_128_GCM_SHA256",
        "TLS_AES_256_GCM_SHA384",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
        "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    }
)
# Ports above this are the ephemeral range, below RESERVED_PORT_LIMIT need privileges.
EPHEMERAL_PORT_START = 49152
RESERVED_PORT_LIMIT = 1024


def default_server_id(environ: Mapping[str, str] | None = None) -> str:
    """``$PROXY_SERVER_ID`` when non-empty, otherwise a fresh UUIDv4; ``--server-id`` wins
    over both."""
    environ = os.environ if environ is None else environ
    return environ.get(SERVER_ID_ENV) or new_uuid()


@dataclass
class ProxyRunOptions:
    """Upstream's ``ProxyRunOptions``, field for field."""

    # TLS towards kube-apiserver (the frontend): served pair, CA that verifies clients.
    server_cert: str = ""
    server_key: str = ""
    server_ca_cert: str = ""
    # TLS towards agents: served pair, CA that verifies agents (mTLS when set).
    cluster_cert: str = ""
    cluster_key: str = ""
    cluster_ca_cert: str = ""
    # Frontend protocol: "grpc" or "http-connect".
    mode: str = FrontendMode.GRPC.value
    # Frontend Unix socket; non-empty selects UDS instead of TCP for the frontend.
    uds_name: str = ""
    # Remove a leftover socket file at uds_name before listening.
    delete_uds_file: bool = True
    server_port: int = 8090
    server_bind_address: str = ""
    agent_port: int = 8091
    agent_bind_address: str = ""
    admin_port: int = 8095
    admin_bind_address: str = "127.0.0.1"
    health_port: int = 8092
    health_bind_address: str = ""
    # Idle time before a keepalive ping, agent side and frontend side (seconds).
    keepalive_time: float = 3600.0
    frontend_keepalive_time: float = 3600.0
    # pprof on the admin port; contention profiling needs enable_profiling.
    enable_profiling: bool = False
    enable_contention_profiling: bool = False
    # This server's identity, sent to agents, and the replica count they should reach.
    server_id: str = field(default_factory=default_server_id)
    server_count: int = 1
    # Token authentication of agents (TokenReview); any of the three enables it.
    agent_namespace: str = ""
    agent_service_account: str = ""
    authentication_audience: str = ""
    # Kubernetes client for TokenReview and leases; empty path means in-cluster config.
    kubeconfig_path: str = ""
    kubeconfig_qps: float = 0.0  # float32; 0 means client-go's default
    kubeconfig_burst: int = 0
    api_content_type: str = "application/vnd.kubernetes.protobuf"
    # Ordered, comma-separated agent selection strategies.
    proxy_strategies: str = ProxyStrategy.DEFAULT.value
    # Go cipher-suite names (TLS 1.2 and below); empty means Go's defaults.
    cipher_suites: list[str] = field(default_factory=list)
    tls_min_version: str = ""  # empty means TLS 1.2
    # Capacity of each per-stream receive queue.
    xfr_channel_size: int = 10
    # Publish and garbage-collect this server's Lease.
    enable_lease_controller: bool = False
    lease_namespace: str = "kube-system"
    lease_label: str = "k8s-app=konnectivity-server"
    # Set by validate(): token auth or leases need a Kubernetes client.
    needs_kubernetes_client: bool = False
    # Seconds; 0 means stop at once / no dial timeout.
    graceful_shutdown_timeout: float = 0.0
    backend_dial_timeout: float = 0.0
    # konnectivity-fast extensions (cli/extensions.py); off: behave as upstream.
    enable_tunnel_flow_control: bool = False
    dial_balance: str = "random"
    agent_advertise_address: str = ""
    # Server peering (cli/peering.py); the peer TLS files default to the server's.
    enable_peer_forwarding: bool = False
    peer_port: int = 0
    peer_bind_address: str = ""
    peer_endpoints: str = ""
    peer_cert: str = ""
    peer_key: str = ""
    peer_ca_cert: str = ""
    # Node-to-control-plane tunneling (cli/node_to_cp.py); off without a destination.
    allowed_destination: list[str] = field(default_factory=list)
    agent_initiated_dial_timeout: float = DEFAULT_DIAL_TIMEOUT
    max_agent_initiated_connections_per_agent: int = DEFAULT_MAX_PER_AGENT
    # Worker processes (server/workers.py); 1: one process, as upstream.
    workers: int = 1

    def validate(self) -> str | None:
        """The first failing check's message, in upstream's order, or ``None``."""
        for check in (
            self._check_files,
            self._check_mode,
            self._check_ports,
            self._check_auth,
            self._check_tuning,
            self._check_extensions,
        ):
            error = check()
            if error is not None:
                return error
        self.needs_kubernetes_client = self._uses_token_auth() or self.enable_lease_controller
        return None

    def _check_extensions(self) -> str | None:
        """Our flags (cli/extensions.py), after all of upstream's checks."""
        return (
            check_dial_balance(self.dial_balance)
            or check_advertise_address(self.agent_advertise_address)
            or check_peering(self)
            or check_node_to_cp(self)
            or check_workers(self)
        )

    def _check_files(self) -> str | None:
        for side, cert, key, ca in (
            ("server", self.server_cert, self.server_key, self.server_ca_cert),
            ("cluster", self.cluster_cert, self.cluster_key, self.cluster_ca_cert),
        ):
            if key:
                if (err := _stat_error(key)) is not None:
                    return f"error checking {side} key {key}, got {err}"
                if not cert:
                    return (
                        f"cannot have {side} cert empty when {side} key is set to {go_quote(key)}"
                    )
            if cert:
                if (err := _stat_error(cert)) is not None:
                    return f"error checking {side} cert {cert}, got {err}"
                if not key:
                    return (
                        f"cannot have {side} key empty when {side} cert is set to {go_quote(cert)}"
                    )
            if ca and (err := _stat_error(ca)) is not None:
                return f"error checking {side} CA cert {ca}, got {err}"
        return None

    def _check_mode(self) -> str | None:
        if self.mode not in _MODES:  # upstream's message, which names its two modes
            return f"mode must be set to either 'grpc' or 'http-connect' not {go_quote(self.mode)}"
        if self.uds_name:
            if self.server_port != 0:
                return f"server port should be set to 0 not {self.server_port} for UDS"
            if self.server_key:
                return "server key should not be set for UDS"
            if self.server_cert:
                return "server cert should not be set for UDS"
            if self.server_ca_cert:
                return "server ca cert should not be set for UDS"
        elif not self.server_ca_cert:
            return "server ca cert must be set when in TCP mode (uds-name is empty)"
        return None

    def _check_ports(self) -> str | None:
        ports = (
            ("server", self.server_port),
            ("agent", self.agent_port),
            ("admin", self.admin_port),
            ("health", self.health_port),
        )
        for name, port in ports:
            if port >= EPHEMERAL_PORT_START:
                return f"please do not try to use ephemeral port {port} for the {name} port"
        for name, port in ports:
            if port < RESERVED_PORT_LIMIT and not (name == "server" and self.uds_name):
                return f"please do not try to use reserved port {port} for the {name} port"
        if self.enable_contention_profiling and not self.enable_profiling:
            return "if --enable-contention-profiling is set, --enable-profiling must also be set"
        return None

    def _uses_token_auth(self) -> bool:
        return bool(
            self.agent_namespace or self.agent_service_account or self.authentication_audience
        )

    def _check_auth(self) -> str | None:
        if self._uses_token_auth():
            if self.cluster_ca_cert:
                return "--cluster-ca-cert can not be used when agent authentication is enabled"
            for flag_name, value in (
                ("agent-namespace", self.agent_namespace),
                ("agent-service-account", self.agent_service_account),
                ("authentication-audience", self.authentication_audience),
            ):
                if not value:
                    return f"--{flag_name} cannot be empty when agent authentication is enabled"
        if self.kubeconfig_path and (err := _stat_error(self.kubeconfig_path)) is not None:
            return f"checking KubeconfigPath {go_quote(self.kubeconfig_path)}, got {err}"
        return None

    def _check_tuning(self) -> str | None:
        if not self.proxy_strategies:
            return "ProxyStrategies cannot be empty"
        try:
            parse_proxy_strategies(self.proxy_strategies)
        except ValueError as exc:
            return f"invalid proxy strategies: {exc}"
        if self.xfr_channel_size <= 0:
            return f"channel size {self.xfr_channel_size} must be greater than 0"
        if self.tls_min_version:
            version = TLS_VERSIONS.get(self.tls_min_version)
            if version is None:
                return (
                    f"unsupported TLS version {go_quote(self.tls_min_version)}, supported "
                    f"values are: {', '.join(TLS_VERSIONS)}"
                )
            if version < TLS_VERSIONS["VersionTLS12"]:
                log.warning(
                    "--tls-min-version=%s allows TLS older than 1.2, which is not "
                    "considered secure (RFC 8996)",
                    self.tls_min_version,
                )
        for suite in self.cipher_suites:
            if suite not in GO_CIPHER_SUITES:
                return (
                    f"cipher suite {suite} not supported, doesn't exist or considered as insecure"
                )
        if self.enable_lease_controller:
            try:
                parse_lease_labels(self.lease_label)
            except ValueError as exc:
                return str(exc)
        for flag_name, seconds in (
            ("graceful-shutdown-timeout", self.graceful_shutdown_timeout),
            ("backend-dial-timeout", self.backend_dial_timeout),
        ):
            if seconds < 0:
                return f"{flag_name} must be >= 0, got {format_duration(seconds_to_ns(seconds))}"
        return None

    def log_values(self, logger: logging.Logger = log) -> None:
        """Log every option at V(1), as upstream does before validating."""
        for f in fields(self):
            logger.log(V(1), "option %s = %r", f.name, getattr(self, f.name))


def _stat_error(path: str) -> str | None:
    """Go's ``os.Stat`` error text when ``path`` does not exist (other errors pass, as
    upstream only tests ``os.IsNotExist``)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return f"stat {path}: no such file or directory"
    except (OSError, ValueError):
        return None
    return None


# (flag, field, type, help); deprecated flags carry their message after the help.
_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "server-cert",
        "server_cert",
        STRING,
        "Certificate (PEM) served to kube-apiserver on the TCP frontend.",
    ),
    ("server-key", "server_key", STRING, "Private key (PEM) for --server-cert."),
    (
        "server-ca-cert",
        "server_ca_cert",
        STRING,
        "CA bundle that kube-apiserver's client certificate must chain to; required for the "
        "TCP frontend.",
    ),
    ("cluster-cert", "cluster_cert", STRING, "Certificate (PEM) served to agents."),
    ("cluster-key", "cluster_key", STRING, "Private key (PEM) for --cluster-cert."),
    (
        "cluster-ca-cert",
        "cluster_ca_cert",
        STRING,
        "CA bundle for agent client certificates; when set, agents must present one. Not "
        "compatible with token authentication.",
    ),
    (
        "mode",
        "mode",
        STRING,
        "Protocol spoken to kube-apiserver: " + " or ".join(f"'{m}'" for m in FrontendMode) + ".",
    ),
    (
        "uds-name",
        "uds_name",
        STRING,
        "Unix socket path for the frontend; when set, the frontend listens there (plaintext) "
        "instead of on --server-port.",
    ),
    (
        "delete-existing-uds-file",
        "delete_uds_file",
        BOOL,
        "Remove a leftover file at --uds-name before listening.",
    ),
    (
        "server-port",
        "server_port",
        INT,
        "TCP port for kube-apiserver connections; must be 0 with --uds-name.",
    ),
    (
        "server-bind-address",
        "server_bind_address",
        STRING,
        "Address for the frontend port; empty means all interfaces.",
    ),
    ("agent-port", "agent_port", INT, "TCP port agents connect to."),
    (
        "agent-bind-address",
        "agent_bind_address",
        STRING,
        "Address for the agent port; empty means all interfaces.",
    ),
    ("admin-port", "admin_port", INT, "TCP port of the admin server (metrics, profiling)."),
    (
        "admin-bind-address",
        "admin_bind_address",
        STRING,
        "Address for the admin port; empty means all interfaces.",
    ),
    (
        "health-port",
        "health_port",
        INT,
        "TCP port of the health server (/healthz, /readyz, /metrics).",
    ),
    (
        "health-bind-address",
        "health_bind_address",
        STRING,
        "Address for the health port; empty means all interfaces.",
    ),
    (
        "keepalive-time",
        "keepalive_time",
        DURATION,
        "Idle time after which the server pings an agent connection.",
    ),
    (
        "frontend-keepalive-time",
        "frontend_keepalive_time",
        DURATION,
        "Idle time after which the server pings a gRPC frontend connection.",
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
        "server-id",
        "server_id",
        STRING,
        "Unique ID of this server, announced to agents; defaults to a random UUID.",
    ),
    (
        "server-count",
        "server_count",
        INT,
        "Number of proxy-server replicas agents should connect to; 1 unless running HA.",
    ),
    (
        "agent-namespace",
        "agent_namespace",
        STRING,
        "Namespace of the agents' service account; enables token authentication of agents.",
    ),
    (
        "agent-service-account",
        "agent_service_account",
        STRING,
        "Service account the agents' tokens must belong to (token authentication).",
    ),
    (
        "authentication-audience",
        "authentication_audience",
        STRING,
        "Audience the agents' tokens must carry (token authentication).",
    ),
    (
        "kubeconfig",
        "kubeconfig_path",
        STRING,
        "Kubeconfig used for token reviews and leases; empty means in-cluster configuration.",
    ),
    (
        "kubeconfig-qps",
        "kubeconfig_qps",
        FLOAT32,
        "Request rate limit of the Kubernetes client; 0 keeps the client's default.",
    ),
    (
        "kubeconfig-burst",
        "kubeconfig_burst",
        INT,
        "Burst allowance of the Kubernetes client; 0 keeps the client's default.",
    ),
    (
        "kube-api-content-type",
        "api_content_type",
        STRING,
        "Content type of requests to the Kubernetes API.",
    ),
    (
        "proxy-strategies",
        "proxy_strategies",
        STRING,
        "Comma-separated, ordered ways to choose an agent for a dial: "
        + ", ".join(ProxyStrategy)
        + ".",
    ),
    (
        "cipher-suites",
        "cipher_suites",
        STRING_SLICE,
        "Cipher suites (Go names) allowed up to TLS 1.2; empty keeps the defaults. TLS 1.3 "
        "suites are not configurable.",
    ),
    (
        "tls-min-version",
        "tls_min_version",
        STRING,
        "Oldest TLS version accepted: VersionTLS10, VersionTLS11, VersionTLS12 or "
        "VersionTLS13; empty means VersionTLS12.",
    ),
    (
        "xfr-channel-size",
        "xfr_channel_size",
        INT,
        "Packets queued per stream, from kube-apiserver and from agents, before reading pauses.",
    ),
    (
        "enable-lease-controller",
        "enable_lease_controller",
        BOOL,
        "Publish a Lease for this server, and delete expired ones, so agents can count servers.",
    ),
    ("lease-namespace", "lease_namespace", STRING, "Namespace of the server Leases."),
    (
        "lease-label",
        "lease_label",
        STRING,
        "Labels (k=v,k2=v2) put on this server's Lease and used to find expired ones.",
    ),
    (
        "graceful-shutdown-timeout",
        "graceful_shutdown_timeout",
        DURATION,
        "On SIGTERM, how long to let open connections finish before stopping; 0 stops at once.",
    ),
    (
        "backend-dial-timeout",
        "backend_dial_timeout",
        DURATION,
        "How long a dial may wait to be sent to an agent and answered; 0 waits forever.",
    ),
)
_DEPRECATED: tuple[tuple[str, ValueType, object, str, str], ...] = (
    (
        "warn-on-channel-limit",
        BOOL,
        True,
        "Has no effect.",
        "This behavior is now thread safe and always on. This flag will be removed in a future "
        "release.",
    ),
)
_DESCRIPTION = """\
Konnectivity proxy-server (konnectivity-fast): accepts tunnels from proxy-agents on the
node network and carries kube-apiserver's connections to nodes, pods and services through
them, over gRPC or HTTP CONNECT."""


def build_flagset(
    defaults: ProxyRunOptions | None = None, klog_defaults: KlogOptions | None = None
) -> FlagSet:
    """``proxy-server``'s complete flag set: upstream's options, klog's and ``--help``."""
    defaults = defaults or ProxyRunOptions()
    fs = FlagSet(PROGRAM)
    for name, dest, kind, text in _FLAGS:
        fs.add(
            name,
            kind,
            getattr(defaults, dest),
            text,
            dest=dest,
            env=SERVER_ID_ENV if dest == "server_id" else "",
        )
    for name, kind, default, text, message in _DEPRECATED:
        fs.add(name, kind, default, text, deprecated=message)
    add_extension_flags(
        fs, defaults, EXTENSION_FLAGS + SERVER_EXTENSION_FLAGS + NODE_TO_CP_SERVER_FLAGS
    )
    register_klog_flags(fs, klog_defaults)
    fs.add("help", BOOL, False, f"Show this help for {PROGRAM} and exit.", shorthand="h")
    return fs


ServerCommandLine = CommandLine[ProxyRunOptions]


def parse_args(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> ServerCommandLine:
    """Parse ``argv`` (without the program name); raises ``FlagError`` with pflag's text."""
    defaults = ProxyRunOptions(server_id=default_server_id(environ))
    return parse_command(build_flagset(defaults), ProxyRunOptions, argv, environ=environ, warn=warn)


def usage() -> str:
    """The ``--help`` text."""
    return command_usage(_DESCRIPTION, PROGRAM, build_flagset())
