"""Child processes of the echo benchmark, and what the kernel says about them.

Every child is started in its own session (Ctrl-C in the terminal reaches only the
orchestrator, which then kills its children) with ``PR_SET_PDEATHSIG`` = SIGKILL, so a
child never outlives an orchestrator killed with SIGKILL. ``Children.kill_all`` ends every
child still running, by its pid, and closes its pipes. Children talk in lines on their
stdout; ``Child.expect`` reads them with a deadline, so no wait is unbounded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

REPO_ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Seconds a child gets to exit after SIGTERM before SIGKILL.
TERM_GRACE = 3.0
# Bytes of a child's stderr shown when it fails.
STDERR_TAIL = 3000
_PR_SET_PDEATHSIG = 1


class ChildError(RuntimeError):
    """A child died, said something unexpected, or was too slow."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU time spent by every CPU of the machine on anything but idling, in seconds."""
    with open("/proc/stat", "rb") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    # already counted in user.
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size of the process, KiB (VmRSS)."""
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    raise ChildError(f"pid {pid}: no VmRSS in /proc/{pid}/status")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Child:
    """One child process speaking lines on stdin/stdout; stderr goes to a log file."""

    def __init__(self, name: str, args: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
            # The orchestrator runs no threads, so preexec_fn is safe here.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        self.pid = self.proc.pid
        self._buf = b""

    def write_line(self, line: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(line.encode() + b"\n")
            stdin.flush()
        except BrokenPipeError as exc:
            raise ChildError(f"{self.name}: exited early{self._tail()}") from exc

    def read_line(self, timeout: float) -> str:
        """The next line of the child's stdout, within ``timeout`` seconds."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildError(f"{self.name}: no answer within {timeout:.0f} s{self._tail()}")
            ready, _, _ = select.select([stdout], [], [], left)
            if ready:
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    self.proc.wait(TERM_GRACE)
                    raise ChildError(
                        f"{self.name}: exited with {self.proc.returncode}{self._tail()}"
                    )
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, word: str, timeout: float) -> str:
        """Read a line that starts with ``word``; the rest of it."""
        line = self.read_line(timeout)
        head, _, rest = line.partition(" ")
        if head != word:
            raise ChildError(f"{self.name}: expected {word!r}, got {line[:200]!r}{self._tail()}")
        return rest

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        """Wait for a normal exit; kill the child if it takes longer. The exit code."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise ChildError(f"{self.name}: did not exit within {timeout:.0f} s") from None

    def kill(self) -> None:
        """SIGTERM, then SIGKILL after ``TERM_GRACE``; reap it and close the pipes."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TERM_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()

    def close(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()
        if not self._log.closed:
            self._log.close()

    def _tail(self) -> str:
        try:
            text = self.log_path.read_bytes()[-STDERR_TAIL:].decode(errors="replace")
        except OSError:
            return ""
        return f"\n--- {self.name} stderr (tail) ---\n{text}" if text.strip() else ""


class Children:
    """Every child started by one benchmark run, so all can be ended at once."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._all: list[Child] = []
        self._count = 0

    def start(self, name: str, args: list[str]) -> Child:
        self._count += 1
        child = Child(name, args, self.log_dir / f"{self._count:03d}-{name}.log")
        self._all.append(child)
        return child

    def finish(self, child: Child, timeout: float) -> int:
        """Wait for ``child`` to exit by itself (bounded) and forget it; its exit code."""
        try:
            return child.wait(timeout)
        finally:
            child.close()
            self._all.remove(child)

    def stop(self, child: Child) -> None:
        """Kill ``child`` and forget it."""
        child.kill()
        if child in self._all:
            self._all.remove(child)

    def kill_all(self) -> None:
        while self._all:
            self._all.pop().kill()
