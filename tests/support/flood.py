"""A peer that sends without reading, and what it finds out about the server.

``flood_without_reading`` writes the same chunk again and again on a non-blocking socket
(one write per loop turn, so that a server in the same process gets its turns) and never
reads. It stops when the server stops taking its bytes (its writes stay blocked for
``STALLED`` seconds: the server no longer reads), when the server closes, or once the
server has taken ``KEEPS_READING`` bytes: far more than the socket buffers of a peer that
is no longer read can hold, so a server that got that far reads and throws away.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

__all__ = ["KEEPS_READING", "STALLED", "Flood", "flood_without_reading"]

#: Bytes a server that still reads would take; a few hundred KiB fill a stopped one.
KEEPS_READING = 32 << 20
#: Seconds the peer's writes must stay blocked to count as "no longer read".
STALLED = 2.0


@dataclass
class Flood:
    sent: int
    outcome: str  # "stopped reading", "closed" or "kept reading"


async def flood_without_reading(
    sock: socket.socket, chunk: bytes, limit: int = KEEPS_READING
) -> Flood:
    """Send ``chunk`` repeatedly on ``sock`` (non-blocking, connected) without reading."""
    loop = asyncio.get_running_loop()
    sent = 0
    while sent < limit:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, chunk), STALLED)
            except TimeoutError:
                return Flood(sent, "stopped reading")
            except (BrokenPipeError, ConnectionResetError):
                return Flood(sent, "closed")
            sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return Flood(sent, "closed")
        await asyncio.sleep(0)
    return Flood(sent, "kept reading")


async def flood_stream(
    writer: asyncio.StreamWriter, chunk: bytes, limit: int = KEEPS_READING
) -> Flood:
    """``flood_without_reading`` over an asyncio stream (TLS included): the transport's
    ``drain`` staying blocked for ``STALLED`` seconds means the server stopped reading."""
    sent = 0
    while sent < limit:
        try:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), STALLED)
        except TimeoutError:
            return Flood(sent, "stopped reading")
        except (ConnectionError, OSError, RuntimeError):
            # RuntimeError: uvloop's "the handler is closed" once the server closed.
            return Flood(sent, "closed")
        sent += len(chunk)
    return Flood(sent, "kept reading")
