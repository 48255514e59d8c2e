"""Read buffers whose memory is taken only where data lands.

``bytearray(n)`` writes all of its ``n`` zero bytes at once, so every page of a large read
buffer is resident from the start, although an idle program's reads are a few dozen bytes
(keepalive pings, probes). An anonymous private mapping is zero too, but a page becomes
resident only when something is written to it: the proxy-agent, idle with a handful of
connections, keeps a few KiB of its 384 KiB of read buffers instead of all of it
(docs/architecture.md, "The agent's imports").
"""

from __future__ import annotations

import mmap

__all__ = ["zeroed_buffer"]


def zeroed_buffer(size: int) -> memoryview:
    """A writable buffer of ``size`` zero bytes, resident only where written."""
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))
