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
Both accept only what a dialer and an HTTP/2 header can carry: a host is a DNS name or
IPv4 literal (letters, digits, ``.``, ``-``, ``_``) or a bracketed IPv6 literal, a server
ID is visible ASCII without a separator, and ``format_server_endpoints`` leaves out any
entry ``parse_server_endpoints`` would skip, so what one side writes the other reads back
whole.

Invariants: pure functions, no I/O; nothing here imports anything above wire/.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "AGENT_ENDPOINT_ANNOTATION",
    "MAX_SERVER_ENDPOINTS",
    "MAX_SERVER_ENDPOINTS_LENGTH",
    "MAX_SERVER_ID_LENGTH",
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
# Server IDs are UUIDs by default (36) or an operator's name, also a Lease name's suffix;
# a DNS subdomain's 253 bounds them.
MAX_SERVER_ID_LENGTH = 253
# RFC 1035's limit on a whole domain name.
_MAX_HOST_LENGTH = 253
# Five digits hold every port; a longer text is refused before int() sees it.
_MAX_PORT_DIGITS = 5
# What a host may be: a DNS name or IPv4 literal (letters, digits, '.', '-', '_'), or,
# between brackets, an IPv6 literal (``ipaddress``'s syntax, a zone as ``%name``).
# Nothing else reaches a dialer, so a peer cannot hand an agent control characters,
# spaces or URL syntax to dial.
_NAME_HOST = re.compile(r"[A-Za-z0-9._-]+")
# Characters that would make an entry ambiguous in the header's list syntax.
_SEPARATORS = frozenset(",= \t")


@dataclass(frozen=True, order=True)
class Address:
    """A host (name or IP literal, without brackets) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _valid_host(host: str) -> bool:
    if not host or len(host) > _MAX_HOST_LENGTH:
        return False
    if ":" not in host:
        return _NAME_HOST.fullmatch(host) is not None
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return _NAME_HOST.fullmatch(host.partition("%")[2] or "x") is not None


def parse_address(text: str) -> Address:
    """``host:port`` or ``[v6]:port``; raises ``ValueError`` naming what is wrong."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{text!r} is not host:port ([ipv6]:port for IPv6)")
        host, port_text = text[1:end], text[end + 2 :]
        if ":" not in host:  # brackets are for IPv6 only, as Go's net.SplitHostPort
            raise ValueError(f"{text!r} has no valid host")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r} is not host:port ([ipv6]:port for IPv6)")
    if not _valid_host(host):
        raise ValueError(f"{text!r} has no valid host")
    if not (
        port_text.isascii()
        and port_text.isdigit()
        and len(port_text) <= _MAX_PORT_DIGITS
        and 0 < int(port_text) < 65536
    ):
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
    """A server ID the header can carry: visible ASCII (an HTTP/2 field value refuses
    control characters, and one bad value would fail the whole Connect stream), no list
    separator, bounded."""
    return (
        0 < len(server_id) <= MAX_SERVER_ID_LENGTH
        and server_id.isascii()
        and server_id.isprintable()
        and not _SEPARATORS.intersection(server_id)
    )


def _valid_entry(server_id: str, address: Address) -> bool:
    return _valid_id(server_id) and _valid_host(address.host) and 0 < address.port < 65536


def format_server_endpoints(endpoints: Mapping[str, Address]) -> str:
    """The ``kf-server-endpoints`` value: sorted by server ID so every stream gets the same
    text. Entries the list syntax cannot carry (an ID with a separator or a control
    character, an address ``parse_address`` would refuse) are left out, as are those past
    ``MAX_SERVER_ENDPOINTS`` entries or ``MAX_SERVER_ENDPOINTS_LENGTH`` characters."""
    parts: list[str] = []
    length = -1  # the first entry has no comma before it
    for server_id in sorted(endpoints):
        address = endpoints[server_id]
        if not _valid_entry(server_id, address):
            continue
        part = f"{server_id}={address}"
        if length + 1 + len(part) > MAX_SERVER_ENDPOINTS_LENGTH:
            continue  # a shorter one after it may still fit
        parts.append(part)
        length += 1 + len(part)
        if len(parts) == MAX_SERVER_ENDPOINTS:
            break
    return ",".join(parts)


def parse_server_endpoints(values: Iterable[str]) -> dict[str, Address]:
    """Server ID -> address from every ``kf-server-endpoints`` value a peer sent. Never
    raises (module docstring): bad entries are skipped, and reading stops at the bounds."""
    found: dict[str, Address] = {}
    budget = MAX_SERVER_ENDPOINTS_LENGTH
    for value in values:
        text = value
        if len(value) > budget:  # cut, and drop the entry the cut went through
            text = value[: budget + 1].rpartition(",")[0]
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
