"""What the data paths ask of the event loop and its transports, kept cheap: the running
loop without a system call each time (``RunningLoop``), and a transport's word that its
write queue is down to a level (``resume_writing_at``).

Invariant: nothing here holds a loop beyond its life; a closed loop is asked for again.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["RunningLoop", "resume_writing_at"]


class RunningLoop:
    """The running event loop, asked of asyncio once (and again after it closed):
    ``asyncio.get_running_loop()`` makes a getpid() system call, which once per read from
    the server was one call in seven of an agent's round trip (bench/rtt_syscalls.py)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop


def resume_writing_at(transport: asyncio.WriteTransport, level: int) -> None:
    """Have ``transport`` call its protocol's ``resume_writing`` once its write queue is
    down to ``level`` bytes (uvloop checks as each write completes; ``pause_writing``
    comes first while the queue is above it). A closed handle refuses: nothing then."""
    with contextlib.suppress(RuntimeError):
        transport.set_write_buffer_limits(high=level, low=level)
