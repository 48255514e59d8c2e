"""The proxy-server's allow-list of agent-initiated destinations (``--allowed-destination``,
node-to-cp.v1; docs/node-to-control-plane.md, "Security").

An entry is either an exact ``host:port`` (``localhost:6443``, ``10.0.0.5:6443``,
``[fd00::5]:6443``), which matches that normalised destination only, hostnames being
resolved by the server when it dials, or an IP prefix with a port (``10.0.0.0/24:6443``,
``[fd00::/64]:6443``), which matches IP literals only: a hostname never matches a prefix, so
a name that resolves (or is made to resolve) into the prefix is not let through (no DNS
rebinding). Normalisation: the host lowercased, one trailing dot dropped, an IP literal in
its canonical form (IPv6 compressed, in brackets when printed). No wildcards.

Invariants:
- ``parse_allowed_destinations`` either returns an ``AllowList`` or raises ``ValueError``
  with a message naming the bad entry (start-up fails on it); ``AllowList.allows`` and
  ``normalise_destination`` never raise, whatever the text (an agent sends it).
- An empty list allows nothing; nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "MAX_DESTINATION_LENGTH",
    "AllowList",
    "Destination",
    "normalise_destination",
    "parse_allowed_destinations",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: A DNS name is at most 253 characters; with brackets and a port a destination fits in
#: 261. Anything longer is refused before it is parsed (an agent chooses the text).
MAX_DESTINATION_LENGTH = 300
# RFC 1123 labels: letters, digits and '-', not starting or ending with '-', 1-63 long.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_NAME = 253


@dataclass(frozen=True, slots=True)
class Destination:
    """A normalised destination: ``host`` is a lowercase name or an IP address's canonical
    text (IPv6 without brackets), ``ip`` its address when it is a literal."""

    host: str
    port: int
    ip: IPAddress | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _split(text: str) -> tuple[str, str] | None:
    """``host:port`` or ``[host]:port`` into its parts, or None."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            return None
        return text[1:end], text[end + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return None
    return host, port


def _port(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        return None
    value = int(text)
    return value if 0 < value <= 65535 else None


def _host(text: str) -> tuple[str, IPAddress | None] | None:
    """The normalised host and its address if it is an IP literal, or None if invalid."""
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or not host.isascii() or "%" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return ip.compressed, ip
    if len(host) > _MAX_NAME or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        return None
    return host, None


def normalise_destination(address: str) -> Destination | None:
    """An agent's DIAL_REQ address, normalised, or None when it is not a valid
    ``host:port``. Never raises."""
    if len(address) > MAX_DESTINATION_LENGTH:
        return None
    parts = _split(address)
    if parts is None:
        return None
    port = _port(parts[1])
    host = _host(parts[0])
    if port is None or host is None:
        return None
    return Destination(host[0], port, host[1])


@dataclass(frozen=True, slots=True)
class _Prefix:
    network: IPNetwork
    port: int

    def __str__(self) -> str:
        text = self.network.with_prefixlen
        return f"[{text}]:{self.port}" if self.network.version == 6 else f"{text}:{self.port}"


def _parse_entry(entry: str) -> Destination | _Prefix:
    """One ``--allowed-destination`` entry; raises ``ValueError`` saying what is wrong."""
    if "*" in entry:
        raise ValueError(f"--allowed-destination {entry!r}: wildcards are not allowed")
    if len(entry) > MAX_DESTINATION_LENGTH:
        raise ValueError(f"--allowed-destination {entry[:40]!r}...: too long")
    parts = _split(entry)
    if parts is None:
        raise ValueError(
            f"--allowed-destination {entry!r}: want host:port, [ipv6]:port, "
            "a.b.c.d/len:port or [ipv6/len]:port"
        )
    host_text, port_text = parts
    port = _port(port_text)
    if port is None:
        raise ValueError(f"--allowed-destination {entry!r}: port must be 1-65535")
    if not host_text:
        raise ValueError(f"--allowed-destination {entry!r}: empty host")
    if "/" in host_text:
        try:
            network = ipaddress.ip_network(host_text, strict=True)
        except ValueError as exc:
            raise ValueError(f"--allowed-destination {entry!r}: {exc}") from None
        if network.version == 6 and not entry.startswith("["):
            raise ValueError(f"--allowed-destination {entry!r}: write [ipv6/len]:port")
        return _Prefix(network, port)
    host = _host(host_text)
    if host is None:
        raise ValueError(f"--allowed-destination {entry!r}: not an IP address or DNS name")
    return Destination(host[0], port, host[1])


class AllowList:
    """The destinations agents may make this server dial. False when empty (the feature is
    then off)."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, entries: Iterable[Destination | _Prefix] = ()) -> None:
        exact: set[tuple[str, int]] = set()
        prefixes: list[_Prefix] = []
        for entry in entries:
            if isinstance(entry, Destination):
                exact.add((entry.host, entry.port))
            elif entry not in prefixes:
                prefixes.append(entry)
        self._exact = frozenset(exact)
        self._prefixes = tuple(prefixes)

    def __bool__(self) -> bool:
        return bool(self._exact or self._prefixes)

    def __str__(self) -> str:
        exact = sorted(str(Destination(h, p, None)) for h, p in self._exact)
        return ",".join(exact + [str(prefix) for prefix in self._prefixes])

    def match(self, address: str) -> Destination | None:
        """The normalised destination if ``address`` is allowed, else None. Never raises."""
        dest = normalise_destination(address)
        if dest is None:
            return None
        if (dest.host, dest.port) in self._exact:
            return dest
        ip = dest.ip
        if ip is None:
            return None  # a name matches exact entries only
        for prefix in self._prefixes:
            same_kind = prefix.port == dest.port and ip.version == prefix.network.version
            if same_kind and ip in prefix.network:  # ``in`` needs the same IP version
                return dest
        return None

    def allows(self, address: str) -> bool:
        return self.match(address) is not None


def parse_allowed_destinations(values: Iterable[str]) -> AllowList:
    """``--allowed-destination`` values (each possibly a comma list; empty items skipped)
    as an ``AllowList``; raises ``ValueError`` naming the first bad entry."""
    entries: list[Destination | _Prefix] = []
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if item:
                entries.append(_parse_entry(item))
    return AllowList(entries)
