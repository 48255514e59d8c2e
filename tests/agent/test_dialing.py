"""Dialing: Go's error texts (pure formatting, and real failures on loopback), including a
connect timeout made with a listener whose accept queue is full."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket

import pytest

from konnectivity_fast.agent.endpoint import Endpoint, EndpointPool, dial
from konnectivity_fast.transport import dialerr

from .conftest import RunFn
from .support import LOOPBACK, closed_port

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", "80")),
        ("[::1]:443", ("::1", "443")),
        ("svc.ns.svc:8443", ("svc.ns.svc", "8443")),
        (":80", ("", "80")),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, str]) -> None:
    assert dialerr.split_host_port(address) == expected


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("foo", "address foo: missing port in address"),
        ("::1:80", "address ::1:80: too many colons in address"),
        ("[::1]", "address [::1]: missing port in address"),
        ("[::1:80", "address [::1:80: missing ']' in address"),
    ],
)
def test_split_host_port_errors(address: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"^" + reason.replace("[", r"\[") + "$"):
        dialerr.split_host_port(address)


def test_error_texts() -> None:
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    assert str(dialerr.connect_error("tcp", "127.0.0.1:1", refused)) == (
        "dial tcp 127.0.0.1:1: connect: connection refused"
    )
    unreachable = OSError(errno.EHOSTUNREACH, "No route to host")
    assert str(dialerr.connect_error("tcp", "[fd00::1]:80", unreachable)) == (
        "dial tcp [fd00::1]:80: connect: no route to host"
    )
    timeout = dialerr.timeout_error("tcp", "10.0.0.1:80")
    assert (str(timeout), timeout.timeout) == ("dial tcp 10.0.0.1:80: i/o timeout", True)
    nxdomain = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert str(dialerr.lookup_error("tcp", "foo.invalid", nxdomain)) == (
        "dial tcp: lookup foo.invalid: no such host"
    )
    assert str(dialerr.lookup_error("tcp", "slow.example", None)) == (
        "dial tcp: lookup slow.example: i/o timeout"
    )
    assert str(dialerr.unknown_network_error("udp")) == "dial udp: unknown network udp"


async def _dial_error(address: str, protocol: str = "tcp", timeout: float = 5.0) -> str:
    pool = EndpointPool()
    with pytest.raises(dialerr.DialError) as info:
        await dial(protocol, address, lambda: Endpoint(pool, None, 1), timeout)  # type: ignore[arg-type]
    return info.value.text


def test_real_dial_failures(run: RunFn) -> None:
    async def main() -> None:
        port = closed_port()
        assert await _dial_error(f"{LOOPBACK}:{port}") == (
            f"dial tcp {LOOPBACK}:{port}: connect: connection refused"
        )
        assert await _dial_error(f"{LOOPBACK}:99999") == "dial tcp: address 99999: invalid port"
        assert await _dial_error(f"{LOOPBACK}:1", "udp") == "dial udp: unknown network udp"
        assert await _dial_error("[::1]:80", "tcp4") == (
            "dial tcp4: address ::1: no suitable address found"
        )

    run(main())


def test_connect_timeout_on_full_accept_queue(run: RunFn) -> None:
    """Linux drops SYNs to a listener whose accept queue is full: connect hangs."""

    async def main() -> None:
        listener = socket.socket()
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):  # fill the queue (backlog 0 admits one or two)
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect((LOOPBACK, port))
                fillers.append(s)
            await asyncio.sleep(0.2)
            text = await _dial_error(f"{LOOPBACK}:{port}", timeout=0.5)
            assert text == f"dial tcp {LOOPBACK}:{port}: i/o timeout"
        finally:
            for s in fillers:
                s.close()
            listener.close()

    run(main())
