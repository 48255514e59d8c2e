"""Atheris harness for the HTTP/2 + gRPC engine (``konnectivity_fast._wire.H2Connection``).

    .venv/bin/python tests/fuzz/fuzz_h2.py CORPUS_DIR -max_total_time=30   # libFuzzer flags
    .venv/bin/python tests/fuzz/fuzz_h2.py --make-corpus tests/fuzz/corpus_h2

An input is ``mode, seed, body``. ``mode`` picks the role (server, or client with calls
started), whether a valid start (client preface + SETTINGS, or server SETTINGS) comes before
the body, small limits, ping enforcement, keepalive timers, and how the application reacts
(echo, trailers, pauses, resets). The low 7 bits of ``seed`` drive a PRNG that cuts the
bytes into chunks and interleaves ``data_to_send``/``handle_timer`` with time moving
forward; its top bit makes the body *structured*: a list of ``type, flags, stream, length
(2 bytes), payload`` records turned into frames with consistent lengths, so mutations keep
producing frames the engine parses past the frame layer.

Findings (an exception escaping, reported by atheris with the input):
- anything raised by ``receive_data``, ``data_to_send``, ``take_events``, ``handle_timer``
  or ``get_timer``: the engine reports problems as events, never as exceptions;
- an application call refused for a stream the events say is open (a stream that went
  without EV_CLOSED);
- an event for a stream after its EV_CLOSED, a second EV_CLOSED, an EV_REQUEST that is not
  the stream's first event, events after EV_ERROR in a later read;
- output out of proportion to input (``OUT_PER_IN_BYTE``), more events than input bytes,
  or more open streams than the limit.

The engine is compiled (no coverage from nghttp2), so the harness tells libFuzzer what it
saw: ``observe`` branches on event kinds, statuses and output frame types, and is
instrumented, which turns distinct engine behaviour into coverage.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import atheris

# Run as a script: the checkout's package first (not whatever an editable install points at).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from konnectivity_fast._compiled import require_compiled
from konnectivity_fast.wire.contract import MD_CAPABILITIES
from konnectivity_fast.wire.packets import FlowCredit, Packet, PacketType

w: Any = require_compiled()

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PATH = "/agent.AgentService/Connect"
# Output may be this many times the input, plus a constant: a 13-byte request made of
# HPACK-indexed fields can draw a ~4 KiB refusal that echoes a 4 KiB :method (as grpc-go
# does), so the ratio is bounded but not small. Unbounded growth is what this catches.
OUT_PER_IN_BYTE = 512
OUT_CONSTANT = 64 << 10
SMALL_MAX_STREAMS = 4

# Mode bits (first input byte).
M_START = 0x01  # a valid start precedes the body
M_CLIENT = 0x02  # client role (calls started) instead of server role
M_SMALL = 0x04  # small limits
M_ENFORCE = 0x08  # server ping enforcement
M_PING_FREE = 0x10  # ... with pings without streams permitted
M_KEEPALIVE = 0x20  # keepalive timers, handle_timer interleaved
M_REACT = 0x40  # the application answers (headers, echo, trailers)
M_PAUSE = 0x80  # the application pauses/resumes/resets streams


class Finding(AssertionError):
    """The engine broke one of its promises on this input."""


def _frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((ftype, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


CLIENT_START = PREFACE + _frame(4, 0, 0) + _frame(4, 1, 0)
SERVER_START = _frame(4, 0, 0) + _frame(4, 1, 0)


def make_engine(mode: int) -> tuple[Any, list[int], list[int]]:
    """The engine for ``mode``; in the client role, the calls started and those of them
    already half-closed."""
    small = bool(mode & M_SMALL)
    options: dict[str, Any] = {}
    if small:
        options.update(max_message_size=64, stream_window=512, max_header_list_size=512)
    if mode & M_KEEPALIVE:
        options.update(keepalive_time=1.0, keepalive_timeout=0.5)
    if mode & M_CLIENT:
        engine = w.H2Connection(False, **options)
        sids = [engine.start_request(PATH, [("agentid", "fuzz")], timeout=30.0) for _ in range(2)]
        engine.send_message(sids[0], b"hello")
        engine.end_stream(sids[1])
        engine.data_to_send()
        engine.take_events()
        return engine, sids, sids[1:]
    if small:
        options["max_concurrent_streams"] = SMALL_MAX_STREAMS
    if mode & M_ENFORCE:
        options.update(min_ping_interval=1.0, ping_without_streams=bool(mode & M_PING_FREE))
    engine = w.H2Connection(True, **options)
    return engine, [], []


class Checker:
    """Per-stream event order, limits and the application's side of each stream."""

    def __init__(self, engine: Any, mode: int, started: list[int], done: list[int]) -> None:
        self.engine = engine
        self.mode = mode
        self.server = not (mode & M_CLIENT)
        self.open: set[int] = set(started)
        self.done: set[int] = set(done)  # the application may send no more on these
        self.seen: set[int] = set(started)
        self.closed: set[int] = set()
        self.paused: set[int] = set()
        self.error_read = -1
        self.reads = 0
        self.max_streams = SMALL_MAX_STREAMS if mode & M_SMALL else w.DEFAULT_MAX_CONCURRENT_STREAMS

    def events(self, events: list[Any], rng: random.Random) -> None:
        # The application sees a batch whole: a call whose end is anywhere in it is over.
        ending = {
            ev.stream_id for ev in events if ev.kind in (w.EV_TRAILERS, w.EV_ABORTED, w.EV_CLOSED)
        }
        for ev in events:
            observe(ev)
            if self.error_read >= 0 and self.reads > self.error_read and ev.kind != w.EV_CLOSED:
                raise Finding(f"event after EV_ERROR in an earlier read: {ev!r}")
            sid = ev.stream_id
            if ev.kind == w.EV_ERROR:
                if self.error_read < 0:
                    self.error_read = self.reads
                continue
            if ev.kind in (w.EV_GOAWAY, w.EV_PING_ACK):
                continue
            if sid in self.closed:
                raise Finding(f"event after EV_CLOSED: {ev!r}")
            if ev.kind == w.EV_REQUEST:
                if not self.server or sid in self.seen:
                    raise Finding(f"EV_REQUEST not first on its stream: {ev!r}")
                self.seen.add(sid)
                self.open.add(sid)
            elif ev.kind == w.EV_CLOSED:
                self.closed.add(sid)
                self.open.discard(sid)
                self.paused.discard(sid)
            elif ev.kind in (w.EV_ABORTED, w.EV_TRAILERS):
                self.done.add(sid)
            if sid in ending or sid not in self.open:
                continue
            if self.mode & M_REACT and sid not in self.done:
                self.react(ev, rng)
            if self.mode & M_PAUSE:
                self.pause(sid, rng)
        if (
            len(self.open) > self.max_streams
            or self.engine.open_streams > max(self.max_streams, len(self.open)) + 2
        ):
            raise Finding(f"{self.engine.open_streams} streams open, limit {self.max_streams}")

    def call(self, sid: int, what: str, *args: Any) -> None:
        """An application call on a stream the events say is open and writable."""
        try:
            getattr(self.engine, what)(sid, *args)
        except KeyError as exc:
            raise Finding(f"{what}({sid}) refused for a stream without EV_CLOSED: {exc}") from exc
        except RuntimeError as exc:
            if "headers already sent" in str(exc):
                return
            raise Finding(f"{what}({sid}) refused for a writable stream: {exc}") from exc

    def react(self, ev: Any, rng: random.Random) -> None:
        sid = ev.stream_id
        choice = rng.randrange(8)
        if ev.kind == w.EV_REQUEST:
            if choice == 0:
                self.done.add(sid)
                self.call(sid, "send_trailers", 5, "not here 100%")
            else:
                self.call(sid, "send_headers", [("serverid", "s1"), ("servercount", "2")])
        elif ev.kind == w.EV_MESSAGE:
            if choice < 6:
                self.call(sid, "send_message", ev.data)
            elif choice == 6 and self.server:
                self.done.add(sid)
                self.call(sid, "send_trailers", 0)
        elif ev.kind == w.EV_END and self.server:
            self.done.add(sid)
            self.call(sid, "send_trailers", 0, "bye")
        elif ev.kind == w.EV_HEADERS and choice < 4:
            self.call(sid, "send_message", b"x" * choice * 50)

    def pause(self, sid: int, rng: random.Random) -> None:
        choice = rng.randrange(10)
        if choice == 0:
            self.engine.pause_reading(sid)
            self.paused.add(sid)
        elif choice == 1 and sid in self.paused:
            self.engine.resume_reading(sid)
            self.paused.discard(sid)
        elif choice == 2:
            self.done.add(sid)
            self.engine.reset_stream(sid)


