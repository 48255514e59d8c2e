"""``transport.loop``: the cached running loop, and a transport's word at a queue level."""

from __future__ import annotations

import asyncio
import contextlib
import socket

from konnectivity_fast.transport.loop import RunningLoop, resume_writing_at
from tests.support.net import LOOPS, RunFn

QUEUED = 4 << 20  # far more than a socket buffer takes: most of it stays queued
# Written as the data path writes, a packet per loop turn: uvloop hands each turn's writes
# to libuv as one request and looks at the queue as a request completes, so one 4 MiB write
# would be reported only once all of it had gone.
PIECE = 64 << 10
LEVEL = 256 << 10
READ = 64 << 10


class Writer(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None
        self.resumed_at: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.resumed_at.append(self.transport.get_write_buffer_size())


def test_running_loop_is_asked_again_once_closed() -> None:
    running = RunningLoop()

    async def ask() -> asyncio.AbstractEventLoop:
        assert running() is asyncio.get_running_loop()
        return running()

    seen = []
    for factory in sorted(LOOPS.values(), key=str):
        with asyncio.Runner(loop_factory=factory) as runner:
            seen.append(runner.run(ask()))
    assert len(set(map(id, seen))) == len(seen)


def test_resume_writing_comes_at_the_level(run: RunFn) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        transport, writer = await loop.create_connection(Writer, sock=ours)
        for _ in range(QUEUED // PIECE):
            transport.write(b"x" * PIECE)
            await asyncio.sleep(0)
        assert transport.get_write_buffer_size() > LEVEL
        resume_writing_at(transport, LEVEL)
        taken = 0
        while not writer.resumed_at and taken < QUEUED:
            await asyncio.sleep(0.001)
            with contextlib.suppress(BlockingIOError):
                taken += len(theirs.recv(READ))
        assert writer.resumed_at, "resume_writing never came"
        assert writer.resumed_at[0] <= LEVEL
        assert taken < QUEUED - LEVEL // 2  # it came with the queue at the level, not empty
        transport.abort()  # close() would wait for the queue to be read
        await asyncio.sleep(0)
        resume_writing_at(transport, LEVEL)  # a closed transport: nothing, no error
        theirs.close()

    run(scenario())
