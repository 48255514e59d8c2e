"""Hostile peers for the chaos tests, each aimed at one listener of a proxy-server process.

- ``h2_flood``: HTTP/2 control frames (SETTINGS, PING, ...) a few at a time from a peer
  that never reads (``tests/support/flood.py`` tells whether the server stopped reading it
  or closed it).
- ``pipelined_flood``: HTTP/1.1 requests pipelined by a client that never reads the
  answers (HTTP-CONNECT frontends, health and admin servers).
- ``slowloris``: connections that send half a request head and wait.
- ``reading_flood``: SETTINGS frames by the thousand from a peer that reads everything the
  server answers: only a flood limit (GOAWAY ENHANCE_YOUR_CALM) stops it.
- ``reset_flood``: an authenticated agent connection opening Connect streams and resetting
  them at once (HTTP/2 "rapid reset"), reconnecting whenever the server cuts it off.
- ``flap``: an authenticated agent connecting again and again with a live agent's ID
  (TLS handshake, Connect, the server's response headers, hang up).
- ``bogus_packets``: an authenticated agent (grpcio) sending packets the server must
  decode and reject, built by the official protobuf runtime: DATA, CLOSE_RSP and DIAL_RSP
  for connections and dials that do not exist, and (``mismatched``) packets whose payload
  is not their type's.

Raw frames come from ``tests/support/h2frames.py``; nothing here uses our codec or engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Sequence

from tests.support.agent_peer import TestAgent, agent_credentials
from tests.support.flood import Flood, flood_stream
from tests.support.h2frames import (
    ACK,
    GOAWAY,
    HEADERS,
    PREFACE,
    SETTINGS,
    Frame,
    headers_frame,
    rst_stream,
    settings_frame,
)
from tests.support.net import Certs
from tests.support.oracle import pb2

from .programs import LOOPBACK

#: Frames per write of an HTTP/2 flood: each read of the server holds fewer than the
#: engine's MAX_OUTBOUND_ACK, so only the listener's own backpressure can stop it.
FRAMES_PER_WRITE = 20
#: HEADERS + RST_STREAM pairs per write of a reset flood.
RESET_PAIRS_PER_WRITE = 50
CONNECT_TIMEOUT = 10.0
#: SETTINGS frames per write of a reading flood, and the most it sends in all: far more
#: than any flood budget (csrc/h2_flood.pxi CONTROL_FRAME_BURST), so a server that keeps
#: answering has no limit.
READING_FLOOD_BATCH = 100
READING_FLOOD_FRAMES = 200_000

#: The bogus packet upstream's server does not survive: a DATA packet carrying a
#: CLOSE_RSP payload (pkg/server/server.go serveRecvBackend reads the payload unchecked).
CRASHES_UPSTREAM = "mismatched"

Target = str | tuple[str, int]


def tls_client(certs: Certs | None, alpn: str, client_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if certs is None:
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(certs.ca)
        if client_cert:
            ctx.load_cert_chain(certs.client_cert, certs.client_key)
    ctx.set_alpn_protocols([alpn])
    return ctx


async def _open(
    target: Target, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if isinstance(target, str):
        return await asyncio.wait_for(
            asyncio.open_unix_connection(target, ssl=tls), CONNECT_TIMEOUT
        )
    host, port = target
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=tls, server_hostname="localhost" if tls else None),
        CONNECT_TIMEOUT,
    )


async def _flood(target: Target, tls: ssl.SSLContext | None, first: bytes, chunk: bytes) -> Flood:
    try:
        _, writer = await _open(target, tls)
    except (OSError, TimeoutError) as exc:
        return Flood(0, f"refused: {exc}")
    try:
        writer.write(first)
        return await flood_stream(writer, chunk)
    finally:
        writer.transport.abort()


async def h2_flood(target: Target, tls: ssl.SSLContext | None, unit: bytes) -> Flood:
    """``unit`` frames, FRAMES_PER_WRITE at a time, after the preface; never reading."""
    return await _flood(target, tls, PREFACE + settings_frame(), unit * FRAMES_PER_WRITE)


async def pipelined_flood(target: Target, tls: ssl.SSLContext | None, request: bytes) -> Flood:
    """``request`` again and again on one connection, never reading the answers."""
    return await _flood(target, tls, b"", request * 50)


@contextlib.asynccontextmanager
async def slowloris(host: str, port: int, count: int) -> AsyncIterator[list[asyncio.StreamWriter]]:
    """``count`` connections holding half a request head each, for the block's length."""
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(count):
            with contextlib.suppress(OSError, TimeoutError):
                _, writer = await _open((host, port), None)
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                writers.append(writer)
        yield writers
    finally:
        for writer in writers:
            writer.transport.abort()


def _connect_headers(agent_id: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/AgentService/Connect"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("agentid", agent_id),
    ]


