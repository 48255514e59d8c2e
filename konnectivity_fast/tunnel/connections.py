"""The records the router keeps: frontends, pending dials and established connections.

Plain slotted objects, hashable by identity, that the router (``tunnel.router``) links
together; adapters hold ``Frontend`` and ``Backend`` (``tunnel.backends``) handles and read
the attributes their docstrings name. Upstream keeps one ``ProxyClientConnection`` per dial,
first in its pending-dial map, then among established connections; we keep a
``PendingDial`` and then a ``ProxyClientConnection``, and per-stream state on ``Frontend``
(upstream keeps it in the frontend processor's local variables).
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from konnectivity_fast.tunnel.backends import Backend

__all__ = ["Frontend", "FrontendMode", "PendingDial", "ProxyClientConnection"]


class FrontendMode(Enum):
    """The frontend protocol (``--mode``)."""

    GRPC = "grpc"
    HTTP_CONNECT = "http-connect"


class Frontend:
    """A gRPC ``Proxy`` stream or an HTTP-CONNECT tunnel, made by ``Router.add_frontend``.

    The adapter reads ``id``, ``mode``, ``conn`` (its own object) and, for HTTP-CONNECT,
    ``connect_id`` and ``backend`` once established. The rest is the router's: ``backend``
    (chosen by the latest DIAL_REQ), ``connect_id`` (the stream's one DATA connectID),
    ``stopped`` (later packets are dropped, as upstream's processor stops), ``closed``,
    ``dials`` (by random) and ``connections`` (an insertion-ordered set). Hashable by
    identity.
    """

    __slots__ = (
        "backend",
        "closed",
        "conn",
        "connect_id",
        "connections",
        "dials",
        "id",
        "mode",
        "stopped",
    )

    def __init__(self, frontend_id: int, mode: FrontendMode, conn: Any = None) -> None:
        self.id = frontend_id
        self.mode = mode
        self.conn: Any = conn
        self.backend: Backend | None = None
        self.connect_id = 0
        self.stopped = False
        self.closed = False
        self.dials: dict[int, PendingDial] = {}
        self.connections: dict[ProxyClientConnection, None] = {}

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
    """An established connection: ``connect_id`` on ``backend``, serving ``frontend``."""

    __slots__ = ("backend", "connect_id", "frontend", "random", "start")

    def __init__(self, dial: PendingDial, connect_id: int) -> None:
        self.connect_id = connect_id
        self.random = dial.random
        self.frontend = dial.frontend
        self.backend = dial.backend
        self.start = dial.start

    def __repr__(self) -> str:
        return f"<ProxyClientConnection {self.connect_id} {self.frontend!r} <-> {self.backend!r}>"
