"""The hostile agents of the abuse benchmark (``bench/abuse.py``), one child process each.

- ``bogus``: an authenticated fake agent (client certificate) that opens one Connect stream,
  says ``ready`` once the server's headers arrived, and on ``go`` sends ``--count`` packets
  the server must decode and reject (``KINDS``), reading whatever the server answers; then
  ``done <sent> <answers> <seconds>``. ``--pace single`` writes each packet by itself (one
  HTTP/2 frame and one system call each), ``batch`` as many as the stream takes.
- ``flap``: an agent that connects with a live agent's ID, waits for the server's headers
  and hangs up, ``--rate`` times a second (``--parallel`` attempts in flight at most) for
  ``--seconds``; then ``done <connects> <failures> <seconds>``.

Both are built on our own transport's client role: cheaper per packet and per connect than
grpcio, so that on a 2-CPU machine the server, not the generator, is what is measured. The
packets are encoded by our codec (the payloads of ``mismatch`` do not match their type on
purpose). Every wait has a deadline; the process exits when its orchestrator's stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import time
from collections.abc import Callable

import uvloop

from konnectivity_fast.transport.grpc import GrpcCall, GrpcError, GrpcProtocol, connect
from konnectivity_fast.wire.codec import encode_packet
from konnectivity_fast.wire.contract import CONNECT_PATH, MD_AGENT_ID
from konnectivity_fast.wire.packets import (
    CloseResponse,
    Data,
    DialResponse,
    Packet,
    PacketType,
)

# Seconds to connect and get the server's headers.
SETUP_TIMEOUT = 20.0
# Packets queued on the stream before waiting for it to drain: keeps the server busy
# without queueing the whole run in our memory.
BATCH = 256
# connectIDs and dial randoms the server cannot know: above any an agent would use.
UNKNOWN_BASE = 1 << 40


def _bogus(kind: str, i: int) -> Packet:
    """The ``i``-th packet of ``kind``: never one the server can route."""
    n = UNKNOWN_BASE + i
    if kind == "data-unknown":
        return Packet(PacketType.DATA, Data(connect_id=n, data=b"x" * 100))
    if kind == "close-rsp-unknown":
        return Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=n))
    if kind == "dial-rsp-unknown":
        return Packet(PacketType.DIAL_RSP, DialResponse(random=n, connect_id=n))
    if kind == "mismatch":  # type DATA, a CLOSE_RSP payload: upstream's server panics
        return Packet(PacketType.DATA, CloseResponse(connect_id=n))
    raise ValueError(kind)


#: What the bogus agent can send. ``mismatch`` kills upstream's server (a nil payload
#: dereference), so the orchestrator sends it to ours only.
KINDS: dict[str, Callable[[int], Packet]] = {
    k: (lambda i, k=k: _bogus(k, i))
    for k in ("data-unknown", "close-rsp-unknown", "dial-rsp-unknown", "mismatch")
}


def client_ssl(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def open_agent(
    host: str, port: int, ctx: ssl.SSLContext, agent_id: str
) -> tuple[GrpcProtocol, GrpcCall]:
    """A Connect stream, once the server sent its headers (it admitted us)."""
    proto = await asyncio.wait_for(
        connect(host=host, port=port, ssl=ctx, server_hostname="localhost"), SETUP_TIMEOUT
    )
    call = proto.start_call(CONNECT_PATH, [(MD_AGENT_ID, agent_id)], scheme="https")
    await asyncio.wait_for(call.headers_received, SETUP_TIMEOUT)
    return proto, call


class Counter:
    """A call's sink that only counts what the server sends."""

    def __init__(self) -> None:
        self.messages = 0

    def on_message(self, call: GrpcCall, message: bytes) -> None:
        self.messages += 1

    def on_end(self, call: GrpcCall) -> None:
        pass

    def on_closed(self, call: GrpcCall, error_code: int) -> None:
        pass


async def _line() -> str:
    return (await asyncio.to_thread(sys.stdin.readline)).strip()


async def bogus(args: argparse.Namespace) -> None:
    ctx = client_ssl(args.ca, args.cert, args.key)
    proto, call = await open_agent(args.host, args.port, ctx, args.agent_id)
    counter = Counter()
    call.set_sink(counter)
    make = KINDS[args.kind]
    messages = [encode_packet(make(i)) for i in range(min(args.count, 4096))]
    print("ready", flush=True)
    if await _line() != "go":
        return
    started = time.perf_counter()
    batch = BATCH if args.pace == "batch" else 1
    sent = 0
    try:
        for i in range(args.count):
            call.send(messages[i % len(messages)])
            sent += 1
            if i % batch == batch - 1:
                await call.drain()
                if batch == 1:
                    await asyncio.sleep(0)  # one packet per write: the loop flushes it alone
        await call.drain()
    except GrpcError as exc:  # the server ended the stream: report what got through
        print(f"the server ended the stream after {sent} packets: {exc}", file=sys.stderr)
    seconds = time.perf_counter() - started
    await asyncio.sleep(0.2)  # the server's last answers
    print(f"done {sent} {counter.messages} {seconds:.6f}", flush=True)
    await proto.aclose()


async def flap(args: argparse.Namespace) -> None:
    ctx = client_ssl(args.ca, args.cert, args.key)
    print("ready", flush=True)
    if await _line() != "go":
        return
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(args.parallel)
    done = failed = 0

    async def once() -> None:
        nonlocal done, failed
        try:
            proto, _ = await open_agent(args.host, args.port, ctx, args.agent_id)
            proto.transport.abort() if proto.transport is not None else None
            await proto.lost
            done += 1
        except (OSError, TimeoutError, ConnectionError):
            failed += 1
        finally:
            slots.release()

    tasks: set[asyncio.Task[None]] = set()
    started = loop.time()
    interval = 1.0 / args.rate
    n = 0
    while loop.time() - started < args.seconds:
        await slots.acquire()
        task = loop.create_task(once())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        n += 1
        delay = started + n * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
    if tasks:
        await asyncio.wait(tasks, timeout=SETUP_TIMEOUT)
    print(f"done {done} {failed} {loop.time() - started:.6f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("bogus", "flap"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--agent-id", default="bogus-agent")
    parser.add_argument("--kind", choices=sorted(KINDS), default="data-unknown")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument(
        "--pace",
        choices=("batch", "single"),
        default="batch",
        help="packets per write: as many as fit (batch) or one (single)",
    )
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--parallel", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    uvloop.run(bogus(args) if args.mode == "bogus" else flap(args))


if __name__ == "__main__":
    main()
