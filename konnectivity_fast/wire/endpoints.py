"""Server endpoints: where each proxy-server replica can be reached directly, as servers
tell agents and each other (ours, beyond upstream; docs/high-availability.md).

Upstream's agents reach servers only through one address (``--proxy-server-host``),
usually a load balancer, and keep dialling it until they have seen every server ID. A
sticky or short balancer leaves them on some servers only. Our agents can also dial each
replica directly; these are the names and texts both sides agree on:

- ``Extension.SERVER_ENDPOINTS`` (``server-endpoints.v1``, ``wire.contract``): an agent
  that offers it on Connect gets, from a server that offers it too, the response header
  ``kf-server-endpoints`` listing ``<server id>=<host:port>`` entries joined by commas:
  the server's own ``--agent-advertise-address`` and those its peers published in their
  Leases. Negotiated like every extension: an upstream peer neither sends nor receives it.
- Lease annotations, written by our servers' lease controller (upstream servers replace
  labels, never annotations, and upstream agents ignore both): ``AGENT_ENDPOINT_ANNOTATION``
  (the agent-facing address) and ``PEER_ENDPOINT_ANNOTATION`` (the peer-forwarding
  listener).
- ``MD_FORWARDED_FROM``: request metadata on a peer-forwarded ``Proxy`` stream, naming the
  server that forwarded it; a server never forwards such a stream again (one hop).

Parsing never fails on peer input: a malformed entry is skipped, and a header longer than
``MAX_SERVER_ENDPOINTS_LENGTH`` or with more than ``MAX_SERVER_ENDPOINTS`` entries is cut
at the bound, so a peer cannot make an agent dial without limit. Configuration (flags) is
checked strictly by ``parse_address``, which raises ``ValueError`` with a readable text.

Invariants: pure functions, no I/O; nothing here imports anything above wire/.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "AGENT_ENDPOINT_ANNOTATION",
    "MAX_SERVER_ENDPOINTS",
    "MAX_SERVER_ENDPOINTS_LENGTH",
    "MD_FORWARDED_FROM",
    "MD_SERVER_ENDPOINTS",
    "PEER_ENDPOINT_ANNOTATION",
    "Address",
    "format_server_endpoints",
    "parse_address",
    "parse_address_list",
    "parse_server_endpoints",
]

MD_SERVER_ENDPOINTS = "kf-server-endpoints"
MD_FORWARDED_FROM = "kf-forwarded-from"
AGENT_ENDPOINT_ANNOTATION = "konnectivity-fast.io/agent-endpoint"
PEER_ENDPOINT_ANNOTATION = "konnectivity-fast.io/peer-endpoint"

# A control plane has a handful of replicas; 64 is far beyond any real one and bounds the
# connections one server's answer can make an agent try.
MAX_SERVER_ENDPOINTS = 64
# 64 entries of a UUID (36), '=', a host name and a port fit in 8 KiB; grpc-go's default
# header list limit is 16 KiB, so the header never endangers the stream it rides on.
MAX_SERVER_ENDPOINTS_LENGTH = 8192
# RFC 1035's limit on a whole domain name.
_MAX_HOST_LENGTH = 253
# Characters that would make an entry ambiguous in the header's list syntax.
_SEPARATORS = frozenset(",= \t")


@dataclass(frozen=True, order=True)
class Address:
    """A host (name or IP literal, without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port``; raises ``ValueError`` naming what is wrong."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{text!r} is not host:port ([ipv6]:port for IPv6)")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r} is not host:port ([ipv6]:port for IPv6)")
    if not host or len(host) > _MAX_HOST_LENGTH or _SEPARATORS.intersection(host):
        raise ValueError(f"{text!r} has no valid host")
    if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
        raise ValueError(f"{text!r} has no valid port (1-65535)")
    return Address(host, int(port_text))


def parse_address_list(text: str) -> list[Address]:
    """A flag's comma-separated ``host:port`` list (empty items ignored, duplicates kept
    once, in order); raises ``ValueError`` for the first bad item."""
    seen: dict[Address, None] = {}
    for item in text.split(","):
        if item.strip():
            seen.setdefault(parse_address(item.strip()), None)
    return list(seen)


def _valid_id(server_id: str) -> bool:
    return bool(server_id) and not _SEPARATORS.intersection(server_id)


def format_server_endpoints(endpoints: Mapping[str, Address]) -> str:
    """The ``kf-server-endpoints`` value: sorted by server ID so every stream gets the same
    text; IDs the list syntax cannot carry are left out, and the text stays within
    ``MAX_SERVER_ENDPOINTS_LENGTH``."""
    parts: list[str] = []
    length = 0
    for server_id in sorted(endpoints):
        if not _valid_id(server_id) or len(parts) >= MAX_SERVER_ENDPOINTS:
            continue
        part = f"{server_id}={endpoints[server_id]}"
        if length + len(part) + 1 > MAX_SERVER_ENDPOINTS_LENGTH:
            break
        parts.append(part)
        length += len(part) + 1
    return ",".join(parts)


def parse_server_endpoints(values: Iterable[str]) -> dict[str, Address]:
    """Server ID -> address from every ``kf-server-endpoints`` value a peer sent. Never
    raises (module docstring): bad entries are skipped, and reading stops at the bounds."""
    found: dict[str, Address] = {}
    budget = MAX_SERVER_ENDPOINTS_LENGTH
    for value in values:
        text = value
        if len(value) > budget:  # cut, and drop the entry the cut went through
            text = value[:budget].rpartition(",")[0]
        budget -= len(value)
        for item in text.split(","):
            server_id, sep, address = item.strip(" \t").partition("=")
            if not sep or not _valid_id(server_id):
                continue
            try:
                found.setdefault(server_id, parse_address(address))
            except ValueError:
                continue
            if len(found) >= MAX_SERVER_ENDPOINTS:
                return found
        if budget <= 0:
            break
    return found