def observe(ev: Any) -> None:
    """Branch on what happened, so the instrumented harness gives libFuzzer a signal."""
    kind = ev.kind
    if kind == w.EV_REQUEST:
        if ev.timeout is not None:
            _sink(1)
        if ev.metadata:
            _sink(len(ev.metadata) > 3)
    elif kind == w.EV_MESSAGE:
        _observe_size(len(ev.data))
    elif kind in (w.EV_TRAILERS, w.EV_ABORTED):
        _observe_status(ev.status)
    elif kind == w.EV_CLOSED:
        _observe_code(ev.error_code)
    elif kind == w.EV_ERROR:
        _observe_error(ev.message or "")
    elif kind == w.EV_GOAWAY:
        _sink(24 + min(ev.error_code, 15))
    else:
        _sink(40 + kind)


def _observe_size(n: int) -> None:
    if n == 0:
        _sink(2)
    elif n < 16:
        _sink(3)
    elif n < 1024:
        _sink(4)
    else:
        _sink(5)


def _observe_status(status: int) -> None:
    if status == 0:
        _sink(6)
    elif status == 1:
        _sink(7)
    elif status == 8:
        _sink(8)
    elif status == 13:
        _sink(9)
    elif status == 14:
        _sink(10)
    else:
        _sink(11)


