"""The proxy-server's routing state, sans-IO (docs/architecture.md, "The layers").

``records``: the agent-stream, frontend, pending-dial and connection records.
``backends``: the ``--proxy-strategies`` chain that picks an agent stream; ``balance``: the
opt-in least-loaded choice among a strategy's candidates (ours).
``router``: the packet rules (``Router``). ``events``: the effects it returns.
``peering``: ``PeeringRouter``, which hands dials no agent here takes to peer servers.
No sockets, no event loop, no clock: time is an argument, randomness is injected.
The names the router shares with the wire (strategies, modes, agent identifiers) are
``wire.contract``'s; the types among them are re-exported here for the router's callers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from konnectivity_fast._lazy import lazy_exports

if TYPE_CHECKING:
    from konnectivity_fast.tunnel.backends import (
        BackendManager,
        BackendManagers,
        DefaultBackendManager,
        DefaultRouteBackendManager,
        DestHostBackendManager,
        remove_port_from_host,
    )
    from konnectivity_fast.tunnel.balance import least_loaded, open_tunnels
    from konnectivity_fast.tunnel.events import (
        CloseFrontend,
        CloseReason,
        ConnectionDuration,
        DialDuration,
        DialFailure,
        DialFailureReason,
        Effect,
        EndPeer,
        ForwardDial,
        Message,
        RawMessage,
        RetireBackend,
        SendToAgent,
        SendToFrontend,
        TunnelEstablished,
    )
    from konnectivity_fast.tunnel.peering import PeerBackend, PeeringRouter
    from konnectivity_fast.tunnel.records import (
        Backend,
        Frontend,
        PendingDial,
        ProxyClientConnection,
    )
    from konnectivity_fast.tunnel.replies import (
        ERR_BACKEND_GONE,
        ERR_BACKEND_NOT_INITIALIZED,
        ERR_BACKEND_UNINITIALIZED,
        ERR_CLOSE_REQ_FAILED,
        ERR_DIAL_TIMEOUT,
        ERR_DUPLICATE_DIAL,
        ERR_FOREIGN_CONNECT_ID,
        ERR_MISMATCHED_IDS,
        ERR_NO_AGENT,
        ERR_TOO_MANY_DIALS,
    )
    from konnectivity_fast.tunnel.router import (
        MAX_CLOSING_PER_BACKEND,
        MAX_CONNECTIONS_PER_FRONTEND,
        Router,
    )
    from konnectivity_fast.wire.contract import (
        AgentIdentifiers,
        DialBalance,
        FrontendMode,
        ProxyStrategy,
    )

# Loaded on first use (_lazy.py): the agent imports tunnel.flow and tunnel.listing only.
_EXPORTS = {
    "konnectivity_fast.tunnel.backends": (
        "BackendManager",
        "BackendManagers",
        "DefaultBackendManager",
        "DefaultRouteBackendManager",
        "DestHostBackendManager",
        "remove_port_from_host",
    ),
    "konnectivity_fast.tunnel.balance": ("least_loaded", "open_tunnels"),
    "konnectivity_fast.tunnel.events": (
        "CloseFrontend",
        "CloseReason",
        "ConnectionDuration",
        "DialDuration",
        "DialFailure",
        "DialFailureReason",
        "Effect",
        "EndPeer",
        "ForwardDial",
        "Message",
        "RawMessage",
        "RetireBackend",
        "SendToAgent",
        "SendToFrontend",
        "TunnelEstablished",
    ),
    "konnectivity_fast.tunnel.peering": ("PeerBackend", "PeeringRouter"),
    "konnectivity_fast.tunnel.records": (
        "Backend",
        "Frontend",
        "PendingDial",
        "ProxyClientConnection",
    ),
    "konnectivity_fast.tunnel.replies": (
        "ERR_BACKEND_GONE",
        "ERR_BACKEND_NOT_INITIALIZED",
        "ERR_BACKEND_UNINITIALIZED",
        "ERR_CLOSE_REQ_FAILED",
        "ERR_DIAL_TIMEOUT",
        "ERR_DUPLICATE_DIAL",
        "ERR_FOREIGN_CONNECT_ID",
        "ERR_MISMATCHED_IDS",
        "ERR_NO_AGENT",
        "ERR_TOO_MANY_DIALS",
    ),
    "konnectivity_fast.tunnel.router": (
        "MAX_CLOSING_PER_BACKEND",
        "MAX_CONNECTIONS_PER_FRONTEND",
        "Router",
    ),
    "konnectivity_fast.wire.contract": (
        "AgentIdentifiers",
        "DialBalance",
        "FrontendMode",
        "ProxyStrategy",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ERR_BACKEND_GONE",
    "ERR_BACKEND_NOT_INITIALIZED",
    "ERR_BACKEND_UNINITIALIZED",
    "ERR_CLOSE_REQ_FAILED",
    "ERR_DIAL_TIMEOUT",
    "ERR_DUPLICATE_DIAL",
    "ERR_FOREIGN_CONNECT_ID",
    "ERR_MISMATCHED_IDS",
    "ERR_NO_AGENT",
    "ERR_TOO_MANY_DIALS",
    "MAX_CLOSING_PER_BACKEND",
    "MAX_CONNECTIONS_PER_FRONTEND",
    "AgentIdentifiers",
    "Backend",
    "BackendManager",
    "BackendManagers",
    "CloseFrontend",
    "CloseReason",
    "ConnectionDuration",
    "DefaultBackendManager",
    "DefaultRouteBackendManager",
    "DestHostBackendManager",
    "DialBalance",
    "DialDuration",
    "DialFailure",
    "DialFailureReason",
    "Effect",
    "EndPeer",
    "ForwardDial",
    "Frontend",
    "FrontendMode",
    "Message",
    "PeerBackend",
    "PeeringRouter",
    "PendingDial",
    "ProxyClientConnection",
    "ProxyStrategy",
    "RawMessage",
    "RetireBackend",
    "Router",
    "SendToAgent",
    "SendToFrontend",
    "TunnelEstablished",
    "least_loaded",
    "open_tunnels",
    "remove_port_from_host",
]
