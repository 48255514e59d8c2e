"""Where each proxy-server replica can be reached, as this server knows it (ours, beyond
upstream; docs/high-availability.md "Direct endpoints: the server side").

``ServerDirectory`` holds, for every server ID, two endpoints (``wire.endpoints``):

- its **agent endpoint**, the address agents can dial to reach that replica directly
  (``--agent-advertise-address``, published as the Lease annotation
  ``AGENT_ENDPOINT_ANNOTATION``): the content of the ``kf-server-endpoints`` header;
- its **peer endpoint**, the address of its peer-forwarding listener
  (``PEER_ENDPOINT_ANNOTATION``): where server peering dials.

This server's own endpoints come from its configuration (constructor arguments); the
others' from the server Leases the lease controller lists (``update``, fed by its GC
loop's list). A Lease counts while it is valid: its holder (the server ID) is set and it
has not expired (kube/leases.py, upstream's rule), judged when the list arrives. Between
lists the directory holds what the last one showed, which may be a list period old: a
holder renewing on time (every 15 s, Leases of 30 s) may have renewed since, so a Lease is
kept until ``LIST_STALENESS`` past the expiry that list showed, and a live server never
flickers out between two lists. A server that dies drops out at the first list after its
Lease expired, or ``LIST_STALENESS`` after the expiry when no list comes (the API server
unreachable); a Lease deleted (a server stopped cleanly) drops out with the next list.

Reading, each a ``Callable[[], Mapping[str, Address]]`` other parts can hold:

- ``agent_endpoints()``: every valid server's agent endpoint, **this server included**
  (when it advertises one): what an agent is told;
- ``peer_endpoints()``: every valid *other* server's peer endpoint, **this server
  excluded** (a server never peers with itself): the peering engine's source of peers;
- ``own_annotations()``: what this server's own Lease carries, for the lease controller.

Invariants:
- this server's entries always come from its configuration; a Lease naming this server
  ID (a stale one, or another process with the same ID) never changes them;
- a malformed annotation is skipped (logged when it first appears), never raised; at most
  ``MAX_DIRECTORY_SERVERS`` other servers are kept, the lowest IDs first, so a crowded
  namespace cannot grow the header or the peer set without bound;
- no I/O: the caller lists the Leases, the clock is injected.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from konnectivity_fast.kube.leases import Lease, lease_expiry
from konnectivity_fast.server.leases import GC_PERIOD, JITTER
from konnectivity_fast.verbosity import V
from konnectivity_fast.wire.endpoints import (
    AGENT_ENDPOINT_ANNOTATION,
    MAX_SERVER_ENDPOINTS,
    PEER_ENDPOINT_ANNOTATION,
    Address,
    parse_address,
)

__all__ = ["LIST_STALENESS", "MAX_DIRECTORY_SERVERS", "ServerDirectory", "ServerEntry"]

log = logging.getLogger(__name__)

# The header carries at most MAX_SERVER_ENDPOINTS entries, this server's included, and
# peering needs no more peers than an agent may be told of servers.
MAX_DIRECTORY_SERVERS = MAX_SERVER_ENDPOINTS - 1
# How old the last list may be when read: the lease controller lists every GC period plus
# its jitter, and a list or a renewal may take a few seconds more on a loaded API server.
LIST_LATENCY_MARGIN = 5.0
LIST_STALENESS = timedelta(seconds=GC_PERIOD * (1 + JITTER) + LIST_LATENCY_MARGIN)


def _wall_clock() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class ServerEntry:
    """One other server, from its Lease: its endpoints (None when its Lease has no valid
    annotation) and until when it counts (its Lease's expiry as listed, plus the list's
    staleness allowance)."""

    agent_endpoint: Address | None
    peer_endpoint: Address | None
    valid_until: datetime


class ServerDirectory:
    """Server ID -> endpoints; see the module docstring. ``server_id``: this server's.
    ``agent_endpoint``, ``peer_endpoint``: this server's own (None: it advertises none).
    ``clock``: the wall clock (UTC), Leases' times being wall-clock times.
    ``staleness``: how long past a listed expiry an entry still counts (``LIST_STALENESS``;
    the lease controller's list period, if it is given another)."""

    def __init__(
        self,
        server_id: str,
        *,
        agent_endpoint: Address | None = None,
        peer_endpoint: Address | None = None,
        clock: Callable[[], datetime] = _wall_clock,
        staleness: timedelta = LIST_STALENESS,
    ) -> None:
        self.server_id = server_id
        self.agent_endpoint = agent_endpoint
        self.peer_endpoint = peer_endpoint
        self._clock = clock
        self._staleness = staleness
        self._others: dict[str, ServerEntry] = {}
        self._rejected: set[tuple[str, str, str]] = set()  # (server, annotation, value)

    # --- reading ---------------------------------------------------------------------------

    def agent_endpoints(self) -> dict[str, Address]:
        """Every valid server's agent endpoint, this server's first (when it has one)."""
        found = {self.server_id: self.agent_endpoint} if self.agent_endpoint else {}
        now = self._clock()
        for server_id, entry in self._others.items():
            if entry.agent_endpoint is not None and entry.valid_until > now:
                found[server_id] = entry.agent_endpoint
        return found

    def peer_endpoints(self) -> dict[str, Address]:
        """Every other valid server's peer endpoint; never this server's."""
        now = self._clock()
        return {
            server_id: entry.peer_endpoint
            for server_id, entry in self._others.items()
            if entry.peer_endpoint is not None and entry.valid_until > now
        }

    def own_annotations(self) -> dict[str, str]:
        """The annotations this server's Lease carries: one per endpoint it has."""
        annotations: dict[str, str] = {}
        if self.agent_endpoint is not None:
            annotations[AGENT_ENDPOINT_ANNOTATION] = str(self.agent_endpoint)
        if self.peer_endpoint is not None:
            annotations[PEER_ENDPOINT_ANNOTATION] = str(self.peer_endpoint)
        return annotations

    # --- updating --------------------------------------------------------------------------

    def update(self, leases: Iterable[Lease]) -> bool:
        """Replace what is known of other servers with the valid ones among ``leases`` (a
        whole list, as the lease controller reads it); True when the servers or their
        endpoints changed (a renewal alone changes nothing)."""
        now = self._clock()
        candidates: dict[str, ServerEntry] = {}
        for lease in leases:
            found = self._entry(lease, now)
            if found is None:
                continue
            server_id, entry = found
            known = candidates.get(server_id)
            if known is None or entry.valid_until > known.valid_until:  # the freshest wins
                candidates[server_id] = entry
        others = {key: candidates[key] for key in sorted(candidates)[:MAX_DIRECTORY_SERVERS]}
        if len(candidates) > len(others):
            log.log(
                V(2),
                "%d server Leases beyond the first %d ignored",
                len(candidates) - len(others),
                MAX_DIRECTORY_SERVERS,
            )
        changed = _endpoints(others) != _endpoints(self._others)
        self._others = others
        if changed:
            log.info("servers known from Leases: %s", _describe(others) or "none")
        return changed

    def _entry(self, lease: Lease, now: datetime) -> tuple[str, ServerEntry] | None:
        """The server a valid Lease describes, or None (not valid, or this server)."""
        if not isinstance(lease, dict):
            return None
        spec = lease.get("spec")
        holder = spec.get("holderIdentity") if isinstance(spec, dict) else None
        if not isinstance(holder, str) or not holder or holder == self.server_id:
            return None
        expires = lease_expiry(lease)
        if expires is None or expires <= now:
            return None
        meta = lease.get("metadata")
        annotations = meta.get("annotations") if isinstance(meta, dict) else None
        if not isinstance(annotations, dict):
            annotations = {}
        try:
            valid_until = expires + self._staleness
        except OverflowError:  # an expiry near year 9999
            valid_until = expires
        return holder, ServerEntry(
            self._annotation(holder, annotations, AGENT_ENDPOINT_ANNOTATION),
            self._annotation(holder, annotations, PEER_ENDPOINT_ANNOTATION),
            valid_until,
        )

    def _annotation(
        self, server_id: str, annotations: dict[object, object], key: str
    ) -> Address | None:
        value = annotations.get(key)
        if value is None:
            return None
        try:
            if not isinstance(value, str):
                raise ValueError(f"{value!r} is not a string")
            return parse_address(value)
        except ValueError as exc:
            rejected = (server_id, key, str(value))
            if rejected not in self._rejected:
                if len(self._rejected) >= MAX_DIRECTORY_SERVERS * 2:
                    self._rejected.clear()  # bounded; at worst a line is logged again
                self._rejected.add(rejected)
                log.warning("server %s: ignoring annotation %s: %s", server_id, key, exc)
            return None


def _endpoints(others: dict[str, ServerEntry]) -> dict[str, tuple[Address | None, ...]]:
    """What a change of would be worth a log line (expiry times move on every renewal)."""
    return {key: (entry.agent_endpoint, entry.peer_endpoint) for key, entry in others.items()}


def _describe(others: dict[str, ServerEntry]) -> str:
    parts = []
    for server_id, entry in others.items():
        agent = entry.agent_endpoint or "-"
        peer = entry.peer_endpoint or "-"
        parts.append(f"{server_id} (agents {agent}, peers {peer})")
    return ", ".join(parts)