def _observe_code(code: int) -> None:
    if code == 0:
        _sink(12)
    elif code == 1:
        _sink(13)
    elif code == 6:
        _sink(14)
    elif code == 7:
        _sink(15)
    elif code == 8:
        _sink(16)
    else:
        _sink(17)


def _observe_error(msg: str) -> None:
    if "magic" in msg:
        _sink(18)
    elif "Flood" in msg:
        _sink(19)
    elif "CONTINUATION" in msg:
        _sink(20)
    elif "pings" in msg:
        _sink(21)
    elif "keepalive" in msg:
        _sink(22)
    else:
        _sink(23)


def observe_output(out: bytes) -> None:
    """Frame types and GOAWAY codes in the engine's output."""
    i = 0
    while i + 9 <= len(out):
        length = int.from_bytes(out[i : i + 3], "big")
        ftype = out[i + 3]
        if ftype == 7 and i + 17 <= len(out):
            _sink(100 + min(int.from_bytes(out[i + 13 : i + 17], "big"), 15))
        elif ftype == 3:
            _sink(120)
        elif ftype == 1:
            _sink(121)
        elif ftype == 0:
            _sink(122)
        elif ftype == 8:
            _sink(123)
        i += 9 + length


def _sink(value: object) -> None:
    """Where the observations go: nowhere (the branches taken are the point)."""


