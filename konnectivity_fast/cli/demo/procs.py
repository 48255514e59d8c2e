"""The demo's processes: started, watched, stopped, and remembered for ``--keep``.

Invariants:
- every process the demo starts is in ``Processes.started`` from the moment it exists, and
  ``stop_all`` ends each of them (SIGTERM, then SIGKILL after ``STOP_SECONDS``), whatever
  made the demo stop: an error, Ctrl-C or SIGTERM;
- without ``--keep``, a child also gets SIGKILL from the kernel when the demo itself dies
  (``PR_SET_PDEATHSIG``), so not even a SIGKILL of the demo leaves one behind;
- with ``--keep``, children run in their own sessions (a Ctrl-C in the terminal does not
  reach them) and ``state.json`` in the demo's folder names them; ``stop_kept`` ends them
  later, checking each pid's start time first so that a reused pid is never signalled;
- output goes to one log file per process in the demo's folder, never to a pipe nobody
  reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "STATE_FILE",
    "STOP_SECONDS",
    "Proc",
    "Processes",
    "read_state",
    "stop_kept",
    "write_state",
]

STATE_FILE = "state.json"
# A proxy-agent drains on the first SIGTERM and stops on the second (as upstream's): the
# second comes after this long, for whatever is still running.
DRAIN_SECONDS = 0.5
# How long a process may take to stop after the second SIGTERM before it is killed.
STOP_SECONDS = 5.0
POLL_SECONDS = 0.05
# Starts a child on a leash: asks the kernel for SIGKILL when its parent (the demo) dies
# (prctl PR_SET_PDEATHSIG = 1), gives up if the demo already died, then becomes the
# command (exec: same pid). A tiny interpreter of its own rather than preexec_fn, which is
# unsafe in a process with threads (the demo has some).
_LEASH = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def leashed(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it dies with this process."""
    return [sys.executable, "-I", "-S", "-c", _LEASH, str(os.getpid()), *argv]


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or
    None when there is no such process: with the pid, it names one process for good."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    return int(stat.rpartition(")")[2].split()[19])


@dataclass
class Proc:
    """One process the demo started."""

    name: str  # e.g. "proxy-server grpc"
    argv: list[str]
    log: str
    pid: int
    started: int | None  # start_time(pid)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return start_time(self.pid) == self.started and self.started is not None

    def log_tail(self, limit: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log).read_text(errors="replace")[-limit:]
        return ""


class Processes:
    """Every process the demo starts, in order."""

    def __init__(self, folder: Path, *, keep: bool, env: dict[str, str]) -> None:
        self.folder = folder
        self.keep = keep
        self.env = env
        self.started: list[Proc] = []

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        log = self.folder / f"{name.replace(' ', '-')}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                list(argv) if self.keep else leashed(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        proc = Proc(name, list(argv), str(log), popen.pid, start_time(popen.pid), popen)
        self.started.append(proc)
        return proc

    def dead(self) -> list[Proc]:
        return [p for p in self.started if not p.alive()]

    def stop_all(self) -> int:
        """Stop every process still running; how many there were."""
        return _stop(self.started)


def _stop(procs: list[Proc]) -> int:
    running = [p for p in reversed(procs) if p.alive()]
    for grace in (DRAIN_SECONDS, STOP_SECONDS):
        for proc in running:
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.alive() for p in running) and time.monotonic() < deadline:
            _reap(running)
            time.sleep(POLL_SECONDS)
    for proc in running:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    _reap(running, wait=True)
    return len(running)


def _reap(procs: list[Proc], wait: bool = False) -> None:
    for proc in procs:
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if wait:
                    proc.popen.wait(timeout=STOP_SECONDS)
                else:
                    proc.popen.poll()
        elif wait:
            deadline = time.monotonic() + STOP_SECONDS
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)


def write_state(folder: Path, procs: list[Proc], extra: dict[str, object]) -> Path:
    """Remember the kept processes (and what else ``stop_kept`` must undo)."""
    path = folder / STATE_FILE
    rows = [
        {"name": p.name, "argv": p.argv, "log": p.log, "pid": p.pid, "started": p.started}
        for p in procs
    ]
    path.write_text(json.dumps({"processes": rows, **extra}, indent=2))
    return path


def read_state(folder: Path) -> tuple[list[Proc], dict[str, object]]:
    data = json.loads((folder / STATE_FILE).read_text())
    procs = [Proc(**row) for row in data.pop("processes")]
    return procs, data


def stop_kept(folder: Path, undo: Callable[[dict[str, object]], None]) -> tuple[int, int]:
    """Stop the processes a ``--keep`` demo left in ``folder``; ``undo`` removes the rest
    of what it set up (namespaces). Returns (stopped, already gone)."""
    procs, extra = read_state(folder)
    gone = sum(1 for p in procs if not p.alive())
    stopped = _stop(procs)
    undo(extra)
    (folder / STATE_FILE).unlink()
    return stopped, gone
