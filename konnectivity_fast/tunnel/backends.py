"""Agent streams ("backends") and the proxy strategies that pick one for a dial.

The concepts are upstream's (``pkg/server/backend_manager.go``,
``desthost_backend_manager.go``, ``default_route_backend_manager.go``,
``readiness_manager.go``, the ``proxystrategies`` package and the agent identifiers of
``proto/header``), described in reference/upstream-server.md §4.3-§4.6:

- A ``Backend`` is one agent ``Connect`` stream. Several streams may share an agentID
  (a reconnect before the old stream ends); each is its own Backend.
- A ``BackendManager`` stores backends under *keys* (agentIDs, or host identifiers for
  ``destHost``), each key holding a list of streams in arrival order, and picks one for a
  dial address. ``BackendManagers`` is the ordered ``--proxy-strategies`` chain: the first
  manager that finds a backend wins.
- DRAIN marks a stream (never an agent) as draining, for good. Selection avoids draining
  streams when a non-draining candidate exists, and falls back to a draining one otherwise.
- The server is ready iff the *first* manager of the chain holds at least one key.

Invariants:
- In every manager, a key is present iff its list is non-empty, a backend appears at most
  once per list, and the key list used for the random scan holds exactly the map's keys.
- Only the caller's ``random.Random`` draws random numbers: selection is reproducible.
- Nothing here does I/O or reads a clock; ``Backend.conn`` is the adapter's own object,
  never touched here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from random import Random
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from konnectivity_fast.tunnel.connections import PendingDial, ProxyClientConnection

__all__ = [
    "AgentIdentifiers",
    "AgentMetadataError",
    "Backend",
    "BackendManager",
    "BackendManagers",
    "DefaultBackendManager",
    "DefaultRouteBackendManager",
    "DestHostBackendManager",
    "ProxyStrategy",
    "agent_from_metadata",
    "parse_agent_identifiers",
    "remove_port_from_host",
]


class ProxyStrategy(StrEnum):
    """The ``--proxy-strategies`` values (case-sensitive)."""

    DEFAULT = "default"
    DEST_HOST = "destHost"
    DEFAULT_ROUTE = "defaultRoute"


# --- agent identifiers (the ``agentidentifiers`` metadata value) -------------------------


class AgentMetadataError(ValueError):
    """An agent's ``agentid``/``agentidentifiers`` metadata is unusable. ``str()`` is
    upstream's exact error text (returned to the agent as status UNKNOWN)."""


@dataclass(frozen=True, slots=True)
class AgentIdentifiers:
    """What an agent says it can reach (§4.3). ``cidr`` is parsed but no strategy uses it."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    cidr: tuple[str, ...] = ()
    default_route: bool = False


# Go's strconv.ParseBool spellings of true (its false spellings, and anything else, are
# simply "not true" here, as upstream ignores the parse error).
_GO_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})
_HEX = frozenset(b"0123456789abcdefABCDEF")
_GO_QUOTE_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _go_quote(raw: bytes) -> str:
    """``strconv.Quote`` of a Go string holding ``raw``: enough of Go's rules for the short
    escape fragments that appear in ``invalid URL escape`` errors."""
    out = ['"']
    for char in raw.decode("utf-8", "surrogateescape"):
        code = ord(char)
        if char in _GO_QUOTE_ESCAPES:
            out.append(_GO_QUOTE_ESCAPES[char])
        elif 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _query_unescape(text: str) -> str:
    """Go's ``url.QueryUnescape``: ``%XX`` escapes and ``+`` as space; a bad escape raises
    ``ValueError`` with Go's message."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"%" not in raw and b"+" not in raw:
        return text
    out = bytearray()
    i = 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x25:  # '%'
            if i + 2 >= len(raw) or raw[i + 1] not in _HEX or raw[i + 2] not in _HEX:
                raise ValueError(f"invalid URL escape {_go_quote(raw[i : i + 3])}")
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        out.append(0x20 if byte == 0x2B else byte)  # '+' is a space in a query
        i += 1
    return out.decode("utf-8", "surrogateescape")


def _parse_query(query: str) -> tuple[dict[str, list[str]], str | None]:
    """Go's ``url.ParseQuery``: the values parsed, and the error it would return. Like Go,
    it carries on after an error; a semicolon error replaces any earlier error, an escape
    error is kept only if it is the first."""
    values: dict[str, list[str]] = {}
    error: str | None = None
    for item in query.split("&"):
        if ";" in item:
            error = "invalid semicolon separator in query"
            continue
        if not item:
            continue
        key, _, value = item.partition("=")
        try:
            key, value = _query_unescape(key), _query_unescape(value)
        except ValueError as exc:
            error = error or str(exc)
            continue
        values.setdefault(key, []).append(value)
    return values, error