def check(data: bytes) -> Checker | None:
    """Run one input; the checker (what was seen), or None for a too short input."""
    if len(data) < 2:
        return None
    mode, seed, body = data[0], data[1], data[2:]
    if seed & STRUCTURED:
        body = frames_from_records(body)
    engine, started, done = make_engine(mode)
    if mode & M_START:
        body = (SERVER_START if mode & M_CLIENT else CLIENT_START) + body
    rng = random.Random(seed * 1_000_003 + len(body))
    checker = Checker(engine, mode, started, done)
    now = 0.0
    total_in = total_out = total_events = 0
    pos = 0
    while pos < len(body):
        size = rng.choice((1, 2, 7, 9, 64, 1000, len(body)))
        chunk = body[pos : pos + size]
        pos += len(chunk)
        total_in += len(chunk)
        now += rng.choice((0.0, 0.001, 0.4, 1.1))
        checker.reads += 1
        events = list(engine.receive_data(chunk, now))
        total_events += len(events)
        checker.events(events, rng)
        if rng.randrange(4):
            out = engine.data_to_send()
            observe_output(bytes(out))
            total_out += len(out)
            more = engine.take_events()
            total_events += len(more)
            checker.events(more, rng)
        if mode & M_KEEPALIVE:
            timer = engine.get_timer()
            if timer is not None and rng.randrange(2):
                now = max(now, timer)
                more = engine.handle_timer(now)
                total_events += len(more)
                checker.events(more, rng)
        if total_out > OUT_PER_IN_BYTE * total_in + OUT_CONSTANT:
            raise Finding(f"{total_out} bytes out for {total_in} in")
        if total_events > total_in + 16:
            raise Finding(f"{total_events} events for {total_in} bytes in")
    out = engine.data_to_send()
    observe_output(bytes(out))
    total_out += len(out)
    checker.events(engine.take_events(), rng)
    if total_out > OUT_PER_IN_BYTE * total_in + OUT_CONSTANT:
        raise Finding(f"{total_out} bytes out for {total_in} in")
    _ = engine.want_close
    return checker


STRUCTURED = 0x80
_RECORD = 5  # type, flags, stream, length (2 bytes)


def _stream_of(code: int) -> int:
    """A record's stream byte: small ids as they are, the top ones near 2**31."""
    return code if code < 0xF0 else 0x7FFFFFFF - (code & 0x0F)


