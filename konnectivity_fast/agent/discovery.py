"""The agent's direct server endpoints: which proxy-server addresses to dial besides the
load balancer, and when (docs/high-availability.md, "Direct endpoints").

Upstream's agent reaches servers only through ``--proxy-server-host``; behind a sticky or
short load balancer it stays on some servers forever. Ours can also dial each replica
directly, from any of these sources (``Source``): a static list
(``--proxy-server-list``), the ``kf-server-endpoints`` header of connected servers
(``--server-discovery=headers``), the annotation on server Leases (``leases``), and the
EndpointSlices of a Service (``service``). ``EndpointBook`` is their union and the
per-address state the ``ClientSet`` dials from.

Pure decisions: no sockets, no loop, no clock (``now`` is passed in; random numbers come
from an injected ``random.Random``). Invariants:

- at most one attempt per address at a time (``started`` until ``failed``/``succeeded``);
- an address is never proposed while the server ID last seen there, or claimed for it by
  a source, is held by any connection (through the balancer or directly): one connection
  per server ID, and a known duplicate costs no attempt until that ID is lost;
- failures back off per address (``Backoff``, from ``--sync-interval`` to
  ``--sync-interval-cap``), so a dead endpoint costs one attempt per cap at most;
- an address no source lists any more is forgotten once nothing is in flight on it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from random import Random

from konnectivity_fast.agent.policy import Backoff
from konnectivity_fast.wire.endpoints import Address

__all__ = ["MAX_DIRECT_ENDPOINTS", "EndpointBook", "Source"]

# Every source together: a control plane has a handful of replicas, and this bounds what
# a Service or the servers' answers can make one agent dial.
MAX_DIRECT_ENDPOINTS = 64


class Source(StrEnum):
    """Where a direct endpoint came from (the ``source`` label of the endpoints gauge)."""

    STATIC = "static"
    SERVICE = "service"
    LEASE = "lease"
    HEADER = "header"


@dataclass
class _Entry:
    backoff: Backoff
    # Source -> the server ID it claims is at this address ("" when it cannot know).
    claims: dict[Source, str] = field(default_factory=dict)
    seen_id: str = ""  # the ID the last connection through this address reported
    in_flight: bool = False  # an attempt is connecting, or its client is held
    retry_at: float = 0.0

    def server_id(self) -> str:
        """Who is there, best knowledge first: what a connection saw, then a claim."""
        if self.seen_id:
            return self.seen_id
        return next((claimed for claimed in self.claims.values() if claimed), "")


class EndpointBook:
    """The union of the direct endpoint sources, and each address's dial state."""

    def __init__(self, base: float, cap: float, rng: Random) -> None:
        self._base = base
        self._cap = cap
        self._rng = rng
        self._entries: dict[Address, _Entry] = {}

    # -- sources ---------------------------------------------------------------------------

    def set_source(self, source: Source, endpoints: Mapping[Address, str]) -> None:
        """Replace what ``source`` lists: address -> the server ID it claims ("" unknown)."""
        for address, entry in list(self._entries.items()):
            if address not in endpoints:
                entry.claims.pop(source, None)
                self._forget_if_unused(address)
        for address, server_id in endpoints.items():
            if address not in self._entries:
                if len(self._entries) >= MAX_DIRECT_ENDPOINTS:
                    continue
                self._entries[address] = _Entry(Backoff(self._base, self._cap, self._rng))
            self._entries[address].claims[source] = server_id

    def _forget_if_unused(self, address: Address) -> None:
        entry = self._entries[address]
        if not entry.claims and not entry.in_flight:
            del self._entries[address]

    def counts(self) -> dict[Source, int]:
        """Addresses per source (one address may count under several)."""
        counts = dict.fromkeys(Source, 0)
        for entry in self._entries.values():
            for source in entry.claims:
                counts[source] += 1
        return counts

    def claimed_ids(self) -> set[str]:
        """Server IDs some source says exist (headers and leases know them; a static list
        or a Service does not)."""
        return {sid for entry in self._entries.values() for sid in entry.claims.values() if sid}

    def __len__(self) -> int:
        return len(self._entries)

    # -- dialling --------------------------------------------------------------------------

    def due(self, now: float, held: Collection[str]) -> list[Address]:
        """Addresses to dial now, given the server IDs held by any connection."""
        return sorted(
            address
            for address, entry in self._entries.items()
            if not entry.in_flight
            and entry.claims
            and now >= entry.retry_at
            and entry.server_id() not in held
        )

    def next_due(self, held: Collection[str]) -> float | None:
        """When the earliest waiting address becomes due (None: none is waiting)."""
        times = [
            entry.retry_at
            for entry in self._entries.values()
            if not entry.in_flight and entry.claims and entry.server_id() not in held
        ]
        return min(times) if times else None

    def started(self, address: Address) -> None:
        self._entries[address].in_flight = True

    def failed(self, address: Address, now: float) -> None:
        """The attempt failed: back off on this address."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.in_flight = False
            entry.retry_at = now + entry.backoff.step()
            self._forget_if_unused(address)

    def connected(self, address: Address, server_id: str, kept: bool) -> None:
        """The attempt reached ``server_id``; ``kept`` unless it was a duplicate, which is
        then not tried again until that ID is lost."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.seen_id = server_id
            entry.in_flight = kept
            entry.backoff.reset()
            entry.retry_at = 0.0
            self._forget_if_unused(address)

    def lost(self, address: Address, now: float) -> None:
        """A kept connection through ``address`` ended: dial it again after a pause."""
        entry = self._entries.get(address)
        if entry is not None:
            entry.in_flight = False
            entry.retry_at = now + entry.backoff.idle()
            self._forget_if_unused(address)
