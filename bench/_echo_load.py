"""Load generator of the echo benchmark: our client role, the same for both servers.

``python -m bench._echo_load throughput --path SOCK --size N ...``
    Connects, opens ``--streams`` bidi calls and prints ``READY``. On a ``GO t0 t1`` line
    (``time.monotonic()`` instants, shared by all processes of the machine) it starts
    pipelining: each call keeps up to ``--inflight`` bytes (at least one message) sent and
    not yet echoed. The received count is sampled at t0 and t1; at t1 sending stops, every
    call half-closes and drains, and a ``RESULT {json}`` line reports counts and checks.

``python -m bench._echo_load idle --path SOCK --streams N``
    Connects, echoes one message on a warm-up call, prints ``READY``; on ``OPEN`` opens N
    calls, ``IDLE_BATCH`` at a time, and echoes one message on each, prints ``OPENED``; on
    ``CLOSE`` half-closes them all, waits for their statuses and prints ``RESULT {json}``.

Two ways to drive a call (``--client``):

- ``lean`` (default): the load process must cost less CPU than the server it measures, and
  both share a 2-core machine. Echoes are counted in a per-call callback installed over
  ``GrpcCall.set_sink`` (callbacks instead of ``recv``), and
  messages go out in batches of pre-framed bytes through ``H2Connection.send_framed``: no
  coroutine switch and no per-message send call. The bytes on the wire are the same.
- ``api``: only the public ``GrpcCall.send``/``recv``, one message at a time. About 1.5x
  the CPU per message of ``lean``; a cross-check that ``lean`` measures the same thing.

Correctness is checked on every echo without copying: each call cycles through
``PAYLOADS`` distinct random payloads, so an echo must equal the payload sent at the same
position (content and order). Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import uvloop

from bench._echo_servers import PATH
from konnectivity_fast._compiled import require_compiled
from konnectivity_fast.transport import grpc as kgrpc

# Distinct payloads each call cycles through.
PAYLOADS = 16
# Seconds allowed for the connection, the drain after t1, and each idle-mode step.
CONNECT_TIMEOUT = 10.0
DRAIN_TIMEOUT = 20.0
STEP_TIMEOUT = 60.0
# Size of the idle-mode echo, bytes.
IDLE_MESSAGE = 64
# Idle streams opened at once. grpc.aio cancels calls (status CANCELLED) when a burst of
# more than ~1000 new streams waits for its Python request loop; 100 at a time never does.
IDLE_BATCH = 100


@dataclass
class Tally:
    """What the load process saw; ``window_*`` are the counts between t0 and t1."""

    sent_msgs: int = 0
    sent_bytes: int = 0
    recv_msgs: int = 0
    recv_bytes: int = 0
    mismatches: int = 0
    window_msgs: int = 0
    window_bytes: int = 0
    window_s: float = 0.0
    statuses: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Run:
    """The send phase shared by all calls of one load process: on until ``stop()``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.active = True
        self.stopped: asyncio.Future[None] = loop.create_future()

    def stop(self) -> None:
        self.active = False
        if not self.stopped.done():
            self.stopped.set_result(None)


def _say(word: str, rest: str = "") -> None:
    sys.stdout.write(f"{word} {rest}\n" if rest else f"{word}\n")
    sys.stdout.flush()


async def _read_line() -> str:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    return str(line).strip()


def _check_status(call: kgrpc.GrpcCall, status: int, tally: Tally) -> None:
    tally.statuses.append(status)
    if status != 0:
        tally.errors.append(f"stream {call.stream_id}: status {status} {call.message}")


async def pump_api(
    call: kgrpc.GrpcCall, payloads: list[bytes], window: int, tally: Tally, run: Run
) -> None:
    """Public API only: keep ``window`` messages in flight while ``run.active``; drain."""
    k = len(payloads)
    sent = received = 0
    while run.active:
        while sent - received < window:
            msg = payloads[sent % k]
            call.send(msg)
            sent += 1
            tally.sent_msgs += 1
            tally.sent_bytes += len(msg)
        echoed = await call.recv()
        if echoed is None:
            break
        if echoed != payloads[received % k]:
            tally.mismatches += 1
        received += 1
        tally.recv_msgs += 1
        tally.recv_bytes += len(echoed)
    call.done_writing()
    while (echoed := await call.recv()) is not None:
        if echoed != payloads[received % k]:
            tally.mismatches += 1
        received += 1
        tally.recv_msgs += 1
        tally.recv_bytes += len(echoed)
    _check_status(call, await call.wait_status(), tally)