def frames_from_records(body: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i + _RECORD <= len(body):
        ftype, flags, stream = body[i], body[i + 1], body[i + 2]
        length = int.from_bytes(body[i + 3 : i + 5], "big")
        payload = body[i + _RECORD : i + _RECORD + length]
        i += _RECORD + length
        out += _frame(ftype, flags, _stream_of(stream), payload)
    return bytes(out)


def records_from_frames(data: bytes) -> bytes:
    """The inverse of ``frames_from_records`` for seeds (stream ids up to 0xEF)."""
    out = bytearray()
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        assert stream < 0xF0
        out += bytes((data[3], data[4], stream)) + length.to_bytes(2, "big")
        out += data[9 : 9 + length]
        data = data[9 + length :]
    return bytes(out)


# ---- seeds --------------------------------------------------------------------------------


def _client_bytes(script: Any) -> bytes:
    client = w.H2Connection(False)
    out = bytearray()
    script(client, out)
    out += client.data_to_send()
    return bytes(out)


def _server_bytes(script: Any, reply: bytes | None = None) -> bytes:
    """What a server engine answers to a client running ``script`` (its whole output): on
    each stream, ``reply`` (by default ``b"reply"`` times the stream id), then trailers."""
    client = w.H2Connection(False)
    server = w.H2Connection(True)
    out = bytearray()
    c_out = bytearray()
    script(client, c_out)
    c_out += client.data_to_send()
    events = server.receive_data(c_out)
    closed = {ev.stream_id for ev in events if ev.kind == w.EV_CLOSED}
    for ev in events:
        if ev.kind == w.EV_REQUEST and ev.stream_id not in closed:
            server.send_headers(ev.stream_id, [("serverid", "s1")])
            server.send_message(ev.stream_id, reply or b"reply" * ev.stream_id)
            server.send_trailers(ev.stream_id, 0 if ev.stream_id == 1 else 7, "dénied 100%")
    out += server.data_to_send()
    return bytes(out)


def _call(client: Any, out: bytearray) -> None:
    sid = client.start_request(PATH, [("agentid", "a1"), ("authorization", "Bearer t")])
    client.send_message(sid, b"\x08\x01\x12\x05hello")
    client.send_message(sid, b"")
    client.send_message(sid, bytes(300))
    client.end_stream(sid)


def _two_calls(client: Any, out: bytearray) -> None:
    a = client.start_request(PATH, timeout=2.5)
    b = client.start_request(PATH, [("agentidentifiers", "host=n1&ipv4=10.0.0.1")])
    client.send_message(a, b"a" * 70)
    client.send_message(b, b"b" * 20)
    client.ping(b"abcdefgh")
    out += client.data_to_send()
    client.reset_stream(b)
    client.end_stream(a)


def _big(client: Any, out: bytearray) -> None:
    sid = client.start_request(PATH)
    client.send_message(sid, bytes(range(256)) * 20)


def _credit_packet(connect_id: int, credit: int) -> bytes:
    return bytes(w.encode_packet(Packet(PacketType.FLOW_CREDIT, FlowCredit(connect_id, credit))))


def _credit(client: Any, out: bytearray) -> None:
    """A flow.v1 stream (negotiated in its metadata): credit packets among DATA packets; the
    server's answer (``make_corpus``) is a credit packet too."""
    sid = client.start_request(PATH, [("agentid", "a1"), (MD_CAPABILITIES, "flow.v1")])
    for connect_id, credit in ((1, 1 << 16), (2, 1), (-1, (1 << 63) - 1)):
        client.send_message(sid, _credit_packet(connect_id, credit))
        client.send_data_packet(sid, connect_id, b"d" * 40)
    client.end_stream(sid)


def _after_client_settings(data: bytes) -> bytes:
    """A client's output without its preface and first SETTINGS frame."""
    assert data.startswith(PREFACE)
    rest = data[len(PREFACE) :]
    return rest[9 + int.from_bytes(rest[:3], "big") :]


def make_corpus(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, bytes] = {}
    scripts = {"call": _call, "two": _two_calls, "big": _big, "credit": _credit}
    replies = {"credit": _credit_packet(1, 1 << 20)}
    for name, script in scripts.items():
        c = _client_bytes(script)
        s = _server_bytes(script, replies.get(name))
        # Server role: the client's bytes as they are (their own preface), with each
        # application behaviour; and after our valid start.
        for mode in (0x00, M_REACT, M_REACT | M_PAUSE | M_SMALL, M_ENFORCE | M_KEEPALIVE):
            seeds[f"server-{name}-{mode:02x}"] = bytes((mode, 7)) + c
        seeds[f"server-{name}-start"] = bytes((M_START | M_REACT, 3)) + _after_client_settings(c)
        seeds[f"server-{name}-records"] = bytes((M_START | M_REACT | M_SMALL, STRUCTURED | 5)) + (
            records_from_frames(_after_client_settings(c))
        )
        seeds[f"client-{name}-records"] = bytes((M_CLIENT | M_REACT, STRUCTURED | 9)) + (
            records_from_frames(s)
        )
        # Client role: the server's answer to the same calls.
        for mode in (M_CLIENT, M_CLIENT | M_REACT | M_PAUSE, M_CLIENT | M_SMALL | M_KEEPALIVE):
            seeds[f"client-{name}-{mode:02x}"] = bytes((mode, 11)) + s
    seeds["server-http1"] = bytes((0, 0)) + b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    seeds["server-pings"] = bytes((M_START | M_ENFORCE, 1)) + _frame(6, 0, 0, b"12345678") * 8
    seeds["server-rapid-reset"] = (
        bytes((M_START, 2))
        + _after_client_settings(_client_bytes(_two_calls))
        + _frame(3, 0, 1, b"\x00\x00\x00\x08")
    )
    for name, blob in seeds.items():
        (directory / name).write_bytes(blob)
    return len(seeds)


# ---- entry point --------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        print(f"{make_corpus(Path(sys.argv[2]))} seeds in {sys.argv[2]}")
        return
    planted = os.environ.get("KF_FUZZ_H2_PLANT") == "1"

    def test_one_input(data: bytes) -> None:
        checker = check(data)
        if planted and checker is not None and checker.server and checker.seen:
            raise Finding("planted: a server saw a request")

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


observe = atheris.instrument_func(observe)
_observe_size = atheris.instrument_func(_observe_size)
_observe_status = atheris.instrument_func(_observe_status)
_observe_code = atheris.instrument_func(_observe_code)
_observe_error = atheris.instrument_func(_observe_error)
observe_output = atheris.instrument_func(observe_output)
check = atheris.instrument_func(check)
for _name in ("events", "react", "pause", "call"):
    setattr(Checker, _name, atheris.instrument_func(getattr(Checker, _name)))


if __name__ == "__main__":
    main()
