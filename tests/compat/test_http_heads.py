"""How our proxy-server reads HTTP/1 requests, against upstream v0.36.0's binary side by
side: request heads with bare-LF line ends (and other heads Go's ``net/http`` reads in its
own way) on the health, admin and HTTP-CONNECT listeners, and plain HTTP sent to the
HTTP-CONNECT TLS port.

Each request goes, as raw bytes, to upstream's server and to ours started with the same
flags; the replies must be the same bytes (``Date`` aside) and end the same way (the
server closing, or keeping the connection open). The health and admin servers differ on
purpose in their headers (ours answers one request per connection), so there only the
status line, the content type and the body are compared.
"""

from __future__ import annotations

import re
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import Certs, free_ports
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    Upstream,
    server_args,
    server_command,
    server_ports,
    wait_for,
)

pytestmark = pytest.mark.timeout(600)  # the first use builds the upstream binaries

# How long a reply may take; a connection still open after it "stays open".
READ_SECONDS = 1.0
# Exchanges run at once (each a socket and a thread of this process).
PARALLEL = 32
DATE = re.compile(rb"Date: [^\r\n]*")

# Requests as their CRLF form: each is also sent with bare LFs, and with the two mixed.
REQUESTS = {
    "get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "get-twice": b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n",
    "leading-blank-line": b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "blank-lines-after-post": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "http10-keep-alive": b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    "http11-close": b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "cr-inside-a-value": b"GET / HTTP/1.1\r\nHost: x\rY\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "no-host-http10": b"GET / HTTP/1.0\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "folded-host": b"GET / HTTP/1.1\r\nHost: x\r\n y\r\n\r\n",
    "http2-version": b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    "http12-version": b"GET / HTTP/1.2\r\nHost: x\r\n\r\n",
    "bad-version": b"GET / HTTP/x.1\r\nHost: x\r\n\r\n",
    "double-space": b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
    "no-colon": b"GET / HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n",
    "bad-name": b"GET / HTTP/1.1\r\nHost: x\r\nA(b: c\r\n\r\n",
    "relative-target": b"GET x HTTP/1.1\r\nHost: x\r\n\r\n",
    "absolute-target": b"GET http://h:1/p HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad-escape": b"GET /%zz HTTP/1.1\r\nHost: x\r\n\r\n",
}
# The health server's paths worth a look, for the requests it answers.
HEALTH_REQUESTS = {
    "healthz": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "readyz": b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
    "missing": b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    "metrics-head": b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    **{k: v for k, v in REQUESTS.items() if k not in ("get-twice", "blank-lines-after-post")},
}
# Plain HTTP (and other bytes that are not TLS) to the HTTP-CONNECT TLS port.
PLAIN_TO_TLS = {
    "get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "head": b"HEAD / HTTP/1.0\r\n\r\n",
    "post": b"POST / HTTP/1.1\r\nHost: x\r\n\r\n",
    "put": b"PUT /x HTTP/1.1\r\nHost: x\r\n\r\n",
    "options": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect": b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nHost: 10.0.0.1:443\r\n\r\n",
    "get-without-slash": b"GET x HTTP/1.1\r\n\r\n",
    "garbage": b"hello, server\r\n\r\n",
}


def variants(crlf: bytes) -> dict[str, bytes]:
    """The request with CRLF, bare-LF and mixed line ends."""
    lf = crlf.replace(b"\r\n", b"\n")
    mixed = b"".join(
        line + (b"\r\n" if i % 2 else b"\n") for i, line in enumerate(crlf.split(b"\r\n")[:-1])
    )
    return {"crlf": crlf, "lf": lf, "mixed": mixed}


@dataclass(frozen=True)
class Exchange:
    reply: bytes
    ending: str  # "closed", "reset" or "open"


def exchange(address: str | tuple[str, int], data: bytes) -> Exchange:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_SECONDS)
        sock.connect(address)
        sock.sendall(data)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
            ending = "closed"
        except TimeoutError:
            ending = "open"
        except ConnectionResetError:
            ending = "reset"
    return Exchange(DATE.sub(b"Date: X", reply), ending)


def exchanges(pairs: list[tuple[str | tuple[str, int], bytes]]) -> list[Exchange]:
    """``exchange`` for each (address, data), all at once: most wait READ_SECONDS."""
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        return list(pool.map(lambda pair: exchange(*pair), pairs))


def essentials(reply: bytes) -> tuple[bytes, bytes | None, bytes]:
    """Status line, content type and body of a reply (the health servers' headers differ
    by design)."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    ctype = next((ln for ln in lines if ln.lower().startswith(b"content-type:")), None)
    return lines[0], ctype, body


@dataclass(frozen=True)
class Servers:
    """Upstream's and our proxy-server, HTTP-CONNECT mode, started with the same flags."""

    connect: dict[str, str | tuple[str, int]]  # the frontend, by "upstream"/"ours"
    health: dict[str, int]
    admin: dict[str, int]


def start(
    processes: Processes, upstream: Upstream, certs: Certs, frontend: dict[str, list[str]]
) -> tuple[dict[str, int], dict[str, int]]:
    """Both servers with ``frontend[which]``'s frontend flags; their health, admin ports."""
    health: dict[str, int] = {}
    admin: dict[str, int] = {}
    for which in ("upstream", "ours"):
        ports = server_ports()
        args = [
            a
            for a in server_args("", certs, ports, "http-connect")
            if not a.startswith(("--uds-name", "--server-port"))
        ]
        proc = processes.start(which, [*server_command(which, upstream), *args, *frontend[which]])
        wait_for(proc, ports.health, "/healthz", what=which)
        health[which], admin[which] = ports.health, ports.admin
    return health, admin


