"""What an agent and a proxy-server say to each other, in plain text: a TLS-terminating
relay between them, and a reading of what it recorded.

``TlsRecorder`` listens on 127.0.0.1 with the test server certificate (the agent verifies
it against the test CA, as it would the real server's), and opens for each accepted
connection its own TLS connection to the server with the test client certificate; both
sides negotiate ``h2`` by ALPN. Each direction's decrypted bytes are recorded, and
``Exchange`` reads them back as HTTP/2: per stream, its header blocks (decoded with
libnghttp2's HPACK inflater, through tests/h2/conftest.py's ``HpackDecoder``) and its gRPC
messages. Packet types come from the official protobuf runtime (tests/oracle.py), not from
our codec.

The relay runs its own asyncio loop in a daemon thread: one thread per TLS connection
would read and write one OpenSSL object from two threads. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from konnectivity_fast.wire.packets import PacketType
from tests.h2.conftest import HpackDecoder
from tests.support.oracle import pb2

from .capture import CHUNK, DATA_FRAME, frames, unpad

LOOPBACK = "127.0.0.1"
HEADERS_FRAME = 0x1
CONTINUATION_FRAME = 0x9
FLAG_END_HEADERS = 0x4
FLAG_PRIORITY = 0x20
GRPC_PREFIX = 5  # compressed flag and 4-byte length (gRPC over HTTP/2)
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.05


@dataclass
class Recording:
    """One relayed connection: the bytes each way, decrypted."""

    to_server: bytearray = field(default_factory=bytearray)
    to_client: bytearray = field(default_factory=bytearray)


class TlsRecorder:
    """A TLS relay to ``target_port`` on 127.0.0.1; ``port`` is where it listens."""

    def __init__(self, target_port: int, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext):
        self.target_port = target_port
        self.server_ctx = server_ctx
        self.client_ctx = client_ctx
        self.connections: list[Recording] = []
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="relay", daemon=True)
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self.loop)
        self.port = started.result(WAIT_SECONDS)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._relay, LOOPBACK, 0, ssl=self.server_ctx)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection(
                LOOPBACK, self.target_port, ssl=self.client_ctx, server_hostname="localhost"
            )
            writers.append(up_writer)
            record = Recording()
            self.connections.append(record)
            await asyncio.gather(
                self._pump(reader, up_writer, record.to_server),
                self._pump(up_reader, writer, record.to_client),
            )
        except OSError:
            pass
        finally:
            for each in writers:  # at once: no TLS close_notify exchange to wait for
                each.transport.abort()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, record: bytearray
    ) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            while data := await reader.read(CHUNK):
                record += data
                writer.write(data)
                await writer.drain()
            writer.write_eof()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(WAIT_SECONDS)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(WAIT_SECONDS)
        self.loop.close()

    def wait_for(self, ready: Callable[[Exchange], bool], what: str) -> Exchange:
        """Poll the first connection's recording until ``ready`` holds for it."""
        return poll_exchange(lambda: self.connections[0] if self.connections else None, ready, what)


def poll_exchange(
    recording: Callable[[], Recording | None], ready: Callable[[Exchange], bool], what: str
) -> Exchange:
    """Read ``recording()`` (None: nothing yet) as HTTP/2 until ``ready`` holds for it."""
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        record = recording()
        if record is not None:
            exchange = Exchange.of(record)
            if ready(exchange):
                return exchange
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out waiting for {what} on the relay")


@contextlib.contextmanager
def tls_recorder(
    target_port: int, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> Iterator[TlsRecorder]:
    recorder = TlsRecorder(target_port, server_ctx, client_ctx)
    try:
        yield recorder
    finally:
        recorder.close()


@dataclass
class Stream:
    """One HTTP/2 stream as one direction carried it."""

    header_blocks: list[list[tuple[str, str]]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)

    def messages(self) -> list[bytes]:
        """The complete gRPC messages (without their 5-byte prefix)."""
        out, pos = [], 0
        while pos + GRPC_PREFIX <= len(self.data):
            length = int.from_bytes(self.data[pos + 1 : pos + GRPC_PREFIX], "big")
            if pos + GRPC_PREFIX + length > len(self.data):
                break
            out.append(bytes(self.data[pos + GRPC_PREFIX : pos + GRPC_PREFIX + length]))
            pos += GRPC_PREFIX + length
        return out

    def packet_types(self) -> list[str]:
        """The Packet type of each message, runs of DATA shown once (how a backend's
        bytes are cut into DATA packets is not part of the protocol)."""
        names: list[str] = []
        for message in self.messages():
            name = PacketType(pb2().Packet.FromString(message).type).name
            if not (name == "DATA" and names[-1:] == ["DATA"]):
                names.append(name)
        return names

    def header_keys(self, index: int) -> list[str]:
        """The keys of the index-th header block, sorted (HPACK may reorder nothing, but
        two implementations write the same keys in different orders)."""
        return sorted(key for key, _ in self.header_blocks[index])


@dataclass
class Exchange:
    """A recorded connection read as HTTP/2: streams by id, for each direction."""

    requests: dict[int, Stream]  # what the client (the agent) sent
    responses: dict[int, Stream]  # what the server sent

    @classmethod
    def of(cls, record: Recording) -> Exchange:
        return cls(_streams(bytes(record.to_server)), _streams(bytes(record.to_client)))

    def stream_of(self, path: str) -> int:
        """The id of the first stream whose request was for ``path``."""
        for stream_id, stream in sorted(self.requests.items()):
            if stream.header_blocks and (":path", path) in stream.header_blocks[0]:
                return stream_id
        raise AssertionError(f"no {path} stream was recorded")


def _streams(raw: bytes) -> dict[int, Stream]:
    decoder = HpackDecoder()  # one dynamic table per direction, as HPACK has
    streams: dict[int, Stream] = {}
    block = bytearray()
    for ftype, flags, stream_id, body in frames(raw):
        stream = streams.setdefault(stream_id, Stream())
        if ftype == DATA_FRAME:
            stream.data += unpad(flags, body)
            continue
        if ftype == HEADERS_FRAME:
            fragment = unpad(flags, body)
            block = bytearray(fragment[5:] if flags & FLAG_PRIORITY else fragment)
        elif ftype == CONTINUATION_FRAME:
            block += body
        else:
            continue
        if flags & FLAG_END_HEADERS:
            stream.header_blocks.append(decoder.decode(bytes(block)))
    return streams
