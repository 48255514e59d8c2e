"""Fixtures of the chaos tests: the form (short by default, long with ``KF_CHAOS=long``,
which ``make chaos`` sets), a loop to run a scenario on, a folder for sockets and logs,
and the programs a test starts, stopped at teardown with their logs shown on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import uvloop

from tests.support.net import Certs, certs
from tests.support.upstream import build as build_upstream

from .programs import Program, upstream_built

__all__ = ["LONG", "Certs", "Chaos", "certs", "impls"]

#: The long form: bigger transfers, longer floods, upstream's figures beside ours for
#: every scenario that has them, and the slow checks (memory given back after a minute).
LONG = os.environ.get("KF_CHAOS", "") == "long"
#: A scenario's own bound (below pytest's): the long form's transfers take longer.
SCENARIO_TIMEOUT = 850.0 if LONG else 180.0
#: Seconds a backend or peer gets to close at the end of a scenario.
CLOSE_TIMEOUT = 10.0


class Closable(Protocol):
    async def close(self) -> None: ...


_Closable = TypeVar("_Closable", bound=Closable)


def impls() -> tuple[str, ...]:
    """The implementations a comparing scenario attacks: ours, and in the long form
    upstream's too (built first if they are not yet: scripts/build-upstream.sh)."""
    if not LONG:
        return ("ours",)
    if not upstream_built():
        build_upstream()
    return ("ours", "upstream")


@dataclass
class Chaos:
    """One test's workdir and programs; ``run`` runs a scenario on a uvloop loop."""

    workdir: Path
    certs: Certs
    programs: list[Program] = field(default_factory=list)
    report: list[str] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)

    def keep(self, program: Program) -> Program:
        self.programs.append(program)
        return program

    def note(self, line: str) -> None:
        """A figure for the report printed at the end of the test (``-s`` or a failure)."""
        self.report.append(line)
        print(line)

    def closing(self, thing: _Closable) -> _Closable:
        """Close ``thing`` (a backend...) when the scenario ends, passed or failed: a
        server left open on the loop keeps the loop from closing."""
        self.closers.append(thing)
        return thing

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async def guarded() -> Any:
            try:
                return await asyncio.wait_for(coro, SCENARIO_TIMEOUT)
            finally:
                for thing in reversed(self.closers):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(thing.close(), CLOSE_TIMEOUT)
                self.closers.clear()

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(guarded())


@pytest.fixture
def chaos(certs: Certs) -> Iterator[Chaos]:
    # Unix socket paths must be short: not pytest's tmp_path.
    with tempfile.TemporaryDirectory(prefix="kf-chaos-") as d:
        env = Chaos(Path(d), certs)
        try:
            yield env
        finally:
            for program in reversed(env.programs):
                program.stop()
            for program in env.programs:
                tail = program.log()[-3000:]
                print(f"--- {program.name} (exit {program.proc and program.proc.poll()}) ---")
                print(tail)