def parse_agent_identifiers(value: str) -> AgentIdentifiers:
    """The ``agentidentifiers`` metadata value (URL query encoding, §4.3). Unknown keys
    (``uid`` included) are ignored; repeated known keys accumulate. Raises
    ``AgentMetadataError`` with upstream's message when the query does not parse."""
    values, error = _parse_query(value)
    if error is not None:
        raise AgentMetadataError(f"fail to parse url encoded string: {error}")
    default_route = values.get("default-route", [""])[0] in _GO_TRUE
    return AgentIdentifiers(
        ipv4=tuple(values.get("ipv4", ())),
        ipv6=tuple(values.get("ipv6", ())),
        host=tuple(values.get("host", ())),
        cidr=tuple(values.get("cidr", ())),
        default_route=default_route,
    )


def _go_slice(values: Sequence[str]) -> str:
    """``fmt`` ``%v`` of a Go ``[]string``."""
    return "[" + " ".join(values) + "]"


def agent_from_metadata(
    agent_ids: Sequence[str], identifiers: Sequence[str]
) -> tuple[str, AgentIdentifiers]:
    """Validate a ``Connect`` call's ``agentid`` values (exactly one, possibly empty) and
    ``agentidentifiers`` values (at most one), in upstream's order (§1.3). Raises
    ``AgentMetadataError`` with upstream's message."""
    if len(agent_ids) != 1:
        raise AgentMetadataError(
            f"expected one agent ID in the context, got {_go_slice(agent_ids)}"
        )
    if len(identifiers) > 1:
        raise AgentMetadataError(
            "expected at most one set of agent identifiers in the context, got "
            + _go_slice(identifiers)
        )
    parsed = parse_agent_identifiers(identifiers[0]) if identifiers else AgentIdentifiers()
    return agent_ids[0], parsed


# --- backends ---------------------------------------------------------------------------


