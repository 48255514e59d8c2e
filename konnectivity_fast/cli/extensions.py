"""The flags of konnectivity-fast's extensions, shared by both programs.

Upstream's flags are declared in ``server_options`` and ``agent_options`` and pinned against
upstream's binaries (tests/compat). The flags here are ours: each is marked ``extension``
(tests/compat allows exactly those beyond upstream's), its help text starts with
``EXTENSION_MARK``, and its default leaves the program behaving as upstream's. An extension
that changes the wire is offered to peers (``wire.contract``, ``kf-capabilities``) only when
its flag enables it, and used only on streams where the peer offered it too.
"""

from __future__ import annotations

from typing import Protocol

from konnectivity_fast.agent.portmap import node_to_master_gate, parse_mappings
from konnectivity_fast.cli.flags import (
    BOOL,
    DURATION,
    INT,
    STRING,
    STRING_SLICE,
    FlagSet,
    ValueType,
)
from konnectivity_fast.wire.contract import NO_EXTENSIONS, DialBalance, Extension, ExtensionSet
from konnectivity_fast.wire.endpoints import parse_address

__all__ = [
    "AGENT_EXTENSION_FLAGS",
    "DISCOVERY_SOURCES",
    "EXTENSION_FLAGS",
    "EXTENSION_MARK",
    "NODE_TO_CP_FLAGS",
    "PEER_EXTENSION_FLAGS",
    "SERVER_EXTENSION_FLAGS",
    "ExtensionOptions",
    "ServerExtensionOptions",
    "add_extension_flags",
    "check_advertise_address",
    "check_dial_balance",
    "check_discovery",
    "check_node_to_cp",
    "check_workers",
    "node_to_cp_active",
    "offered_extensions",
    "offered_server_extensions",
]

EXTENSION_MARK = "[konnectivity-fast] "

#: (flag, option field, type, help) of the flags both programs have.
EXTENSION_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "enable-tunnel-flow-control",
        "enable_tunnel_flow_control",
        BOOL,
        "Offer per-tunnel flow control (flow.v1) to peers: with a konnectivity-fast peer "
        "that offers it too, every tunnel gets its own credit window each way, so a slow "
        "reader holds only its own tunnel and is never closed for being slow. Upstream "
        "peers are not affected. Enable it on servers and agents.",
    ),
)


#: The proxy-server's own.
SERVER_EXTENSION_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "dial-balance",
        "dial_balance",
        STRING,
        "How a dial picks among the agents its proxy strategies allow: "
        + " or ".join(DialBalance)
        + ". random is upstream's choice; least-tunnels sends each dial to a candidate "
        "with the fewest open tunnels (ties random), so load spreads evenly over agents.",
    ),
    (
        "agent-advertise-address",
        "agent_advertise_address",
        STRING,
        "host:port ([ipv6]:port) at which agents can reach this server directly, such as "
        "its own address or a per-replica load-balancer port. Our agents that ask for it "
        "(server-endpoints.v1) are told it, with every other server's from their Leases, "
        "and connect to each server directly; with --enable-lease-controller it is also "
        "published on this server's Lease (konnectivity-fast.io/agent-endpoint). Empty: "
        "nothing advertised, as upstream.",
    ),
)


