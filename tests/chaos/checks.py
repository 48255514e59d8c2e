"""What every chaos scenario checks on the programs it attacked: descriptors back to their
baseline, memory given back, the program alive, and logs without tracebacks."""

from __future__ import annotations

import asyncio

from .programs import Program

#: How long a program may take to close what an attack left (a TLS close waits up to 1 s
#: for the peer, a refused peer's socket is aborted after 5 s).
SETTLE = 15.0
POLL = 0.1
#: Memory given back: resident set within this fraction above its pre-burst value...
RSS_BACK_WITHIN = 0.20
#: ... within this many seconds of idleness (the issue's minute; the idle trimmer,
#: cli/malloc.py, looks every 2 s).
RSS_BACK_TIMEOUT = 60.0


async def fds_back(program: Program, baseline: int, settle: float = SETTLE) -> int:
    """Wait until the program holds no more descriptors than ``baseline``; its count."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle
    while (fds := program.stats().fds) > baseline:
        assert loop.time() < deadline, f"{program.name}: {fds} fds, baseline {baseline}"
        await asyncio.sleep(POLL)
    return fds


def clean_log(program: Program) -> str:
    """The program's log, asserted free of Python tracebacks and Go panics."""
    log = program.log()
    assert "Traceback (most recent call last)" not in log, log[-3000:]
    assert "panic:" not in log, log[-3000:]
    return log


def alive(program: Program) -> None:
    assert program.alive(), f"{program.name} died:\n{program.log()[-3000:]}"


async def rss_back(
    program: Program, baseline_kib: int, timeout: float = RSS_BACK_TIMEOUT, *, must: bool = True
) -> float | None:
    """Wait, the program idle, until its RSS is within ``RSS_BACK_WITHIN`` of
    ``baseline_kib``; the seconds it took. After ``timeout``: fails if ``must`` (ours),
    else None (upstream's, reported)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    bound = baseline_kib * (1 + RSS_BACK_WITHIN)
    while (rss := program.stats().rss_kib) > bound:
        if loop.time() - started >= timeout:
            assert not must, (
                f"{program.name}: RSS {rss >> 10} MiB after {timeout:.0f} s idle, "
                f"{baseline_kib >> 10} MiB before the burst"
            )
            return None
        await asyncio.sleep(POLL)
    return loop.time() - started