@pytest.fixture
def uds_servers(processes: Processes, upstream: Upstream, certs: Certs, sock_dir: str) -> Servers:
    socks = {w: str(Path(sock_dir) / f"{w}.sock") for w in ("upstream", "ours")}
    frontend = {w: [f"--uds-name={socks[w]}", "--server-port=0"] for w in socks}
    health, admin = start(processes, upstream, certs, frontend)
    return Servers(dict(socks), health, admin)


@pytest.fixture
def tls_servers(processes: Processes, upstream: Upstream, certs: Certs) -> Servers:
    ports = dict(zip(("upstream", "ours"), free_ports(2), strict=True))
    frontend = {
        w: [
            f"--server-bind-address={LOOPBACK}",
            f"--server-port={port}",
            f"--server-cert={certs.server_cert}",
            f"--server-key={certs.server_key}",
            f"--server-ca-cert={certs.ca}",
        ]
        for w, port in ports.items()
    }
    health, admin = start(processes, upstream, certs, frontend)
    return Servers({w: (LOOPBACK, p) for w, p in ports.items()}, health, admin)


def test_connect_listener_reads_heads_like_go(uds_servers: Servers) -> None:
    """The HTTP-CONNECT listener (Unix socket; the TLS one parses the same way): every
    request, with CRLF, bare-LF and mixed line ends, gets the same bytes and the same end
    of connection as from upstream's."""
    cases = [(f"{n} ({k})", d) for n, crlf in REQUESTS.items() for k, d in variants(crlf).items()]
    theirs = exchanges([(uds_servers.connect["upstream"], d) for _, d in cases])
    ours = exchanges([(uds_servers.connect["ours"], d) for _, d in cases])
    differences = [
        f"{name}:\n  upstream {t}\n  ours     {o}"
        for (name, _), t, o in zip(cases, theirs, ours, strict=True)
        if t != o
    ]
    assert not differences, "\n".join(differences)


def test_bare_lf_gets_an_answer(uds_servers: Servers) -> None:
    """The point of the comparison above, stated on its own: a bare-LF CONNECT is answered
    (here: no agent), not left waiting for a CRLF that never comes."""
    data = variants(REQUESTS["connect"])["lf"]
    ours = exchange(uds_servers.connect["ours"], data)
    assert ours.reply.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), ours
    assert ours.ending == "closed"


def test_health_and_admin_read_heads_like_go(uds_servers: Servers) -> None:
    """The health and admin servers: same status line, content type and body."""
    cases: list[tuple[str, str, bytes]] = []
    for name, crlf in HEALTH_REQUESTS.items():
        cases += [("health", f"{name} ({k})", d) for k, d in variants(crlf).items()]
    metrics = REQUESTS["get"].replace(b"GET / ", b"GET /metrics ")
    cases += [("admin", f"metrics ({k})", d) for k, d in variants(metrics).items()]
    ports = {"health": uds_servers.health, "admin": uds_servers.admin}
    theirs = exchanges([((LOOPBACK, ports[p]["upstream"]), d) for p, _, d in cases])
    ours = exchanges([((LOOPBACK, ports[p]["ours"]), d) for p, _, d in cases])
    differences = []
    for (port_kind, name, _), t, o in zip(cases, theirs, ours, strict=True):
        want, got = essentials(t.reply), essentials(o.reply)
        if port_kind == "admin":  # Go's metrics and ours differ; the answer must not
            want, got = want[:2], got[:2]
        if want != got:
            differences.append(f"{port_kind} {name}:\n  upstream {want}\n  ours     {got}")
    assert not differences, "\n".join(differences)


def test_plain_http_to_the_tls_port(tls_servers: Servers) -> None:
    """Plain HTTP on the HTTP-CONNECT TLS port: Go's "Client sent an HTTP request to an
    HTTPS server." for what looks like HTTP to it, silence for the rest; same bytes, same
    end."""
    names = list(PLAIN_TO_TLS)
    theirs = exchanges([(tls_servers.connect["upstream"], PLAIN_TO_TLS[n]) for n in names])
    ours = exchanges([(tls_servers.connect["ours"], PLAIN_TO_TLS[n]) for n in names])
    differences = [
        f"{name}:\n  upstream {t}\n  ours     {o}"
        for name, t, o in zip(names, theirs, ours, strict=True)
        if t != o
    ]
    assert not differences, "\n".join(differences)
    get = exchange(tls_servers.connect["ours"], PLAIN_TO_TLS["get"])
    assert get.reply.startswith(b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request")


def test_tls_clients_still_get_through(tls_servers: Servers, certs: Certs) -> None:
    """The sniffing in front of TLS lets a real TLS client through: a CONNECT over mTLS is
    answered (no agent) by both servers alike."""
    ctx = ssl.create_default_context(cafile=certs.ca)
    ctx.load_cert_chain(certs.client_cert, certs.client_key)
    ctx.check_hostname = False
    replies = {}
    for which, address in tls_servers.connect.items():
        assert isinstance(address, tuple)
        with socket.create_connection(address, timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(REQUESTS["connect"])
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
            replies[which] = reply
    assert replies["ours"] == replies["upstream"]
    assert replies["ours"].startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
