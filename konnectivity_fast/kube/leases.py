"""When a ``coordination.k8s.io/v1`` Lease expires, as both programs judge it.

The proxy-server's lease GC deletes expired Leases; the agent counts the others. Both use
upstream's rule: ``(renewTime, else acquireTime) + leaseDurationSeconds`` against now; a
Lease with neither time is expired, and a missing duration counts as 0 (upstream would
crash on it)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = ["Lease", "is_expired", "lease_expiry", "lease_start", "parse_micro_time"]

Lease = dict[str, Any]


def parse_micro_time(text: object) -> datetime | None:
    """A MicroTime or RFC 3339 time from the API, or None when absent or malformed."""
    if not isinstance(text, str) or not text:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def lease_start(lease: Lease) -> datetime | None:
    """Its renew time, else its acquire time, else None."""
    spec = lease.get("spec") or {}
    return parse_micro_time(spec.get("renewTime")) or parse_micro_time(spec.get("acquireTime"))


def lease_expiry(lease: Lease) -> datetime | None:
    """When it expires (its start plus its duration), or None when it has no start."""
    start = lease_start(lease)
    if start is None:
        return None
    duration = (lease.get("spec") or {}).get("leaseDurationSeconds")
    seconds = duration if isinstance(duration, int) else 0
    try:
        return start + timedelta(seconds=seconds)
    except OverflowError:  # a start near year 9999, or a duration past timedelta's range
        return datetime.max.replace(tzinfo=UTC) if seconds > 0 else datetime.min.replace(tzinfo=UTC)


def is_expired(lease: Lease, now: datetime) -> bool:
    expiry = lease_expiry(lease)
    return expiry is None or expiry <= now