class Backend:
    """One agent ``Connect`` stream: upstream's ``Backend``.

    The adapter reads ``id``, ``agent_id``, ``identifiers``, ``draining`` and ``conn`` (its
    own object: the stream to write to). Everything else belongs to the router:
    ``dials`` (pending dials sent to this stream, by random), ``connections`` (established
    connections, by connectID: connectIDs are counted per agent stream), ``closing``
    (connectIDs whose frontend left, awaiting the agent's CLOSE_RSP), ``retired`` and
    ``closed``.
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
        "id",
        "identifiers",
        "retired",
    )

    def __init__(
        self, backend_id: int, agent_id: str, identifiers: AgentIdentifiers, conn: Any = None
    ) -> None:
        self.id = backend_id
        self.agent_id = agent_id
        self.identifiers = identifiers
        self.conn: Any = conn
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


def remove_port_from_host(address: str) -> str:
    """The host part of a dial address, the way upstream strips it (§4.4): ``h:p`` gives
    ``h``; with two or more colons (IPv6) a bracketed form loses its last ``:``-suffix and
    its brackets, a bare one only its brackets. So ``[fe80::1]`` (no port) is mangled to
    ``fe80:``, as upstream does."""
    if address.count(":") < 2:
        return address.partition(":")[0]
    if "[" in address:
        address = address[: address.rindex(":")]
    return address.strip("[]")


class _BackendStorage:
    """Keys to lists of backends, plus the key list the random scan walks (upstream's
    ``DefaultBackendStorage``)."""

    __slots__ = ("_backends", "_keys", "_position")

    def __init__(self) -> None:
        self._backends: dict[str, list[Backend]] = {}
        self._keys: list[str] = []
        self._position: dict[str, int] = {}  # key -> its index in _keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: str, backend: Backend) -> bool:
        """Store ``backend`` under ``key``; True when the key is new."""
        streams = self._backends.get(key)
        if streams is not None:
            if backend not in streams:
                streams.append(backend)
            return False
        self._backends[key] = [backend]
        self._position[key] = len(self._keys)
        self._keys.append(key)
        return True

    def remove(self, key: str, backend: Backend) -> bool:
        """Drop ``backend`` from ``key``; True when it was there."""
        streams = self._backends.get(key)
        if streams is None or backend not in streams:
            return False
        streams.remove(backend)
        if not streams:
            del self._backends[key]
            index = self._position.pop(key)
            last = self._keys.pop()
            if last != key:  # swap the last key into the hole
                self._keys[index] = last
                self._position[last] = index
        return True

    def first_available(self, key: str) -> Backend | None:
        """The first non-draining stream under ``key``, else its first stream."""
        streams = self._backends.get(key)
        if not streams:
            return None
        for backend in streams:
            if not backend.draining:
                return backend
        return streams[0]

    def random_pick(self, rng: Random) -> Backend | None:
        """Scan keys circularly from a random start, looking only at each key's first
        stream; the first non-draining one wins, else the first draining one seen."""
        count = len(self._keys)
        if count == 0:
            return None
        start = rng.randrange(count)
        fallback: Backend | None = None
        for offset in range(count):
            backend = self._backends[self._keys[(start + offset) % count]][0]
            if not backend.draining:
                return backend
            if fallback is None:
                fallback = backend
        return fallback


class BackendManager(ABC):
    """One proxy strategy: which keys a backend is stored under, and how a backend is
    chosen for a dial address."""

    strategy: ClassVar[ProxyStrategy]

    def __init__(self, rng: Random) -> None:
        self._rng = rng
        self._storage = _BackendStorage()

    @abstractmethod
    def keys_of(self, backend: Backend) -> Iterable[str]:
        """The keys ``backend`` is stored under (possibly none)."""

    @abstractmethod
    def backend(self, address: str) -> Backend | None:
        """A backend for a dial to ``address`` ("host:port"), or None."""

    def add_backend(self, backend: Backend) -> bool:
        """Store ``backend``; True when a key appeared."""
        added = [self._storage.add(key, backend) for key in self.keys_of(backend)]
        return any(added)

    def remove_backend(self, backend: Backend) -> bool:
        """Forget ``backend``; True when it was stored under some key."""
        removed = [self._storage.remove(key, backend) for key in self.keys_of(backend)]
        return any(removed)

    def num_backends(self) -> int:
        """The number of keys (the ``ready_backends`` gauge of this strategy)."""
        return len(self._storage)


class DefaultBackendManager(BackendManager):
    """``default``: every stream, keyed by agentID; a random agent, non-draining first."""

    strategy = ProxyStrategy.DEFAULT

    def keys_of(self, backend: Backend) -> Iterable[str]:
        return (backend.agent_id,)

    def backend(self, address: str) -> Backend | None:
        return self._storage.random_pick(self._rng)


class DestHostBackendManager(BackendManager):
    """``destHost``: streams keyed by each ipv4, ipv6 and host identifier; the dial's host
    (port stripped) must match one exactly, case-sensitively."""

    strategy = ProxyStrategy.DEST_HOST

    def keys_of(self, backend: Backend) -> Iterable[str]:
        idents = backend.identifiers
        return (*idents.ipv4, *idents.ipv6, *idents.host)

    def backend(self, address: str) -> Backend | None:
        host = remove_port_from_host(address)
        return self._storage.first_available(host) if host else None


class DefaultRouteBackendManager(BackendManager):
    """``defaultRoute``: like ``default``, among agents that sent ``default-route=true``."""

    strategy = ProxyStrategy.DEFAULT_ROUTE

    def keys_of(self, backend: Backend) -> Iterable[str]:
        return (backend.agent_id,) if backend.identifiers.default_route else ()

    def backend(self, address: str) -> Backend | None:
        return self._storage.random_pick(self._rng)


MANAGER_CLASSES: dict[ProxyStrategy, type[BackendManager]] = {
    cls.strategy: cls
    for cls in (DefaultBackendManager, DestHostBackendManager, DefaultRouteBackendManager)
}


class BackendManagers:
    """The ordered ``--proxy-strategies`` chain. ``strategies`` must already be validated
    (see ``cli.server_options.parse_proxy_strategies``); duplicates are allowed."""

    def __init__(self, strategies: Sequence[str], rng: Random) -> None:
        if not strategies:
            raise ValueError("proxy strategies cannot be empty")
        self.managers: tuple[BackendManager, ...] = tuple(
            MANAGER_CLASSES[ProxyStrategy(name)](rng) for name in strategies
        )
        # The deprecated ready_backend_connections gauge follows the last manager changed.
        self._last_changed: BackendManager = self.managers[0]

    def add_backend(self, backend: Backend) -> None:
        for manager in self.managers:
            if manager.add_backend(backend):
                self._last_changed = manager

    def remove_backend(self, backend: Backend) -> None:
        for manager in self.managers:
            if manager.remove_backend(backend):
                self._last_changed = manager

    def backend(self, address: str) -> Backend | None:
        """Ask each manager in order; None means ``No agent available``."""
        for manager in self.managers:
            backend = manager.backend(address)
            if backend is not None:
                return backend
        return None

    @property
    def ready(self) -> bool:
        """The readiness source (§4.6): the first manager holds at least one key."""
        return self.managers[0].num_backends() > 0

    def ready_backends(self) -> dict[str, int]:
        """``ready_backends{proxy_strategy}``: keys per configured strategy."""
        return {manager.strategy.value: manager.num_backends() for manager in self.managers}

    @property
    def ready_backend_connections(self) -> int:
        """The deprecated ``ready_backend_connections`` gauge: keys of the manager that
        changed last."""
        return self._last_changed.num_backends()
