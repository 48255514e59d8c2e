"""Process-wide glibc allocator settings for the two long-running programs.

Both programs move data in pieces of up to a few hundred KiB (a socket read, a DATA
payload, a TLS record batch), each allocated and freed within a loop turn. With glibc's
defaults the top of the heap is given back to the kernel (``brk``) as soon as more than
about twice the largest recent piece is free there, and taken back on the next read: every
cycle costs page faults and the kernel zero-filling fresh pages. ``bench/`` measured 10-28 %
less CPU per GiB moved with fixed thresholds like the ones below (bench/README.md).

Invariants: applied once, before the event loop starts; skipped when the C library has no
``mallopt`` (musl) or when the operator already tunes malloc through ``GLIBC_TUNABLES``.
The calls go through the compiled core (``csrc/process.pxi``), not ``ctypes``, which
would stay loaded in both programs for one call.
"""

from __future__ import annotations

import logging
import os

from konnectivity_fast._compiled import require_compiled

log = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Free memory kept at the top of the heap before it is returned to the kernel: a few dozen
# 256 KiB buffers in flight at once, so steady transfers stop trimming and regrowing the
# heap. At most this much idle memory stays mapped after a burst (the buffer budgets allow
# far more while data is in flight).
TRIM_THRESHOLD = 32 << 20
# Allocations above this size get their own mmap. Above the 4 MiB gRPC message limit and
# the engine's output batches, so no per-message mmap/munmap; fixing it also stops glibc
# from lowering the trim threshold again when such a block is freed.
MMAP_THRESHOLD = 8 << 20


def tune_malloc() -> bool:
    """Apply the thresholds; True if they were applied."""
    if "malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    # A missing or stale build fails here, before the import below could load it
    # unchecked; the name comes from the stub, so mypy checks its use (_compiled.py).
    require_compiled()
    from konnectivity_fast._wire import mallopt

    results = (
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    )
    if -1 in results:
        return False  # no mallopt in this C library
    ok = all(r == 1 for r in results)
    if not ok:
        log.warning("mallopt refused the allocator thresholds; using glibc's defaults")
    return ok