async def reset_flood(port: int, certs: Certs, agent_id: str, seconds: float) -> tuple[int, int]:
    """Connect streams opened and reset at once for ``seconds``, over new connections
    whenever the server cuts one; (streams sent, connections used). Reads what the server
    sends, so that only its own limits stop the flood."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    tls = tls_client(certs, "h2")
    streams = connections = 0
    while loop.time() < deadline:
        try:
            reader, writer = await _open((LOOPBACK, port), tls)
        except (OSError, TimeoutError):
            await asyncio.sleep(0.05)
            continue
        connections += 1
        drain = loop.create_task(_discard(reader))
        try:
            writer.write(PREFACE + settings_frame())
            sid = 1
            while loop.time() < deadline and not drain.done():
                writer.write(
                    b"".join(
                        headers_frame(s, _connect_headers(agent_id)) + rst_stream(s)
                        for s in range(sid, sid + 2 * RESET_PAIRS_PER_WRITE, 2)
                    )
                )
                sid += 2 * RESET_PAIRS_PER_WRITE
                streams += RESET_PAIRS_PER_WRITE
                await asyncio.wait_for(writer.drain(), CONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.transport.abort()
            drain.cancel()
            await asyncio.wait([drain])  # never swallows a cancellation of ours
    return streams, connections


async def _discard(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(1 << 16):
            pass


def bogus(kind: str, n: int) -> object:
    """The ``n``-th packet of ``kind`` (protobuf runtime, not our codec)."""
    m = pb2()
    unknown = (1 << 40) + n
    if kind == "data-unknown":
        return m.Packet(type=m.DATA, data=m.Data(connectID=unknown, data=b"x" * 64))
    if kind == "close-rsp-unknown":
        return m.Packet(type=m.CLOSE_RSP, closeResponse=m.CloseResponse(connectID=unknown))
    if kind == "dial-rsp-unknown":
        return m.Packet(
            type=m.DIAL_RSP, dialResponse=m.DialResponse(random=unknown, connectID=unknown)
        )
    if kind == "mismatched":  # a DATA packet carrying a CLOSE_RSP: upstream's server panics
        return m.Packet(type=m.DATA, closeResponse=m.CloseResponse(connectID=unknown))
    if kind == "empty":  # no type, no payload: a DIAL_REQ without its request
        return m.Packet()
    raise ValueError(kind)


async def bogus_packets(port: int, certs: Certs, kinds: Sequence[str], count: int) -> TestAgent:
    """An agent connection that sends ``count`` packets of each of ``kinds``, or fewer if
    the server ends its stream first; returned open (the caller closes it) so that the
    server's answers can be looked at."""
    creds = agent_credentials(certs.ca_pem, certs.client_cert_pem, certs.client_key_pem)
    agent = TestAgent(f"{LOOPBACK}:{port}", creds, agent_id="bogus-agent")
    await agent.start()
    for kind in kinds:
        for n in range(count):
            if agent.status is not None:  # the server ended the stream: nobody reads
                return agent
            try:
                await asyncio.wait_for(agent.send(bogus(kind, n)), CONNECT_TIMEOUT)
            except TimeoutError:  # the stream is gone and its send queue full
                return agent
    return agent


class FrameReader:
    """Whole HTTP/2 frames out of a byte stream that arrives in pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            head = bytes(self._buf[: 9 + length])
            del self._buf[: 9 + length]
            sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            frames.append(Frame(head[3], head[4], sid, head[9:]))
        return frames


async def reading_flood(target: Target, tls: ssl.SSLContext | None) -> Flood:
    """SETTINGS frames, ``READING_FLOOD_BATCH`` per write, the next write only once every
    ACK of the last came back (so no read of the server holds more than a batch, and only
    a limit on control frames can stop it, not one on ACKs owed); frames sent and the
    outcome: ``goaway <code> <debug data>`` (then closed), ``closed`` or ``kept
    answering`` (all ``READING_FLOOD_FRAMES`` answered)."""
    try:
        reader, writer = await _open(target, tls)
    except (OSError, TimeoutError) as exc:
        return Flood(0, f"refused: {exc}")
    frames = FrameReader()
    goaway: list[Frame] = []
    acks = [0]
    progress = asyncio.Event()

    async def read() -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(1 << 16):
                for f in frames.feed(chunk):
                    if f.type == GOAWAY:
                        goaway.append(f)
                    elif f.type == SETTINGS and f.flags & ACK:
                        acks[0] += 1
                progress.set()
        progress.set()

    loop = asyncio.get_running_loop()
    reading = loop.create_task(read())
    sent = 0
    batch = settings_frame() * READING_FLOOD_BATCH
    try:
        writer.write(PREFACE + settings_frame())
        while sent < READING_FLOOD_FRAMES and not goaway and not reading.done():
            writer.write(batch)
            sent += READING_FLOOD_BATCH
            while acks[0] < sent and not goaway and not reading.done():
                progress.clear()
                await asyncio.wait_for(progress.wait(), CONNECT_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), CONNECT_TIMEOUT if goaway else 0.5)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.transport.abort()
        reading.cancel()
        await asyncio.wait([reading])
    if goaway:
        g = goaway[0]
        return Flood(sent, f"goaway {g.error_code:#x} {g.debug_data.decode(errors='replace')}")
    return Flood(sent, "kept answering" if sent >= READING_FLOOD_FRAMES else "closed")


async def connect_once(port: int, certs: Certs, agent_id: str) -> bool:
    """One flapping connect: TLS, the Connect request, the server's response headers, hang
    up. True if the headers came."""
    try:
        reader, writer = await _open((LOOPBACK, port), tls_client(certs, "h2"))
    except (OSError, TimeoutError):
        return False
    frames = FrameReader()
    try:
        writer.write(PREFACE + settings_frame() + headers_frame(1, _connect_headers(agent_id)))
        while chunk := await asyncio.wait_for(reader.read(1 << 16), CONNECT_TIMEOUT):
            if any(f.type == HEADERS and f.stream_id == 1 for f in frames.feed(chunk)):
                return True
        return False
    except (OSError, TimeoutError):
        return False
    finally:
        writer.transport.abort()


async def flap(port: int, certs: Certs, agent_id: str, count: int) -> int:
    """``count`` connects one after the other with ``agent_id``; how many got headers."""
    served = 0
    for _ in range(count):
        served += await connect_once(port, certs, agent_id)
    return served