#: Server peering's (docs/high-availability.md, "Server peering"), among the proxy-server's
#: own; checked by ``cli.peering.check_peering``.
PEER_EXTENSION_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "enable-peer-forwarding",
        "enable_peer_forwarding",
        BOOL,
        "Forward a dial no agent of this server can take to a peer server that has one "
        "(one hop; the client gets 'No agent available' at once when no peer has one "
        "either), so agents connected to some servers only are reachable through all.",
    ),
    (
        "peer-port",
        "peer_port",
        INT,
        "Port of the peer listener, where peer servers forward dials (gRPC ProxyService "
        "over mTLS); 0 means no peer listener. Needs --enable-peer-forwarding.",
    ),
    (
        "peer-bind-address",
        "peer_bind_address",
        STRING,
        "Address the peer listener binds to; empty means all addresses.",
    ),
    (
        "peer-endpoints",
        "peer_endpoints",
        STRING,
        "Peer servers to forward dials to: <server-id>=<host:port> of their peer listeners, "
        "comma-separated (this server's own ID is skipped, so every server may get the "
        "same list).",
    ),
    (
        "peer-cert",
        "peer_cert",
        STRING,
        "Certificate this server presents to peers, on the peer listener and when dialling "
        "them; empty means --server-cert. It must be valid for both server and client "
        "authentication.",
    ),
    ("peer-key", "peer_key", STRING, "Key of --peer-cert; empty means --server-key."),
    (
        "peer-ca-cert",
        "peer_ca_cert",
        STRING,
        "CA a peer's certificate must chain to, both ways; empty means --server-ca-cert.",
    ),
)
#: ``--workers`` (docs/workers.md), checked by ``check_workers``.
WORKER_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "workers",
        "workers",
        INT,
        "Worker processes, each a proxy-server with its own server ID (<server-id>-<i>), "
        "sharing the frontend socket and the agent port, so agent handshakes and tunnel "
        "set-ups use that many cores. Agents are told a server count of --server-count "
        "times this and connect to every worker; the health and admin ports answer for "
        "all workers together. 1: one process, as upstream.",
    ),
)
SERVER_EXTENSION_FLAGS = SERVER_EXTENSION_FLAGS + PEER_EXTENSION_FLAGS + WORKER_FLAGS
#: ``--server-discovery`` values: where the agent learns each server's direct address.
DISCOVERY_SOURCES = ("headers", "leases", "service")

#: The proxy-agent's own: direct server endpoints (docs/high-availability.md).
AGENT_EXTENSION_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "proxy-server-list",
        "proxy_server_list",
        STRING,
        "Comma-separated host:port of each proxy-server replica, dialled directly (one "
        "connection per server ID) besides --proxy-server-host, which stays the way to "
        'servers not listed. Set --proxy-server-host to "" to use only direct endpoints. '
        "TLS still verifies the name --proxy-server-tls-name.",
    ),
    (
        "server-discovery",
        "server_discovery",
        STRING,
        "Comma-separated sources of direct server endpoints: headers (each of our servers "
        "lists every replica's --agent-advertise-address), leases (the annotation our "
        "servers put on their Leases; needs --count-server-leases), service (the ready "
        "EndpointSlices of --proxy-server-service). Empty: upstream's behaviour, only "
        "--proxy-server-host.",
    ),
    (
        "proxy-server-service",
        "proxy_server_service",
        STRING,
        "<namespace>/<name> of the Service in front of the proxy-servers, for "
        "--server-discovery=service (needs list and watch on endpointslices).",
    ),
    (
        "proxy-server-tls-name",
        "proxy_server_tls_name",
        STRING,
        "The name every proxy-server certificate is checked against, and the TLS server "
        "name sent, on every connection (default: --proxy-server-host), so direct dials to "
        "replica addresses verify the certificates the load balancer name already has.",
    ),
)


#: Node-to-control-plane tunneling, the agent's half (docs/node-to-control-plane.md):
#: the names of upstream's closed PR #176 and of the k0s fork, so their command lines parse.
NODE_TO_CP_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "apiserver-port-mapping",
        "apiserver_port_mappings",
        STRING_SLICE,
        "<local_port>:<host>:<port> (repeatable; an IPv6 host in brackets): listen on "
        "--bind-address local_port and carry each connection to host:port through a "
        "proxy-server that allows it (node-to-cp.v1, its --allowed-destination). Local "
        "ports 1024-49151. None: the agent listens on nothing, as upstream.",
    ),
    (
        "bind-address",
        "bind_address",
        STRING,
        "The address the --apiserver-port-mapping listeners bind to.",
    ),
    (
        "feature-gates",
        "feature_gates",
        STRING,
        "Kubernetes-style gates, Name=bool comma-separated; only NodeToMasterTraffic is "
        "known (k0s's manifests set it): NodeToMasterTraffic=false turns "
        "--apiserver-port-mapping off. Default: on whenever a mapping is given.",
    ),
    (
        "apiserver-port-mapping-dial-timeout",
        "apiserver_port_mapping_dial_timeout",
        DURATION,
        "How long a local connection waits for its server's answer (the server's dial "
        "of the destination) before it is reset.",
    ),
)

AGENT_EXTENSION_FLAGS = AGENT_EXTENSION_FLAGS + NODE_TO_CP_FLAGS


