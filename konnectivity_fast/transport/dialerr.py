"""Go-shaped dial errors for DIAL_RSP.

Upstream's agent (pkg/agent/client.go ``Client.Serve``) sends the text of Go's
``net.DialTimeout`` error back to the server, which turns it into an HTTP status by
substring (``i/o timeout`` -> 504, ``connection refused`` -> 502, ...) and hands it
verbatim to kube-apiserver callers, where users grep for it. This module
splits a DIAL_REQ address the way ``net.SplitHostPort`` does and spells failures the way
``net.OpError``/``net.DNSError`` print:

- ``dial tcp 127.0.0.1:1: connect: connection refused``
- ``dial tcp 10.0.0.1:80: i/o timeout``
- ``dial tcp: lookup foo.invalid: no such host``
- ``dial tcp: address foo: missing port in address``

Pure functions: no sockets, no loop. The address inside a connect error is the resolved
``ip:port`` (IPv6 in brackets), as Go prints it.
"""

from __future__ import annotations

import errno
import os
import socket

from konnectivity_fast.wire.contract import ERR_IO_TIMEOUT, ERR_TOO_MANY_OPEN_FILES

__all__ = [
    "ALLOWED_PROTOCOLS",
    "DialError",
    "address_error",
    "connect_error",
    "join_host_port",
    "lookup_error",
    "split_host_port",
    "timeout_error",
    "unknown_network_error",
]

#: Networks the agent dials. Upstream passes the DIAL_REQ's protocol straight to Go's
#: ``net.Dial`` (so ``udp`` or ``unix`` would work there); kube-apiserver and upstream's
#: server only ever send ``tcp``. Limiting it is deliberate hardening (docs/differences.md).
ALLOWED_PROTOCOLS = ("tcp", "tcp4", "tcp6")

# Go's syscall error strings where they differ from lower-casing glibc's strerror. The
# server reads some of them back (``wire.contract``).
_GO_ERRNO_TEXT = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset by peer",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network is unreachable",
    errno.ETIMEDOUT: "connection timed out",
    errno.EMFILE: ERR_TOO_MANY_OPEN_FILES,
    errno.EADDRNOTAVAIL: "cannot assign requested address",
}


class DialError(Exception):
    """A failed endpoint dial; ``str()`` is the Go-shaped text, ``timeout`` picks the
    ``endpoint_dial_failure_total`` reason."""

    def __init__(self, text: str, *, timeout: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.timeout = timeout


def split_host_port(address: str) -> tuple[str, str]:
    """``net.SplitHostPort``: ``host:port`` or ``[v6]:port``; raises ``ValueError`` with Go's
    ``address ...: <reason>`` text (``address_error`` adds the ``dial tcp: `` prefix)."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"address {address}: missing ']' in address")
        host, rest = address[1:end], address[end + 1 :]
        if not rest:
            raise ValueError(f"address {address}: missing port in address")
        if not rest.startswith(":") or ":" in rest[1:]:
            reason = "too many colons" if ":" in rest[1:] else "missing port"
            raise ValueError(f"address {address}: {reason} in address")
        if "[" in host or "]" in host:
            raise ValueError(f"address {address}: unexpected '[' in address")
        return host, rest[1:]
    colon = address.rfind(":")
    if colon < 0:
        raise ValueError(f"address {address}: missing port in address")
    host, port = address[:colon], address[colon + 1 :]
    if ":" in host:
        raise ValueError(f"address {address}: too many colons in address")
    if "[" in host or "]" in host:
        raise ValueError(f"address {address}: unexpected '[' in address")
    return host, port


def join_host_port(host: str, port: int | str) -> str:
    """``net.JoinHostPort``: brackets around a host that holds a colon."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def address_error(protocol: str, reason: str) -> DialError:
    """A malformed DIAL_REQ address: ``dial tcp: address foo: missing port in address``."""
    return DialError(f"dial {protocol}: {reason}")


def unknown_network_error(protocol: str) -> DialError:
    return DialError(f"dial {protocol}: unknown network {protocol}")


def lookup_error(protocol: str, host: str, exc: BaseException | None) -> DialError:
    """A failed name lookup, as the cgo resolver prints it."""
    if exc is None:
        reason = ERR_IO_TIMEOUT
    elif isinstance(exc, socket.gaierror) and exc.errno in (
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
    ):
        reason = "no such host"
    elif isinstance(exc, socket.gaierror) and exc.errno == socket.EAI_AGAIN:
        reason = "server misbehaving"
    else:
        reason = _lower_first(
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        )
    return DialError(f"dial {protocol}: lookup {host}: {reason}", timeout=exc is None)


def timeout_error(protocol: str, address: str) -> DialError:
    """The 5 s dial budget ran out while connecting to ``address`` (``ip:port``)."""
    return DialError(f"dial {protocol} {address}: {ERR_IO_TIMEOUT}", timeout=True)


def connect_error(protocol: str, address: str, exc: OSError) -> DialError:
    """``connect(2)`` failed: ``dial tcp 127.0.0.1:1: connect: connection refused``."""
    code = exc.errno
    if code is None:
        text = _lower_first(exc.strerror or str(exc))
    else:
        text = _GO_ERRNO_TEXT.get(code) or _lower_first(os.strerror(code))
    return DialError(f"dial {protocol} {address}: connect: {text}", timeout=code == errno.ETIMEDOUT)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]
