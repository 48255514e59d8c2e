"""Tunnels through a proxy-server process, for the chaos tests: transfers whose bytes are
checked with SHA-256, and probes that keep making round trips beside an attack.

- ``Source``: a TCP backend (in this process) that sends every connection the same random
  blob, whose SHA-256 the test knows, then closes it (which ends the tunnel); with
  ``reset_after`` it resets the connection (SO_LINGER 0) after that many bytes, with
  ``half_close`` it shuts down its sending side after the blob and keeps reading until
  the tunnel closes it.
- ``download``: one tunnel to a backend (HTTP-CONNECT or gRPC frontend), reading until
  the tunnel ends; its bytes, their hash and how it ended.
  ``read_to_end``: the same on any connection already open.
- ``Prober``: an echo round trip through a fresh tunnel every ``PROBE_INTERVAL``, with its
  latencies and failures; ``flowing()`` waits for a few more successes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import statistics
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.support.agent_peer import (
    GrpcDialer,
    Packet,
    close_req,
    connect_request,
    data,
    ptype,
)

#: A tunnel that gives no byte for this long is stuck.
STALL = 20.0
#: Seconds between two probes, and what one probe echoes.
PROBE_INTERVAL = 0.05
PROBE_PAYLOAD = b"chaos probe " * 8
#: Probes that must succeed for ``flowing()``.
PROBES_AFTER = 3
RESPONSE_200 = b"HTTP/1.1 200 Connection Established\r\n\r\n"


@dataclass
class Source:
    """A backend sending ``blob`` to each connection; see the module docstring."""

    blob: bytes
    reset_after: int | None = None
    half_close: bool = False
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    sent: int = 0  # bytes the tunnels took from this backend so far

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.blob).hexdigest()

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> Source:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            end = len(self.blob) if self.reset_after is None else self.reset_after
            view = memoryview(self.blob)[:end]
            for i in range(0, len(view), 256 << 10):
                piece = view[i : i + (256 << 10)]
                writer.write(piece)
                await writer.drain()
                self.sent += len(piece)
            if self.reset_after is not None:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            if self.half_close:
                writer.write_eof()
                await reader.read()  # until the tunnel's end closes it
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)


def random_blob(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class Transfer:
    data: bytes
    ended: str  # "eof", "reset", "refused: <status line>", "stalled"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


async def http_tunnel(uds: str, address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """An established HTTP-CONNECT tunnel; raises ``ConnectionError`` with the server's
    answer if it is not a 200."""
    reader, writer = await asyncio.open_unix_connection(uds, limit=1 << 20)
    writer.write(connect_request(address))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STALL)
    if head != RESPONSE_200:
        writer.close()
        raise ConnectionError(f"refused: {head.splitlines()[0]!r}")
    return reader, writer


async def download(uds: str, address: str, mode: str = "http-connect") -> Transfer:
    """Read everything one tunnel to ``address`` gives, until it ends."""
    if mode == "grpc":
        return await _grpc_download(uds, address)
    try:
        reader, writer = await http_tunnel(uds, address)
    except ConnectionError as exc:
        return Transfer(b"", str(exc))
    return await read_to_end(reader, writer)


async def consume(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, take: Callable[[bytes], bool]
) -> str:
    """Hand what one connection gives to ``take`` until it ends, then close it; how it
    ended: ``eof``, ``reset``, ``stalled`` (``STALL`` without a byte), or ``too long``
    (``take`` returned False)."""
    try:
        while chunk := await asyncio.wait_for(reader.read(1 << 20), STALL):
            if not take(chunk):
                return "too long"
    except TimeoutError:
        return "stalled"
    except (ConnectionError, OSError):
        return "reset"
    finally:
        writer.close()
    return "eof"


async def read_to_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Transfer:
    """Read one connection until it ends (EOF, reset, or ``STALL`` without a byte)."""
    got = bytearray()

    def take(chunk: bytes) -> bool:
        got.extend(chunk)
        return True

    ended = await consume(reader, writer, take)
    return Transfer(bytes(got), ended)


async def _grpc_download(uds: str, address: str) -> Transfer:
    dialer = GrpcDialer(f"unix:{uds}", None)
    got = bytearray()
    ended = "eof"
    try:
        stream = dialer.stream()
        rsp = await stream.dial(address, int.from_bytes(os.urandom(7), "big"))
        if ptype(rsp) != "DIAL_RSP" or rsp.dialResponse.error:
            return Transfer(b"", f"refused: {rsp}")
        while True:
            packet: Packet | None = await stream.recv(STALL)
            if packet is None or ptype(packet) == "CLOSE_RSP":
                break
            if ptype(packet) == "DATA":
                got += packet.data.data
    except TimeoutError:
        ended = "stalled"
    except Exception as exc:  # grpcio's errors: the stream broke
        ended = f"reset ({type(exc).__name__})"
    finally:
        await dialer.close()
    return Transfer(bytes(got), ended)


@dataclass
class Prober:
    """Echo round trips through the server, one fresh tunnel each (a new dial each time,
    so that routing and the agent are exercised, not only an established tunnel)."""

    uds: str
    echo_address: str
    mode: str = "http-connect"
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    stopped: bool = False

    def start(self) -> Prober:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def once(self) -> float:
        started = time.perf_counter()
        if self.mode == "grpc":
            dialer = GrpcDialer(f"unix:{self.uds}", None)
            try:
                stream = dialer.stream()
                cid = await stream.connect(self.echo_address, int.from_bytes(os.urandom(7), "big"))
                await stream.send(data(cid, PROBE_PAYLOAD))
                assert await stream.read_data(cid, len(PROBE_PAYLOAD)) == PROBE_PAYLOAD
                await stream.send(close_req(cid))
            finally:
                await dialer.close()
        else:
            reader, writer = await http_tunnel(self.uds, self.echo_address)
            try:
                writer.write(PROBE_PAYLOAD)
                got = await asyncio.wait_for(reader.readexactly(len(PROBE_PAYLOAD)), STALL)
                assert got == PROBE_PAYLOAD
            finally:
                writer.close()
        return time.perf_counter() - started

    async def _run(self) -> None:
        while not self.stopped:
            try:
                self.latencies.append(await asyncio.wait_for(self.once(), STALL))
            except Exception as exc:  # a probe that failed: recorded, and on we go
                self.failures.append(f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(PROBE_INTERVAL)

    async def flowing(self, timeout: float = STALL) -> None:
        """Wait until ``PROBES_AFTER`` more probes succeeded."""
        target = len(self.latencies) + PROBES_AFTER
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.latencies) < target:
            assert self.task is not None and not self.task.done(), "the prober stopped"
            assert loop.time() < deadline, f"probes stalled; failures: {self.failures[-3:]}"
            await asyncio.sleep(PROBE_INTERVAL)

    def summary(self) -> str:
        if not self.latencies:
            return f"no probe succeeded, {len(self.failures)} failed"
        ms = sorted(1000 * x for x in self.latencies)
        return (
            f"probes p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms, "
            f"{len(ms)} ok, {len(self.failures)} failed"
        )

    async def close(self) -> None:
        """``stop``, for ``Chaos.closing``: a scenario that fails still stops its probes."""
        await self.stop()

    async def stop(self) -> None:
        # Python 3.11's wait_for may swallow a cancellation that comes as its inner call
        # completes: the flag ends the loop anyway, and waiting with asyncio.wait (not
        # by awaiting the task under suppress(CancelledError)) never swallows a
        # cancellation of the caller's own.
        self.stopped = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task], timeout=STALL)
