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

from konnectivity_fast.cli.flags import BOOL, INT, STRING, FlagSet, ValueType
from konnectivity_fast.wire.contract import NO_EXTENSIONS, DialBalance, Extension, ExtensionSet

__all__ = [
    "EXTENSION_FLAGS",
    "EXTENSION_MARK",
    "PEER_EXTENSION_FLAGS",
    "SERVER_EXTENSION_FLAGS",
    "ExtensionOptions",
    "add_extension_flags",
    "check_dial_balance",
    "offered_extensions",
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
SERVER_EXTENSION_FLAGS = SERVER_EXTENSION_FLAGS + PEER_EXTENSION_FLAGS


def check_dial_balance(value: str) -> str | None:
    """The validation error for ``--dial-balance``, or None."""
    if value in DialBalance._value2member_map_:
        return None
    return f"--dial-balance must be one of {', '.join(DialBalance)}, got {value!r}"


class ExtensionOptions(Protocol):
    """The option fields of the extension flags (both programs' options have them)."""

    enable_tunnel_flow_control: bool


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
