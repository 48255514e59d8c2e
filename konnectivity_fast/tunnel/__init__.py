"""The proxy-server's routing state, sans-IO (ARCHITECTURE.md, "Layers").

``backends``: agent streams, agent identifiers and the ``--proxy-strategies`` chain.
``connections``: the frontend, pending-dial and connection records.
``router``: the packet rules (``Router``). ``events``: the effects it returns.
No sockets, no event loop, no clock: time is an argument, randomness is injected.
"""

from __future__ import annotations

from konnectivity_fast.tunnel.backends import (
    AgentIdentifiers,
    AgentMetadataError,
    Backend,
    BackendManager,
    BackendManagers,
    DefaultBackendManager,
    DefaultRouteBackendManager,
    DestHostBackendManager,
    ProxyStrategy,
    agent_from_metadata,
    parse_agent_identifiers,
    remove_port_from_host,
)
from konnectivity_fast.tunnel.connections import (
    Frontend,
    FrontendMode,
    PendingDial,
    ProxyClientConnection,
)
from konnectivity_fast.tunnel.events import (
    CloseFrontend,
    CloseReason,
    ConnectionDuration,
    DialDuration,
    DialFailure,
    DialFailureReason,
    Effect,
    Message,
    RawMessage,
    RetireBackend,
    SendToAgent,
    SendToFrontend,
    TunnelEstablished,
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
    "AgentMetadataError",
    "Backend",
    "BackendManager",
    "BackendManagers",
    "CloseFrontend",
    "CloseReason",
    "ConnectionDuration",
    "DefaultBackendManager",
    "DefaultRouteBackendManager",
    "DestHostBackendManager",
    "DialDuration",
    "DialFailure",
    "DialFailureReason",
    "Effect",
    "Frontend",
    "FrontendMode",
    "Message",
    "PendingDial",
    "ProxyClientConnection",
    "ProxyStrategy",
    "RawMessage",
    "RetireBackend",
    "Router",
    "SendToAgent",
    "SendToFrontend",
    "TunnelEstablished",
    "agent_from_metadata",
    "parse_agent_identifiers",
    "remove_port_from_host",
]
