"""The records the router keeps: agent streams, frontends, pending dials and established
connections.

Plain slotted objects, hashable by identity, that the router (``tunnel.router``) links
together; adapters hold ``Backend`` and ``Frontend`` handles and read the attributes their
docstrings name. Upstream keeps one ``ProxyClientConnection`` per dial, first in its
pending-dial map, then among established connections; we keep a ``PendingDial`` and then
a ``ProxyClientConnection``, and per-stream state on ``Frontend`` (upstream keeps it in the
frontend processor's local variables). Upstream's ``Backend`` lives with its backend
managers (pkg/server/backend_manager.go); here it sits with the other records, so that the
strategies (``tunnel.backends``) import the records and nothing imports back.

Invariant: this module imports nothing else from tunnel/.
"""

from __future__ import annotations

from typing import Any

from konnectivity_fast.wire.contract import (
    NO_EXTENSIONS,
    AgentIdentifiers,
    ExtensionSet,
    FrontendMode,
)

__all__ = ["Backend", "Frontend", "PendingDial", "ProxyClientConnection"]


class Backend:
    """One agent ``Connect`` stream: upstream's ``Backend``. Several streams may share an
    agentID (a reconnect before the old stream ends); each is its own Backend.

    The adapter reads ``id``, ``agent_id``, ``identifiers``, ``extensions`` (negotiated on
    this stream, ``wire.contract``), ``draining`` and ``conn`` (its own object: the stream
    to write to). Everything else belongs to the router: ``dials`` (pending dials sent to
    this stream, by random), ``connections`` (established connections, by connectID:
    connectIDs are counted per agent stream), ``closing`` (connectIDs whose frontend left,
    awaiting the agent's CLOSE_RSP), ``retired`` and ``closed``.
    Hashable by identity.
    """

    __slots__ = (
        "agent_id",
        "closed",
        "closing",
        "conn",
        "connections",
        "dials",
        "draining",
        "extensions",
        "id",
        "identifiers",
        "retired",
    )

    def __init__(
        self,
        backend_id: int,
        agent_id: str,
        identifiers: AgentIdentifiers,
        conn: Any = None,
        extensions: ExtensionSet = NO_EXTENSIONS,
    ) -> None:
        self.id = backend_id
        self.agent_id = agent_id
        self.identifiers = identifiers
        self.conn: Any = conn
        self.extensions = extensions
        self.draining = False
        self.retired = False  # told to go (RetireBackend); no longer chosen
        self.closed = False
        self.dials: dict[int, PendingDial] = {}
        self.connections: dict[int, ProxyClientConnection] = {}
        # connectID -> dial start time when the connection duration is still to be observed
        # at the agent's CLOSE_RSP (HTTP-CONNECT tunnels), else None.
        self.closing: dict[int, float | None] = {}

    def __repr__(self) -> str:
        state = " closed" if self.closed else " draining" if self.draining else ""
        return f"<Backend {self.id} agent={self.agent_id!r}{state}>"


class Frontend:
    """A gRPC ``Proxy`` stream or an HTTP-CONNECT tunnel, made by ``Router.add_frontend``.

    The adapter reads ``id``, ``mode``, ``conn`` (its own object), ``extensions``
    (negotiated on a gRPC stream; none for HTTP-CONNECT) and, for HTTP-CONNECT,
    ``connect_id`` and ``backend`` once established. The rest is the router's: ``backend``
    (chosen by the latest DIAL_REQ), ``connect_id`` (the stream's one DATA connectID),
    ``stopped`` (later packets are dropped, as upstream's processor stops), ``closed``,
    ``dials`` (by random) and ``connections`` (an insertion-ordered set). Hashable by
    identity.

    ``bytes_up`` (toward the agent) and ``bytes_down`` (toward the frontend) are the
    adapter's counters of the DATA it relayed for the admin listing, one integer add per
    DATA: payload bytes for HTTP-CONNECT, whole DATA messages for gRPC (the payload plus a
    few bytes of protobuf framing each: the fast path never decodes them). A gRPC stream
    carries one tunnel in practice (konnectivity-client's), so these are its tunnel's.

    ``forwarded``: a stream another proxy-server forwarded to us (server peering,
    ``tunnel.peering``); its dials are never forwarded again.
    """

    __slots__ = (
        "backend",
        "bytes_down",
        "bytes_up",
        "closed",
        "conn",
        "connect_id",
        "connections",
        "dials",
        "extensions",
        "forwarded",
        "id",
        "mode",
        "stopped",
    )

    def __init__(
        self,
        frontend_id: int,
        mode: FrontendMode,
        conn: Any = None,
        extensions: ExtensionSet = NO_EXTENSIONS,
        forwarded: bool = False,
    ) -> None:
        self.id = frontend_id
        self.mode = mode
        self.conn: Any = conn
        self.extensions = extensions
        self.forwarded = forwarded
        self.backend: Backend | None = None
        self.connect_id = 0
        self.stopped = False
        self.closed = False
        self.dials: dict[int, PendingDial] = {}
        self.connections: dict[ProxyClientConnection, None] = {}
        self.bytes_up = 0
        self.bytes_down = 0

    def __repr__(self) -> str:
        state = " closed" if self.closed else " stopped" if self.stopped else ""
        return f"<Frontend {self.id} {self.mode.value}{state}>"


class PendingDial:
    """A DIAL_REQ sent to ``backend``, waiting for its DIAL_RSP (a pending
    ``ProxyClientConnection`` upstream)."""

    __slots__ = ("address", "backend", "frontend", "random", "start")

    def __init__(
        self, random: int, frontend: Frontend, backend: Backend, address: str, start: float
    ) -> None:
        self.random = random
        self.frontend = frontend
        self.backend = backend
        self.address = address
        self.start = start

    def __repr__(self) -> str:
        return f"<PendingDial {self.random} {self.frontend!r} -> {self.backend!r}>"


class ProxyClientConnection:
    """An established connection: ``connect_id`` on ``backend``, serving ``frontend``, to
    the dial's ``address``, dialled at ``start``."""

    __slots__ = ("address", "backend", "connect_id", "frontend", "random", "start")

    def __init__(self, dial: PendingDial, connect_id: int) -> None:
        self.connect_id = connect_id
        self.random = dial.random
        self.frontend = dial.frontend
        self.backend = dial.backend
        self.address = dial.address
        self.start = dial.start

    def __repr__(self) -> str:
        return f"<ProxyClientConnection {self.connect_id} {self.frontend!r} <-> {self.backend!r}>"