def check_node_to_cp(mappings: list[str], gates: str, dial_timeout: float) -> str | None:
    """The validation error for the node-to-control-plane flags, or None."""
    try:
        parse_mappings(mappings)
    except ValueError as exc:
        return f"--apiserver-port-mapping: {exc}"
    try:
        node_to_master_gate(gates)
    except ValueError as exc:
        return f"--feature-gates: {exc}"
    if dial_timeout <= 0:
        return "--apiserver-port-mapping-dial-timeout must be greater than 0"
    return None


def node_to_cp_active(mappings: list[str], gates: str) -> bool:
    """The agent listens and offers ``node-to-cp.v1``: a mapping is given and the gate is
    not explicitly false (the options were validated)."""
    return bool(mappings) and node_to_master_gate(gates) is not False


def check_discovery(sources: str, service: str, count_leases: bool) -> str | None:
    """The validation error for ``--server-discovery`` and ``--proxy-server-service``."""
    names = [name.strip() for name in sources.split(",") if name.strip()]
    for name in names:
        if name not in DISCOVERY_SOURCES:
            return (
                f"--server-discovery must list some of {', '.join(DISCOVERY_SOURCES)}, got {name!r}"
            )
    if "leases" in names and not count_leases:
        return "--server-discovery=leases needs --count-server-leases"
    if ("service" in names) != bool(service):
        return "--server-discovery=service and --proxy-server-service go together"
    if service and (service.count("/") != 1 or "" in service.split("/")):
        return f"--proxy-server-service must be <namespace>/<name>, got {service!r}"
    return None


def check_advertise_address(value: str) -> str | None:
    """The validation error for ``--agent-advertise-address``, or None."""
    if not value:
        return None
    try:
        parse_address(value)
    except ValueError as exc:
        return f"--agent-advertise-address: {exc}"
    return None


class WorkerOptions(Protocol):
    """The option fields ``--workers`` is checked with."""

    workers: int
    agent_advertise_address: str
    enable_peer_forwarding: bool


def check_workers(options: WorkerOptions) -> str | None:
    """The validation error for ``--workers``, or None. Workers share one agent port, so
    none of them has an address of its own to advertise, nor a peer port of its own."""
    # Here, not at the top: the agent's command line imports this module too.
    from konnectivity_fast.server.workers import MAX_WORKERS

    if not 1 <= options.workers <= MAX_WORKERS:
        return f"--workers must be between 1 and {MAX_WORKERS}, got {options.workers}"
    if options.workers == 1:
        return None
    if options.agent_advertise_address:
        return "--agent-advertise-address cannot be used with --workers above 1"
    if options.enable_peer_forwarding:
        return "--enable-peer-forwarding cannot be used with --workers above 1"
    return None


def check_dial_balance(value: str) -> str | None:
    """The validation error for ``--dial-balance``, or None."""
    if value in DialBalance._value2member_map_:
        return None
    return f"--dial-balance must be one of {', '.join(DialBalance)}, got {value!r}"


class ExtensionOptions(Protocol):
    """The option fields of the extension flags (both programs' options have them)."""

    enable_tunnel_flow_control: bool


class ServerExtensionOptions(ExtensionOptions, Protocol):
    """The proxy-server's own extension option fields."""

    agent_advertise_address: str


def add_extension_flags(
    fs: FlagSet,
    defaults: object,
    flags: tuple[tuple[str, str, ValueType, str], ...] = EXTENSION_FLAGS,
) -> None:
    for name, dest, kind, text in flags:
        fs.add(
            name, kind, getattr(defaults, dest), EXTENSION_MARK + text, dest=dest, extension=True
        )


def offered_extensions(options: ExtensionOptions) -> ExtensionSet:
    """What a program offers its peers, from its flags."""
    offered: set[str] = set()
    if options.enable_tunnel_flow_control:
        offered.add(Extension.FLOW)
    return frozenset(offered) if offered else NO_EXTENSIONS


def offered_server_extensions(options: ServerExtensionOptions) -> ExtensionSet:
    """What the proxy-server offers agents and frontends, from its flags: the common ones,
    and ``server-endpoints.v1`` when it has an address to advertise."""
    offered = offered_extensions(options)
    if options.agent_advertise_address:
        offered |= {Extension.SERVER_ENDPOINTS}
    return offered
