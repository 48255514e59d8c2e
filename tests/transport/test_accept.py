"""``transport.accept.Listener`` when the process runs out of file descriptors: the
connections wait in the backlog (none is reset), the failure is logged in grpc-go's words
with the listener and the limit, and they are all served once descriptors are free again.

The exhaustion is real: the test lowers its own soft RLIMIT_NOFILE and fills the table
with duplicates of one descriptor, then releases them; the client sockets are made
before, so connecting them needs no descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
from collections.abc import Iterator

import pytest

from konnectivity_fast.transport.accept import (
    ACCEPT_RETRY_MAX,
    listen_unix,
    set_exhaustion_observer,
)

from .conftest import RunFn

pytestmark = pytest.mark.timeout(60)

CLIENTS = 5
#: Descriptors left under the lowered limit beyond those open: room for the loop's own.
HEADROOM = 32
WAIT = 10.0


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@contextlib.contextmanager
def exhausted() -> Iterator[list[int]]:
    """Lower the soft descriptor limit and fill the table; yields the fillers (closing
    them is the release). The limit is restored on exit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + HEADROOM, hard))
    fillers: list[int] = []
    try:
        while True:
            try:
                fillers.append(os.dup(0))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
                break
        yield fillers
    finally:
        for fd in fillers:
            with contextlib.suppress(OSError):
                os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_wait_out_descriptor_exhaustion(
    run: RunFn, sock_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    observed: list[tuple[str, str]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        path = os.path.join(sock_dir, "a.sock")
        listener = await listen_unix("test", Echo, path, backlog=64)
        set_exhaustion_observer(lambda *failure: observed.append(failure))
        clients = [socket.socket(socket.AF_UNIX) for _ in range(CLIENTS)]
        try:
            for c in clients:
                c.setblocking(False)
            with exhausted() as fillers:
                for c in clients:
                    await loop.sock_connect(c, path)  # queued in the backlog
                    await loop.sock_sendall(c, b"ping")
                await asyncio.sleep(3 * ACCEPT_RETRY_MAX)
                for c in clients:  # still waiting: not accepted, not reset
                    with pytest.raises(BlockingIOError):
                        c.recv(16)
                for fd in fillers:
                    os.close(fd)
                fillers.clear()
                for c in clients:
                    got = await asyncio.wait_for(loop.sock_recv(c, 16), WAIT)
                    assert got == b"ping"
        finally:
            set_exhaustion_observer(None)
            for c in clients:
                c.close()
            listener.close()
            await listener.wait_closed()

    with caplog.at_level(logging.INFO, logger="konnectivity_fast.transport.accept"):
        run(main())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors, "descriptor exhaustion was not logged"
    assert errors[0].startswith(f"Accept error: accept unix {os.path.join(sock_dir, 'a.sock')}")
    assert "too many open files; retrying in 5ms (test listener, open files limit" in errors[0]
    assert any(
        r.getMessage().startswith("Accepting again on test listener") for r in caplog.records
    )
    # Every failed accept reached the observer (the programs' metric), logged or not.
    assert observed and set(observed) == {("test", "EMFILE")}
    assert len(observed) >= len(errors)
