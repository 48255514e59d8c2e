"""Certificate checks of ``doctor lb``, made as a Go agent would make them.

- chain: the TLS handshake verifies the server's chain against ``--ca-cert`` (or the
  system's CAs), as the agent does; a failure is reported with OpenSSL's reason;
- names: the name the agent dials (``--proxy-server-host``) must be one of the
  certificate's subject alternative names: a DNS name (a ``*.`` wildcard covers one
  leftmost label) or an IP address. Go ignores the common name, and so does this;
- expiry: a certificate that ends within ``--warn-days`` is a warning; the agent's own
  certificate is checked too.

Invariants: nothing here connects; it judges what a handshake returned.
"""

from __future__ import annotations

import ipaddress
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CertFacts", "agent_cert_expiry", "facts", "matches"]

SECONDS_PER_DAY = 86400


@dataclass(frozen=True)
class CertFacts:
    """What a server's certificate says, for the checks."""

    subject: str
    names: tuple[str, ...]  # "DNS:x" / "IP:1.2.3.4", as OpenSSL prints them
    not_after: float  # seconds since the epoch

    def days_left(self, now: float | None = None) -> float:
        return (self.not_after - (time.time() if now is None else now)) / SECONDS_PER_DAY

    def expiry(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.not_after))


def facts(peer: dict[str, Any]) -> CertFacts:
    """From ``SSLSocket.getpeercert()`` of a verified handshake."""
    subject = ", ".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
    names = tuple(
        f"{'IP' if kind == 'IP Address' else kind}:{value.strip()}"
        for kind, value in peer.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    )
    return CertFacts(subject, names, float(ssl.cert_time_to_seconds(peer["notAfter"])))


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        first, _, rest = host.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == host


def matches(names: Sequence[str], host: str) -> bool:
    """Whether a Go client dialling ``host`` accepts a certificate with these SANs."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    for name in names:
        kind, _, value = name.partition(":")
        if address is not None and kind == "IP":
            try:
                if ipaddress.ip_address(value) == address:
                    return True
            except ValueError:
                continue
        elif address is None and kind == "DNS" and _dns_match(value, host):
            return True
    return False


def agent_cert_expiry(path: str) -> float | None:
    """When the agent certificate in ``path`` expires (seconds since the epoch); None
    when it cannot be read (the handshake then says what is wrong)."""
    try:
        from cryptography import x509
    except ImportError:  # a runtime dependency, but the doctor works without it
        return None
    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()
