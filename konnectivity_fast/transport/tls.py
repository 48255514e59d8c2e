"""TLS contexts for gRPC over HTTP/2: ALPN ``h2``, optional client certificates.

Server contexts offer ``h2`` and, with a CA, require and verify client certificates
(mTLS). Client contexts offer the caller's extra ALPN values first and ``h2`` last, as the
agent's ``--alpn-proto`` does; a Go server still picks ``h2``. TLS 1.2 is the floor, as
Go's default for these listeners.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence

H2_ALPN = "h2"


def server_context(
    cert_file: str,
    key_file: str,
    client_ca_file: str | None = None,
    *,
    alpn: Sequence[str] = (H2_ALPN,),
    minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum_version
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
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