async def pump_lean(
    call: kgrpc.GrpcCall,
    payloads: list[bytes],
    window: int,
    tally: Tally,
    run: Run,
    *,
    proto: kgrpc.GrpcProtocol,
) -> None:
    """Echoes counted in a callback (``GrpcCall.set_sink``); refills of ``window // 2``
    pre-framed messages, queued on ``call``'s connection ``proto`` directly."""
    prefix = require_compiled().message_prefix
    k, size = len(payloads), len(payloads[0])
    step = size + 5
    # All payloads framed back to back; a refill is one or two slices of it (no copy).
    cycle = memoryview(b"".join(prefix(size) + p for p in payloads))
    conn, sid = proto.conn, call.stream_id
    batch = max(1, window // 2)
    sent = received = 0

    def send(n: int) -> None:
        nonlocal sent
        i = sent % k
        tally.sent_msgs += n
        tally.sent_bytes += n * size
        sent += n
        while n:
            m = min(n, k - i)
            conn.send_framed(sid, cycle[i * step : (i + m) * step])
            n -= m
            i = 0
        proto.schedule_flush()

    class Sink:
        def on_message(self, call: kgrpc.GrpcCall, msg: bytes) -> None:
            deliver(msg)

        def on_end(self, call: kgrpc.GrpcCall) -> None:
            pass

        def on_closed(self, call: kgrpc.GrpcCall, error_code: int) -> None:
            pass

    def deliver(msg: bytes) -> None:
        nonlocal received
        if msg != payloads[received % k]:
            tally.mismatches += 1
        received += 1
        tally.recv_msgs += 1
        tally.recv_bytes += len(msg)
        if run.active and sent - received <= window - batch:
            send(batch)

    call.set_sink(Sink())
    send(window)
    ends: list[asyncio.Future[Any]] = [run.stopped, call.closed]
    await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
    call.done_writing()
    _check_status(call, await call.wait_status(), tally)
    if received != sent:
        tally.errors.append(f"stream {call.stream_id}: {sent} sent, {received} echoed")


async def throughput(path: str, size: int, streams: int, inflight: int, client: str) -> Tally:
    tally = Tally()
    loop = asyncio.get_running_loop()
    proto = await asyncio.wait_for(kgrpc.connect(path=path), CONNECT_TIMEOUT)
    payloads = [os.urandom(size) for _ in range(PAYLOADS)]
    window = max(1, inflight // size)
    calls = [proto.start_call(PATH) for _ in range(streams)]
    _say("READY")
    t0, t1 = (float(x) for x in (await _read_line()).split()[1:3])
    run = Run(loop)
    marks: list[tuple[float, int, int]] = []

    def mark() -> None:
        marks.append((time.monotonic(), tally.recv_msgs, tally.recv_bytes))

    def stop() -> None:
        mark()
        run.stop()

    loop.call_later(max(0.0, t0 - time.monotonic()), mark)
    loop.call_later(max(0.0, t1 - time.monotonic()), stop)
    pump = functools.partial(pump_lean, proto=proto) if client == "lean" else pump_api
    pumps = [asyncio.ensure_future(pump(c, payloads, window, tally, run)) for c in calls]
    try:
        await asyncio.wait_for(asyncio.gather(*pumps), (t1 - time.monotonic()) + DRAIN_TIMEOUT)
    except TimeoutError:
        tally.errors.append("drain timed out")
    if len(marks) == 2:
        (ta, ma, ba), (tb, mb, bb) = marks
        tally.window_msgs, tally.window_bytes, tally.window_s = mb - ma, bb - ba, tb - ta
    else:
        tally.errors.append(f"sampled {len(marks)} of 2 marks")
    await proto.aclose(timeout=5.0)
    return tally


async def idle(path: str, streams: int) -> Tally:
    tally = Tally()
    proto = await asyncio.wait_for(kgrpc.connect(path=path), CONNECT_TIMEOUT)
    payload = os.urandom(IDLE_MESSAGE)

    async def echo_once(call: kgrpc.GrpcCall) -> None:
        call.send(payload)
        tally.sent_msgs += 1
        tally.sent_bytes += len(payload)
        echoed = await call.recv()
        if echoed is not None:
            tally.recv_msgs += 1
            tally.recv_bytes += len(echoed)
            if echoed != payload:
                tally.mismatches += 1

    async def finish(call: kgrpc.GrpcCall) -> None:
        call.done_writing()
        while await call.recv() is not None:
            tally.errors.append(f"stream {call.stream_id}: unexpected message")
        _check_status(call, await call.wait_status(), tally)

    warm = proto.start_call(PATH)
    await asyncio.wait_for(echo_once(warm), STEP_TIMEOUT)
    await asyncio.wait_for(finish(warm), STEP_TIMEOUT)
    _say("READY")
    if await _read_line() != "OPEN":
        raise SystemExit("expected OPEN")
    calls: list[kgrpc.GrpcCall] = []
    deadline = time.monotonic() + STEP_TIMEOUT
    while len(calls) < streams:
        batch = [proto.start_call(PATH) for _ in range(min(IDLE_BATCH, streams - len(calls)))]
        calls += batch
        await asyncio.wait_for(
            asyncio.gather(*(echo_once(c) for c in batch)), max(0.1, deadline - time.monotonic())
        )
    _say("OPENED", str(sum(1 for c in calls if not c.closed.done())))
    if await _read_line() != "CLOSE":
        raise SystemExit("expected CLOSE")
    await asyncio.wait_for(asyncio.gather(*(finish(c) for c in calls)), STEP_TIMEOUT)
    del tally.errors[10:]
    await proto.aclose(timeout=5.0)
    return tally


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["throughput", "idle"])
    parser.add_argument("--path", required=True)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument(
        "--inflight",
        type=int,
        default=256 << 10,
        help="bytes kept in flight per stream (at least one message)",
    )
    parser.add_argument("--client", choices=["lean", "api"], default="lean")
    args = parser.parse_args(argv)
    if args.mode == "throughput":
        tally = uvloop.run(
            throughput(args.path, max(1, args.size), args.streams, args.inflight, args.client)
        )
    else:
        tally = uvloop.run(idle(args.path, args.streams))
    _say("RESULT", json.dumps(asdict(tally)))


if __name__ == "__main__":
    main()
