"""Start-up failures worded as upstream's proxy-server reports them.

Upstream returns its start-up errors to cobra, which prints them as ``Error: <err>``; the
texts wrap Go's own errors (``open <path>: no such file or directory``,
``listen tcp <addr>: bind: address already in use``). Operators grep for them, so
``StartupError`` carries the same words, and the helpers here turn Python's exceptions into
Go's phrasing. The checks run before anything listens on the port concerned.
"""

from __future__ import annotations

import os
import ssl

__all__ = [
    "StartupError",
    "check_tls_files",
    "host_port",
    "listen_error",
    "os_error_text",
    "tcp_listen_failure",
    "unix_listen_failure",
]


class StartupError(Exception):
    """The process cannot start; ``str()`` is upstream's message."""


def os_error_text(exc: OSError) -> str:
    """Go's text for an errno: its strerror with a lowercase first letter."""
    if exc.errno:
        text = os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc)


def _open_error(path: str) -> str | None:
    """``open <path>: <errno text>`` if the file cannot be read, else None."""
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return f"open {path}: {os_error_text(exc)}"


def check_tls_files(cert: str, key: str, ca: str | None) -> None:
    """Load a listener's key pair and CA bundle as upstream's ``getTLSConfig`` does, raising
    ``ValueError`` with its message (the caller adds which server failed)."""
    for path in (cert, key):
        if (error := _open_error(path)) is not None:
            raise ValueError(f"failed to load X509 key pair {cert} and {key}: {error}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ValueError(
            f"failed to load X509 key pair {cert} and {key}: tls: {exc.reason or exc}"
        ) from None
    if not ca:
        return
    if (error := _open_error(ca)) is not None:
        raise ValueError(f"failed to read cluster CA cert {ca}: {error}")
    try:
        context.load_verify_locations(cafile=ca)
    except ssl.SSLError:
        raise ValueError("failed to append cluster CA cert to the cert pool") from None


def listen_error(network: str, address: str, exc: OSError) -> str:
    """Go's ``net.Listen`` error: ``listen tcp 127.0.0.1:8091: bind: address already in
    use``."""
    return f"listen {network} {address}: bind: {os_error_text(exc)}"


def host_port(host: str, port: int) -> str:
    """Go's ``net.JoinHostPort``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_listen_failure(path: str, exc: OSError) -> ValueError:
    """The frontend's Unix socket could not listen (the caller adds which server)."""
    return ValueError(f"failed to listen(unix) name {path}: {listen_error('unix', path, exc)}")


def tcp_listen_failure(host: str, port: int, exc: OSError) -> ValueError:
    """A TCP listener could not listen on ``host``:``port`` (the caller adds which)."""
    addr = host_port(host, port)
    return ValueError(f"failed to listen on {addr}: {listen_error('tcp', addr, exc)}")
