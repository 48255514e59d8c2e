"""Node-to-control-plane configuration, sans-IO: ``--apiserver-port-mapping`` values and
``--feature-gates`` (docs/node-to-control-plane.md, "The agent").

A mapping is ``<local_port>:<host>:<port>``: the agent listens on ``--bind-address``
``local_port`` and asks a server to dial ``host:port`` for each connection accepted there.
The syntax and ranges are those of the agent half of upstream's closed PR #176, so the
command lines written for it (and for the k0s fork that shipped it) keep parsing: an IPv6
host is written in brackets, a host is an IP literal or a DNS name. ``--feature-gates``
takes Kubernetes' ``Name=bool,...`` form; only ``NodeToMasterTraffic`` is known.

Invariants: nothing here does I/O; every function raises ``ValueError`` with the text the
command line prints, never anything else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "FEATURE_NODE_TO_MASTER",
    "MAX_LOCAL_PORT",
    "MAX_MAPPINGS",
    "MIN_LOCAL_PORT",
    "PortMapping",
    "node_to_master_gate",
    "parse_mapping",
    "parse_mappings",
]

#: The feature gate k0s's fork and PR #176 read (upstream declares it, never reads it).
FEATURE_NODE_TO_MASTER = "NodeToMasterTraffic"
#: Local ports are registered ports only (PR #176): no privileged port (the agent runs
#: without CAP_NET_BIND_SERVICE) and none of the ephemeral range, where an outgoing
#: connection of the node could take the port first.
MIN_LOCAL_PORT = 1024
MAX_LOCAL_PORT = 49151
MAX_PORT = 65535
#: One listener each; a node needs one or two (kube-apiserver, maybe konnectivity's own
#: admin). 64 bounds the listeners and metric series an operator's typo can create.
MAX_MAPPINGS = 64
# RFC 1123 DNS name: labels of letters, digits and inner hyphens, at most 63 each, 253 in all.
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
MAX_DNS_NAME = 253
# Go's strconv.ParseBool spellings, which Kubernetes' feature gates accept.
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "true", "TRUE", "True"), True),
    **dict.fromkeys(("0", "f", "F", "false", "FALSE", "False"), False),
}


@dataclass(frozen=True, slots=True)
class PortMapping:
    """One ``--apiserver-port-mapping``: listen on ``local_port``, dial ``address``
    (``host:port``, IPv6 in brackets: the DIAL_REQ's address) through a server."""

    local_port: int
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.local_port}:{self.address}"


def _port(text: str, low: int, high: int, what: str, value: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"invalid {what} {text!r} in mapping {value!r}")
    port = int(text)
    if not low <= port <= high:
        raise ValueError(f"{what} {port} in mapping {value!r} is not in {low}-{high}")
    return port


def _host(text: str, value: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            raise ValueError(f"invalid IPv6 address {inner!r} in mapping {value!r}") from None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        if address.version == 6:
            raise ValueError(f"IPv6 address {text!r} in mapping {value!r} needs brackets")
        return str(address)
    name = text.lower().removesuffix(".")
    if (
        not name
        or len(name) > MAX_DNS_NAME
        or not all(_LABEL.fullmatch(p) for p in name.split("."))
    ):
        raise ValueError(f"invalid host {text!r} in mapping {value!r}: not an IP or a DNS name")
    return name


def parse_mapping(value: str) -> PortMapping:
    """``<local_port>:<host>:<port>``, host an IPv4 address, ``[IPv6]`` or a DNS name."""
    local, sep, rest = value.partition(":")
    host, sep2, port = rest.rpartition(":")
    if not sep or not sep2 or not host:
        raise ValueError(f"mapping {value!r} is not <local_port>:<host>:<port>")
    return PortMapping(
        _port(local, MIN_LOCAL_PORT, MAX_LOCAL_PORT, "local port", value),
        _host(host, value),
        _port(port, 1, MAX_PORT, "port", value),
    )


def parse_mappings(values: Iterable[str]) -> tuple[PortMapping, ...]:
    """Every mapping, in order; a local port given twice is an error."""
    result: list[PortMapping] = []
    seen: set[int] = set()
    for value in values:
        mapping = parse_mapping(value)
        if mapping.local_port in seen:
            raise ValueError(f"local port {mapping.local_port} is mapped twice")
        seen.add(mapping.local_port)
        result.append(mapping)
    if len(result) > MAX_MAPPINGS:
        raise ValueError(f"at most {MAX_MAPPINGS} mappings, got {len(result)}")
    return tuple(result)


def node_to_master_gate(text: str) -> bool | None:
    """``--feature-gates``: the ``NodeToMasterTraffic`` value, or None when not given.
    An unknown gate or a value that is not a Go bool is an error, as in Kubernetes."""
    gate: bool | None = None
    for raw_item in text.split(","):
        item = raw_item.strip()
        if not item:
            continue
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep:
            raise ValueError(f"missing bool value for {name}")
        if name != FEATURE_NODE_TO_MASTER:
            raise ValueError(f"unrecognized feature gate: {name}")
        value = _GO_BOOLS.get(raw.strip())
        if value is None:
            raise ValueError(f"invalid value of {name}={raw.strip()}, err: invalid syntax")
        gate = value
    return gate
