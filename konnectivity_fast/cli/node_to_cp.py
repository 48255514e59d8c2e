"""The proxy-server's flags of node-to-control-plane tunneling (node-to-cp.v1;
docs/node-to-control-plane.md, "The server").

``NODE_TO_CP_SERVER_FLAGS`` are among the proxy-server's extension flags (marked as
``cli.extensions``); ``check_node_to_cp`` runs after upstream's checks and returns the
first problem as one line (a start-up error, exit 1), or None; ``node_to_cp_config`` is
what ``server.proxy.ProxyServer`` is given: None unless ``--allowed-destination`` lists
at least one destination.

Invariant: with no ``--allowed-destination``, the server behaves exactly as upstream's: it
offers no ``node-to-cp.v1``, registers no metric of it, and ignores an agent's DIAL_REQ.
"""

from __future__ import annotations

from typing import Protocol

from konnectivity_fast.cli.flags import DURATION, INT, STRING_SLICE, ValueType
from konnectivity_fast.server.reverse import (
    AGENT_INITIATED_DIAL_TIMEOUT,
    MAX_AGENT_INITIATED_CONNECTIONS,
    NodeToCpConfig,
)
from konnectivity_fast.tunnel.allowlist import parse_allowed_destinations

__all__ = ["NODE_TO_CP_SERVER_FLAGS", "NodeToCpOptions", "check_node_to_cp", "node_to_cp_config"]

#: (flag, option field, type, help) of the proxy-server's node-to-cp.v1 flags.
NODE_TO_CP_SERVER_FLAGS: tuple[tuple[str, str, ValueType, str], ...] = (
    (
        "allowed-destination",
        "allowed_destination",
        STRING_SLICE,
        "Destinations our agents may ask this server to dial for node-to-control-plane "
        "tunneling (node-to-cp.v1), repeatable or comma-separated: an exact host:port "
        "([ipv6]:port; a host name is resolved by this server when it dials, e.g. "
        "localhost:6443), or an IP prefix with a port, a.b.c.d/len:port or [ipv6/len]:port, "
        "which matches IP addresses only. No wildcards. Empty: the feature is off, as "
        "upstream.",
    ),
    (
        "agent-initiated-dial-timeout",
        "agent_initiated_dial_timeout",
        DURATION,
        "How long a dial an agent asked for (name lookup and connect) may take before the "
        "agent is answered with an i/o timeout error. Needs --allowed-destination.",
    ),
    (
        "max-agent-initiated-connections-per-agent",
        "max_agent_initiated_connections_per_agent",
        INT,
        "Open and pending agent-initiated connections one agent stream may have; beyond it "
        "the agent's dial is refused. Needs --allowed-destination.",
    ),
)

DEFAULT_DIAL_TIMEOUT = AGENT_INITIATED_DIAL_TIMEOUT
DEFAULT_MAX_PER_AGENT = MAX_AGENT_INITIATED_CONNECTIONS


class NodeToCpOptions(Protocol):
    """The option fields of ``NODE_TO_CP_SERVER_FLAGS``."""

    allowed_destination: list[str]
    agent_initiated_dial_timeout: float
    max_agent_initiated_connections_per_agent: int


def check_node_to_cp(options: NodeToCpOptions) -> str | None:
    """The first problem with the node-to-cp.v1 flags, or None."""
    try:
        parse_allowed_destinations(options.allowed_destination)
    except ValueError as exc:
        return str(exc)
    if options.agent_initiated_dial_timeout <= 0:
        return "--agent-initiated-dial-timeout must be greater than 0"
    if options.max_agent_initiated_connections_per_agent < 1:
        return "--max-agent-initiated-connections-per-agent must be at least 1"
    return None


def node_to_cp_config(options: NodeToCpOptions) -> NodeToCpConfig | None:
    """What ``ProxyServer`` gets (checked options); None when the feature is off."""
    allowed = parse_allowed_destinations(options.allowed_destination)
    if not allowed:
        return None
    return NodeToCpConfig(
        allowed,
        options.agent_initiated_dial_timeout,
        options.max_agent_initiated_connections_per_agent,
    )
