"""The checks of server peering's flags (``cli.extensions.PEER_EXTENSION_FLAGS``;
docs/high-availability.md, "Server peering").

``check_peering`` runs after upstream's checks (``server_options.ProxyRunOptions.
_check_extensions``) and returns the first problem as one line, which the program prints
as a start-up error (exit 1), or None. It also resolves the peer TLS files: an empty
``--peer-cert``/``--peer-key``/``--peer-ca-cert`` takes the ``--server-*`` one.

Invariant: with ``--enable-peer-forwarding`` off, every peer flag must be left at its
default, so a server without it behaves exactly as upstream's.
"""

from __future__ import annotations

import os
from typing import Protocol

from konnectivity_fast.server.peering import PeeringRunOptions, parse_peer_endpoints

__all__ = ["MAX_PORT", "PeeringOptions", "check_peering"]

# TCP's port range.
MAX_PORT = 65535


class PeeringOptions(PeeringRunOptions, Protocol):
    """The fields of ``ProxyRunOptions`` peering reads: its own flags, and the server TLS
    files the empty peer ones default to."""

    server_cert: str
    server_key: str
    server_ca_cert: str


def check_peering(options: PeeringOptions) -> str | None:
    """The first problem with the peering flags, or None (module docstring)."""
    if not options.enable_peer_forwarding:
        for flag, value in (
            ("peer-port", options.peer_port),
            ("peer-bind-address", options.peer_bind_address),
            ("peer-endpoints", options.peer_endpoints),
            ("peer-cert", options.peer_cert),
            ("peer-key", options.peer_key),
            ("peer-ca-cert", options.peer_ca_cert),
        ):
            if value:
                return f"--{flag} needs --enable-peer-forwarding"
        return None
    if not 0 <= options.peer_port <= MAX_PORT:
        return f"--peer-port must be between 0 and {MAX_PORT}, got {options.peer_port}"
    try:
        parse_peer_endpoints(options.peer_endpoints)
    except ValueError as exc:
        return f"invalid --peer-endpoints: {exc}"
    options.peer_cert = options.peer_cert or options.server_cert
    options.peer_key = options.peer_key or options.server_key
    options.peer_ca_cert = options.peer_ca_cert or options.server_ca_cert
    for flag, path in (
        ("peer-cert", options.peer_cert),
        ("peer-key", options.peer_key),
        ("peer-ca-cert", options.peer_ca_cert),
    ):
        if not path:
            return (
                f"--enable-peer-forwarding needs --{flag} (or its --server-* counterpart): "
                "peers authenticate each other with mTLS"
            )
        if not os.path.exists(path):
            return f"error checking --{flag} {path}: no such file"
    return None
