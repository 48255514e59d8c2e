"""The proxy strategies that pick an agent stream (``Backend``, in ``tunnel.records``) for
a dial.

The concepts are upstream's (``pkg/server/backend_manager.go``,
``desthost_backend_manager.go``, ``default_route_backend_manager.go``,
``readiness_manager.go`` and the ``proxystrategies`` package); the strategy names and the
agent identifiers the strategies read are part of the wire contract (``wire.contract``):

- A ``BackendManager`` stores backends under *keys* (agentIDs, or host identifiers for
  ``destHost``), each key holding a list of streams in arrival order, and picks one for a
  dial address. ``BackendManagers`` is the ordered ``--proxy-strategies`` chain: the first
  manager that finds a backend wins.
- DRAIN marks a stream (never an agent) as draining, for good. Selection avoids draining
  streams when a non-draining candidate exists, and falls back to a draining one otherwise.
- The server is ready iff the *first* manager of the chain holds at least one key.
- With ``DialBalance.LEAST_TUNNELS`` (ours, opt-in) each strategy keeps its candidates and
  picks the least loaded of them (``tunnel.balance``): ``default`` and ``defaultRoute``
  among every key's first stream (the streams their random scan looks at), ``destHost``
  among the streams under the dial's host. ``RANDOM`` is upstream's rule, unchanged.

Invariants:
- In every manager, a key is present iff its list is non-empty, a backend appears at most
  once per list, and the key list used for the random scan holds exactly the map's keys.
- Every ``ProxyStrategy`` has exactly one manager class (``MANAGER_CLASSES``).
- Only the caller's ``random.Random`` draws random numbers: selection is reproducible.
- Nothing here does I/O or reads a clock; ``Backend.conn`` is the adapter's own object,
  never touched here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from random import Random
from typing import ClassVar

from konnectivity_fast.tunnel.balance import least_loaded
from konnectivity_fast.tunnel.records import Backend
from konnectivity_fast.wire.contract import ERR_NO_PROXY_STRATEGIES, DialBalance, ProxyStrategy

__all__ = [
    "MANAGER_CLASSES",
    "BackendManager",
    "BackendManagers",
    "DefaultBackendManager",
    "DefaultRouteBackendManager",
    "DestHostBackendManager",
    "remove_port_from_host",
]


def remove_port_from_host(address: str) -> str:
    """The host part of a dial address, the way upstream strips it (pkg/util/net.go
    ``RemovePortFromHost``): ``h:p`` gives ``h``; with two or more colons (IPv6) a
    bracketed form loses its last ``:``-suffix and its brackets, a bare one only its
    brackets. So ``[fe80::1]`` (no port) is mangled to ``fe80:``, as upstream does."""
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

    def least_loaded_first(self, rng: Random) -> Backend | None:
        """Among every key's first stream (what ``random_pick`` looks at), the least
        loaded (``balance.least_loaded``)."""
        return least_loaded((streams[0] for streams in self._backends.values()), rng)

    def least_loaded_under(self, key: str, rng: Random) -> Backend | None:
        """Among the streams under ``key``, the least loaded."""
        return least_loaded(self._backends.get(key, ()), rng)


class BackendManager(ABC):
    """One proxy strategy: which keys a backend is stored under, and how a backend is
    chosen for a dial address."""

    strategy: ClassVar[ProxyStrategy]

    def __init__(self, rng: Random, balance: DialBalance = DialBalance.RANDOM) -> None:
        self._rng = rng
        self._least = balance is DialBalance.LEAST_TUNNELS
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
        if self._least:
            return self._storage.least_loaded_first(self._rng)
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
        if not host:
            return None
        if self._least:
            return self._storage.least_loaded_under(host, self._rng)
        return self._storage.first_available(host)


class DefaultRouteBackendManager(BackendManager):
    """``defaultRoute``: like ``default``, among agents that sent ``default-route=true``."""

    strategy = ProxyStrategy.DEFAULT_ROUTE

    def keys_of(self, backend: Backend) -> Iterable[str]:
        return (backend.agent_id,) if backend.identifiers.default_route else ()

    def backend(self, address: str) -> Backend | None:
        if self._least:
            return self._storage.least_loaded_first(self._rng)
        return self._storage.random_pick(self._rng)


MANAGER_CLASSES: dict[ProxyStrategy, type[BackendManager]] = {
    cls.strategy: cls
    for cls in (DefaultBackendManager, DestHostBackendManager, DefaultRouteBackendManager)
}


class BackendManagers:
    """The ordered ``--proxy-strategies`` chain. ``strategies`` must already be validated
    (``wire.contract.parse_proxy_strategies``); duplicates are allowed. ``balance``: how
    every manager of the chain chooses among its candidates."""

    def __init__(
        self, strategies: Sequence[str], rng: Random, balance: DialBalance = DialBalance.RANDOM
    ) -> None:
        if not strategies:
            raise ValueError(ERR_NO_PROXY_STRATEGIES)
        self.balance = balance
        self.managers: tuple[BackendManager, ...] = tuple(
            MANAGER_CLASSES[ProxyStrategy(name)](rng, balance) for name in strategies
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
        """The readiness source (pkg/server/readiness_manager.go ``Ready``): the first manager
        holds at least one key."""
        return self.managers[0].num_backends() > 0

    def ready_backends(self) -> dict[str, int]:
        """``ready_backends{proxy_strategy}``: keys per configured strategy."""
        return {manager.strategy.value: manager.num_backends() for manager in self.managers}

    @property
    def ready_backend_connections(self) -> int:
        """The deprecated ``ready_backend_connections`` gauge: keys of the manager that
        changed last."""
        return self._last_changed.num_backends()
