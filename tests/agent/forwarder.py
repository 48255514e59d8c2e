"""A tiny TCP load balancer on 127.0.0.1 for HA tests: each accepted connection is piped to
the next target in turn (``round-robin``) or always to the first (``sticky``, like source
affinity from one client address)."""

from __future__ import annotations

import asyncio
import contextlib

from .support import LOOPBACK

# Bytes per read while piping.
PIPE_CHUNK = 1 << 16


class Forwarder:
    def __init__(self, targets: list[int], mode: str = "round-robin") -> None:
        self.targets = targets
        self.mode = mode
        self.server: asyncio.Server | None = None
        self._next = 0
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    def _pick(self) -> int:
        if self.mode == "sticky":
            return self.targets[0]
        port = self.targets[self._next % len(self.targets)]
        self._next += 1
        return port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self._pick())
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(PIPE_CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()
