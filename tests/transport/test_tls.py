"""TLS contexts (``transport/tls.py``): what a server context's handshake leaves behind."""

from __future__ import annotations

import contextlib
import ssl

from konnectivity_fast.transport.tls import server_context

from .conftest import Certs


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """A whole handshake in memory; the client's end, after it read what followed."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, end in enumerate((c, s)):
            try:
                end.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done):
            break
    assert all(done)
    with contextlib.suppress(ssl.SSLWantReadError):
        c.read(1)  # takes in any NewSessionTicket the server sent after the handshake
    return c


def test_a_server_issues_no_session_tickets(certs: Certs) -> None:
    """Each TLS 1.3 ticket costs the server a serialization of the session (the client's
    certificate included) that no agent or kube-apiserver ever uses."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(certs.ca)
    client.load_cert_chain(certs.client_cert, certs.client_key)
    for ca in (certs.ca, None):
        end = handshake(server_context(certs.server_cert, certs.server_key, ca), client)
        assert end.version() == "TLSv1.3"
        assert end.session is None or not end.session.has_ticket
    # The check can fail: OpenSSL's default sends tickets.
    default = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    default.load_cert_chain(certs.server_cert, certs.server_key)
    end = handshake(default, client)
    assert end.session is not None and end.session.has_ticket
