"""The allocator thresholds: applied in a fresh interpreter, they keep a freed 4 MiB block
on the heap instead of giving it back to the kernel; skipped under GLIBC_TUNABLES."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Prints the heap's mmapped bytes while a 4 MiB block is held, and the heap size after it
# was freed (glibc's mallinfo2).
_PROBE = r"""
import ctypes, sys
from konnectivity_fast.cli.malloc import tune_malloc

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = tune_malloc() if sys.argv[1] == "tune" else False
block = libc.malloc(4 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(block)
print(applied, mapped, libc.mallinfo2().arena)
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[bool, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


@pytest.fixture(autouse=True)
def _glibc_only() -> None:
    if os.confstr("CS_GNU_LIBC_VERSION") is None:
        pytest.fail("these programs are shipped on glibc; this test needs it")


def test_defaults_map_and_trim_a_large_block() -> None:
    applied, mapped, arena = _probe("plain", {"GLIBC_TUNABLES": ""})
    assert not applied
    assert mapped >= 4 << 20  # glibc's 128 KiB default threshold: a block of its own
    assert arena < 4 << 20


def test_tuned_keeps_the_block_on_the_heap() -> None:
    applied, mapped, arena = _probe("tune", {"GLIBC_TUNABLES": ""})
    assert applied
    assert mapped < 4 << 20
    assert arena >= 4 << 20  # freed, but not trimmed: below TRIM_THRESHOLD


def test_operator_tunables_win() -> None:
    applied, mapped, _ = _probe("tune", {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"})
    assert not applied
    assert mapped >= 4 << 20


# A burst the way the programs make one: many 128 KiB payloads (a DATA read each), with the
# thresholds applied, then all but a few freed. Prints RSS (MiB) after the burst, then after
# a look at a busy process, then after a look at the same process idle.
_BURST = r"""
import sys
from konnectivity_fast.cli.malloc import IdleTrimmer, _malloc_trim, _rss_bytes, tune_malloc

tune_malloc()
clock, cpu = Fake(), Fake()
trimmer = IdleTrimmer(_malloc_trim(), cpu=cpu, clock=clock)
start = trimmer.baseline >> 20
held = [bytes(128 << 10) for _ in range(1600)]
kept = held[::100]  # a few survive, scattered over the heap: nothing is at its top
del held
mib = lambda: _rss_bytes() >> 20
burst = mib()
clock.now, cpu.now = 10.0, 5.0  # half a core since the start: busy
busy_trimmed = trimmer.check()
after_busy = mib()
clock.now, cpu.now = 20.0, 5.01  # idle since the last look
idle_trimmed = trimmer.check()
print(busy_trimmed, idle_trimmed, start, burst, after_busy, mib())
"""


# What the scripts below read for a clock, a CPU time or a count: the value set last.
_FAKE = r"""
class Fake:
    def __init__(self):
        self.now = 0
    def __call__(self):
        return self.now
"""


def run_script(script: str) -> list[str]:
    """``script`` (with ``Fake``) in a fresh interpreter with the thresholds free to apply:
    its printed words."""
    return subprocess.run(
        [sys.executable, "-c", _FAKE + script],
        env={**os.environ, "GLIBC_TUNABLES": ""},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()


def test_an_idle_process_gives_a_burst_back_and_a_busy_one_keeps_it() -> None:
    out = run_script(_BURST)
    busy_trimmed, idle_trimmed = out[0] == "True", out[1] == "True"
    start, burst, after_busy, after_idle = (int(x) for x in out[2:])
    assert burst >= start + 100  # most of the 200 MiB burst is still resident
    assert not busy_trimmed and after_busy >= start + 100
    assert idle_trimmed
    assert after_idle <= start + 20, (start, burst, after_idle)


# Garbage in reference cycles the way a flood of connections leaves it (each object points
# at itself), with the automatic collector off as in a process that allocates nothing more:
# the idle trimmer collects it before trimming. Prints RSS (MiB) at the start, after the
# burst, and after the idle look.
_CYCLES = r"""
import gc
from konnectivity_fast.cli.malloc import IdleTrimmer, _malloc_trim, _rss_bytes, tune_malloc

class Conn:
    def __init__(self):
        self.me = self
        self.buf = [bytes(64) for _ in range(40)]

tune_malloc()
gc.disable()
clock, cpu = Fake(), Fake()
trimmer = IdleTrimmer(_malloc_trim(), cpu=cpu, clock=clock)
mib = lambda: _rss_bytes() >> 20
start = mib()
for _ in range(100_000):
    Conn()
burst = mib()
clock.now, cpu.now = 10.0, 0.01
trimmer.check()
print(start, burst, mib())
"""


def test_the_idle_trimmer_collects_cyclic_garbage_first() -> None:
    out = run_script(_CYCLES)
    start, burst, after = (int(x) for x in out)
    assert burst >= start + 100, (start, burst)  # the cycles are still there
    assert after <= start + 20, (start, burst, after)


# A trimmer on fake clocks (and a fake count of closed connections), and a 200 MiB burst
# held in ``held``: how the churn scripts below begin. ``start`` is RSS (MiB) before it.
_TRIMMER_AND_BURST = r"""
from konnectivity_fast.cli.malloc import (
    TRIM_AFTER_CLOSED, IdleTrimmer, _malloc_trim, _rss_bytes, tune_malloc,
)

tune_malloc()
clock, cpu, closed = Fake(), Fake(), Fake()
trimmer = IdleTrimmer(_malloc_trim(), cpu=cpu, clock=clock, closed=closed)
mib = lambda: _rss_bytes() >> 20
start = mib()
held = [bytes(128 << 10) for _ in range(1600)]
"""


# The same burst in a process that is never idle, as a server whose agents join and leave
# in rounds: a busy look trims only once TRIM_AFTER_CLOSED connections closed since the
# last trim. Prints whether each look trimmed, and RSS (MiB) at the start and at the end.
_CHURN = (
    _TRIMMER_AND_BURST
    + r"""
kept = held[::100]
del held
closed.now = TRIM_AFTER_CLOSED - 1  # a few connections closed: no reason yet
clock.now, cpu.now = 10, 5
few = trimmer.check()
closed.now = TRIM_AFTER_CLOSED + 10  # a round of agents left
clock.now, cpu.now = 20, 10
many = trimmer.check()
print(few, many, start, mib())
"""
)


def test_a_busy_process_is_trimmed_after_many_connections_closed() -> None:
    out = run_script(_CHURN)
    few, many = out[0] == "True", out[1] == "True"
    start, end = int(out[2]), int(out[3])
    assert not few
    assert many and end <= start + 20, (start, end)


def test_a_look_without_descriptors_is_skipped_not_fatal() -> None:
    """Out of descriptors, /proc cannot be opened: the look is skipped, the next one
    works (the trimmer task must outlive an exhaustion; it once ended the server with
    exit code 1 at shutdown)."""
    from konnectivity_fast.cli.malloc import IdleTrimmer

    reads: list[int] = []

    def rss() -> int:
        reads.append(1)
        if len(reads) == 2:
            raise OSError(24, "Too many open files")
        return 100 << 20

    trimmed: list[int] = []
    trimmer = IdleTrimmer(lambda: trimmed.append(1) or 0, rss=rss, cpu=lambda: 0.0)
    assert trimmer.look() is False  # the failed read
    assert trimmer.look() is False  # a normal look: idle but not grown
    assert len(reads) == 3 and not trimmed


# A busy trim while the burst is still alive (a reset flood whose connections come and go),
# then the burst freed and the process idle: the idle look gives it back, as without the
# busy trim. Prints whether each look trimmed, and RSS (MiB) at the start and at the end.
_LIVE_DURING_BUSY_TRIM = (
    _TRIMMER_AND_BURST
    + r"""
closed.now = TRIM_AFTER_CLOSED + 10
clock.now, cpu.now = 10, 5
busy = trimmer.check()  # the burst is alive: little to give back
kept = held[::100]
del held
clock.now, cpu.now = 20, 5.01  # idle since
idle = trimmer.check()
print(busy, idle, start, mib())
"""
)


def test_an_idle_look_gives_back_a_burst_that_lived_through_a_busy_trim() -> None:
    out = run_script(_LIVE_DURING_BUSY_TRIM)
    busy, idle = out[0] == "True", out[1] == "True"
    start, end = int(out[2]), int(out[3])
    assert busy
    assert idle and end <= start + 20, (start, end)
