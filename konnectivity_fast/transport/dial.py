"""Go-shaped TCP dials: ``dial`` opens a connection to a ``host:port`` as Go's
``net.DialTimeout`` would, and fails with ``DialError`` carrying Go's text
(``transport.dialerr``). The agent dials backends with it (``agent.endpoint``), the server
dials agent-initiated destinations (``server.reverse``).

Invariants: every resolved address is tried in turn within one overall timeout; the first
error is the one reported; the protocol factory is called only for a connection that is
made, so a cancelled or failed dial leaves no socket behind.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import TypeVar

from konnectivity_fast.transport import dialerr
from konnectivity_fast.transport.dialerr import DialError

__all__ = [
    "CLOSE_FLUSH_TIMEOUT",
    "DIAL_TIMEOUT",
    "MIN_ATTEMPT_TIMEOUT",
    "close_after_flush",
    "dial",
]

#: Upstream's fixed ``dialTimeout``: name lookup plus connect, for all addresses tried.
DIAL_TIMEOUT = 5.0
# Go gives each of several resolved addresses an equal share of what is left of the dial
# budget, but at least this much (net.Dialer's partialDeadline).
MIN_ATTEMPT_TIMEOUT = 2.0

#: Seconds a dialled connection being closed gets to write what is queued for it before
#: its socket is aborted: a peer that stopped reading cannot keep it open.
CLOSE_FLUSH_TIMEOUT = 5.0

_P = TypeVar("_P", bound=asyncio.BaseProtocol)


def close_after_flush(transport: asyncio.Transport | None) -> None:
    """Stop reading, let what is queued go out within ``CLOSE_FLUSH_TIMEOUT``, close."""
    if transport is None or transport.is_closing():
        return
    transport.pause_reading()
    if transport.get_write_buffer_size():
        asyncio.get_running_loop().call_later(CLOSE_FLUSH_TIMEOUT, transport.abort)
    transport.close()


def _families(protocol: str) -> int:
    return {"tcp4": socket.AF_INET, "tcp6": socket.AF_INET6}.get(protocol, socket.AF_UNSPEC)


def _parse_port(protocol: str, port: str) -> int:
    if port.isdigit():
        value = int(port)
        if value > 65535:
            raise dialerr.address_error(protocol, f"address {port}: invalid port")
        return value
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        raise DialError(f"dial {protocol}: lookup {protocol}/{port}: unknown port") from None


def _ip_version(host: str) -> int:
    """4 or 6 if ``host`` is an IP literal (an IPv6 zone allowed), else 0. ``inet_pton``
    instead of ``ipaddress``: this runs on every dial."""
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
        except OSError:
            continue
        return version
    return 0


async def _resolve(protocol: str, host: str, port: int, deadline: float) -> list[tuple[str, int]]:
    family = _families(protocol)
    version = _ip_version(host)
    if version:
        if (family == socket.AF_INET and version != 4) or (
            family == socket.AF_INET6 and version != 6
        ):
            raise DialError(f"dial {protocol}: address {host}: no suitable address found")
        return [(host, port)]
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout_at(deadline):
            infos = await loop.getaddrinfo(
                host or None, port, family=family, type=socket.SOCK_STREAM
            )
    except TimeoutError:
        raise dialerr.lookup_error(protocol, host, None) from None
    except OSError as exc:
        raise dialerr.lookup_error(protocol, host, exc) from None
    seen: list[tuple[str, int]] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        addr = (str(sockaddr[0]), int(sockaddr[1]))
        if addr not in seen:
            seen.append(addr)
    if not seen:
        raise dialerr.lookup_error(protocol, host, socket.gaierror(socket.EAI_NONAME, ""))
    return seen


async def dial(
    protocol: str,
    address: str,
    factory: Callable[[], _P],
    timeout: float = DIAL_TIMEOUT,
) -> _P:
    """Open a TCP connection to ``address`` (``host:port``) as Go's ``net.DialTimeout``
    would: every resolved address in turn within ``timeout``; the first error is the one
    reported. Raises ``DialError`` with Go's text."""
    if protocol not in dialerr.ALLOWED_PROTOCOLS:
        raise dialerr.unknown_network_error(protocol)
    try:
        host, port_text = dialerr.split_host_port(address)
    except ValueError as exc:
        raise dialerr.address_error(protocol, str(exc)) from None
    port = _parse_port(protocol, port_text)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    addrs = await _resolve(protocol, host, port, deadline)
    first: DialError | None = None
    for index, (ip, ip_port) in enumerate(addrs):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        share = remaining / (len(addrs) - index)
        attempt = min(remaining, max(share, MIN_ATTEMPT_TIMEOUT))
        target = dialerr.join_host_port(ip, ip_port)
        try:
            # A timeout scope, not wait_for: no second task per dial.
            async with asyncio.timeout(attempt):
                _, endpoint = await loop.create_connection(factory, ip, ip_port)
            return endpoint
        except TimeoutError:
            error = dialerr.timeout_error(protocol, target)
        except OSError as exc:
            error = dialerr.connect_error(protocol, target, exc)
        first = first or error
    if first is None:
        ip, ip_port = addrs[0]
        first = dialerr.timeout_error(protocol, dialerr.join_host_port(ip, ip_port))
    raise first
