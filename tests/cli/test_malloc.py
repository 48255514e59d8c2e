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
