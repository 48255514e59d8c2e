"""TLS contexts for gRPC over HTTP/2: ALPN ``h2``, optional client certificates.

Server contexts offer ``h2`` and, with a CA, require and verify client certificates
(mTLS), and issue no TLS 1.3 session tickets (``SERVER_SESSION_TICKETS``). Client contexts
offer the caller's extra ALPN values first and ``h2`` last, as the agent's ``--alpn-proto``
does; a Go server still picks ``h2``. TLS 1.2 is the floor, as Go's default for these
listeners.
"""

from __future__ import annotations

import ssl
import warnings
from collections.abc import Sequence

H2_ALPN = "h2"
#: TLS 1.3 session tickets a server sends after each handshake: none. OpenSSL sends two by
#: default, each the whole session serialized and encrypted, the client's certificate
#: included: about 270 us of server CPU apiece, 40 % of a full agent connect. Neither
#: upstream's agent nor kube-apiserver keeps a session cache, so none would ever be used.
SERVER_SESSION_TICKETS = 0

#: Go's ``tls.VersionTLSxx`` names (``--tls-min-version``) as OpenSSL versions.
GO_TLS_VERSIONS = {
    "VersionTLS10": ssl.TLSVersion.TLSv1,
    "VersionTLS11": ssl.TLSVersion.TLSv1_1,
    "VersionTLS12": ssl.TLSVersion.TLSv1_2,
    "VersionTLS13": ssl.TLSVersion.TLSv1_3,
}
#: Go's TLS 1.0-1.2 cipher-suite names (``--cipher-suites``) as OpenSSL cipher names. Go's
#: TLS 1.3 suites are not configurable (Go ignores them in the list, and so do we).
GO_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
}


def tls_version(go_name: str) -> ssl.TLSVersion:
    """``--tls-min-version`` (empty: Go's default for servers, TLS 1.2)."""
    return GO_TLS_VERSIONS[go_name] if go_name else ssl.TLSVersion.TLSv1_2


def openssl_ciphers(go_names: Sequence[str]) -> str:
    """The OpenSSL cipher string for ``--cipher-suites``; empty when it changes nothing."""
    return ":".join(GO_CIPHERS[name] for name in go_names if name in GO_CIPHERS)


def server_context(
    cert_file: str,
    key_file: str,
    client_ca_file: str | None = None,
    *,
    alpn: Sequence[str] = (H2_ALPN,),
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    go_ciphers: Sequence[str] = (),
) -> ssl.SSLContext:
    """``go_ciphers``: Go cipher-suite names restricting TLS 1.2 and below."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():  # TLS 1.0/1.1 are deprecated; Go still accepts them
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = minimum_version
    ciphers = openssl_ciphers(go_ciphers)
    if ciphers:
        ctx.set_ciphers(ciphers)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    ctx.num_tickets = SERVER_SESSION_TICKETS
    return ctx


def client_context(
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    *,
    extra_alpn: Sequence[str] = (),
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = minimum_version
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    else:
        ctx.load_default_certs()
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    ctx.set_alpn_protocols([*extra_alpn, H2_ALPN])
    return ctx
