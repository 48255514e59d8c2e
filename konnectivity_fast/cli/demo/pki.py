"""A throwaway public key infrastructure for the demo: one CA, a proxy-server certificate,
and client certificates for the proxy-agents, all made on the spot with ``cryptography``
(a runtime dependency for this reason only: the programs never import it).

The keys are ECDSA P-256 (fast to make, accepted by Go's TLS as by OpenSSL). The server
certificate names every address the agents dial (its SANs); client certificates carry
the clientAuth usage, which Go's servers require of client certificates. Everything is
valid for ``VALIDITY`` and written with mode 0600 into the demo's folder.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["VALIDITY", "Pki", "make_pki"]

# Beyond the doctor's 30-day warning (the demo's certificates are not the point of its
# output), short enough that a forgotten key is worthless soon enough.
VALIDITY = datetime.timedelta(days=45)
# Clock skew between this machine and a peer (all local here): Kubernetes' own tools
# backdate certificates by this much.
BACKDATE = datetime.timedelta(minutes=5)
_KEY_MODE = 0o600


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files."""

    ca: str
    server_cert: str
    server_key: str
    agent_cert: str
    agent_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "konnectivity-fast demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> str:
    path.write_bytes(data)
    if private:
        os.chmod(path, _KEY_MODE)
    return str(path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: Sequence[str] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path, server_names: Sequence[str]) -> Pki:
    """A CA, a server certificate for ``server_names`` (DNS names or IP addresses) and an
    agent client certificate, as PEM files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("konnectivity-fast demo CA")
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server, server_key = _issue(
        ca_key, ca_name, "konnectivity-server", ExtendedKeyUsageOID.SERVER_AUTH, server_names
    )
    agent, agent_key = _issue(
        ca_key, ca_name, "konnectivity-agent", ExtendedKeyUsageOID.CLIENT_AUTH
    )
    pem = serialization.Encoding.PEM
    return Pki(
        ca=_write(directory / "ca.pem", ca.public_bytes(pem)),
        server_cert=_write(directory / "server.pem", server.public_bytes(pem)),
        server_key=_write(directory / "server-key.pem", _pem_key(server_key), private=True),
        agent_cert=_write(directory / "agent.pem", agent.public_bytes(pem)),
        agent_key=_write(directory / "agent-key.pem", _pem_key(agent_key), private=True),
    )
