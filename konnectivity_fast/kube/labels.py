"""``--lease-label``, as both programs parse it: ``k=v,k2=v2``.

Upstream's proxy-server parses it at start-up and its agent validates it with the same
rules when counting leases, with the same messages."""

from __future__ import annotations

__all__ = ["parse_lease_labels"]


def parse_lease_labels(text: str) -> dict[str, str]:
    """``--lease-label``: ``k=v,k2=v2``, spaces trimmed around keys and values. Raises
    ``ValueError`` with upstream's message (``empty string provided``,
    ``invalid label format: <pair>``)."""
    if not text:
        raise ValueError("empty string provided")
    labels = {}
    for pair in text.split(","):
        parts = pair.split("=")
        if len(parts) != 2:
            raise ValueError(f"invalid label format: {pair}")
        labels[parts[0].strip()] = parts[1].strip()
    return labels
