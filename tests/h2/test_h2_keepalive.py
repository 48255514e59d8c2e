"""Keepalive and ping enforcement of the HTTP/2 engine, with time passed explicitly.

Keepalive (both roles, grpc-go's ClientParameters/ServerParameters): after keepalive_time
without receiving anything, a PING; its ACK must be back within keepalive_timeout, or the
connection fails with "keepalive ping failed to receive ACK within timeout".

Ping enforcement (server role, grpc-go's EnforcementPolicy): a PING sooner than
min_ping_interval after the previous one (PING_IDLE_INTERVAL, 2 h, when no stream is open
and pings without streams are not permitted) is a strike; more than MAX_PING_STRIKES
strikes end the connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings". Sending
HEADERS or DATA forgives the strikes (the next PING resets them).

The last test runs our client against a grpcio server's enforcement over a Unix socket.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from .conftest import (
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    PATH,
    PING,
    connected,
    frames_of,
    kinds,
    of_kind,
    open_call,
    pump,
    pump_wire,
    w,
)

T = 10.0  # keepalive_time
TIMEOUT = 5.0  # keepalive_timeout
KEEPALIVE_FAILED = "keepalive ping failed to receive ACK within timeout"


def keepalive_pair(**options: Any) -> tuple[Any, Any]:
    return connected(client_keepalive_time=T, client_keepalive_timeout=TIMEOUT, **options)


def test_constants() -> None:
    assert w.MAX_PING_STRIKES == 2
    assert w.PING_IDLE_INTERVAL == 7200.0
    assert w.DEFAULT_KEEPALIVE_TIMEOUT == 20.0


def test_no_keepalive_by_default() -> None:
    client, server = connected()
    assert client.get_timer() is None and server.get_timer() is None
    assert client.handle_timer(1e9) == []
    assert client.data_to_send() == b""


def test_client_pings_after_keepalive_time_of_silence() -> None:
    client, _ = keepalive_pair()
    assert client.get_timer() == T
    assert client.handle_timer(T - 0.001) == []
    assert client.data_to_send() == b""
    assert client.handle_timer(T) == []
    pings = frames_of(client.data_to_send(), PING)
    assert len(pings) == 1 and not pings[0].flags
    assert client.get_timer() == T + TIMEOUT


def test_late_ack_fails_the_connection() -> None:
    client, server = keepalive_pair()
    client.handle_timer(T)
    server.receive_data(client.data_to_send(), T)
    ack = server.data_to_send()  # the ACK exists, but is held back by the network
    assert frames_of(ack, PING)[0].flags == 1
    assert client.handle_timer(T + TIMEOUT - 0.001) == []
    events = client.handle_timer(T + TIMEOUT)
    assert [(e.kind, e.message) for e in events] == [(w.EV_ERROR, KEEPALIVE_FAILED)]
    assert client.terminated
    out = client.data_to_send()
    assert len(frames_of(out, GOAWAY)) == 1
    assert client.want_close
    assert client.get_timer() is None
    # The ACK arriving now changes nothing.
    assert client.receive_data(ack, T + TIMEOUT + 1) == []
    assert client.want_close


def test_ack_in_time_keeps_the_connection() -> None:
    client, server = keepalive_pair()
    client.handle_timer(T)
    ce, _ = pump(client, server, T + TIMEOUT - 1)
    assert kinds(ce) == [w.EV_PING_ACK]
    assert client.get_timer() == T + TIMEOUT - 1 + T  # silence counts from the ACK
    assert client.handle_timer(T + TIMEOUT) == []
    assert not client.want_close
    # And again, for many rounds.
    now = T + TIMEOUT - 1
    for _ in range(20):
        now = client.get_timer()
        assert client.handle_timer(now) == []
        ce, _ = pump(client, server, now + 0.5)
        assert kinds(ce) == [w.EV_PING_ACK]
    assert not client.want_close and not client.terminated


def test_no_new_call_on_a_failed_connection() -> None:
    """After EV_ERROR the connection is unusable: a call started anyway must not go out
    after our GOAWAY and linger unanswered; it is refused (RuntimeError) or ends at once
    as UNAVAILABLE."""
    client, server = keepalive_pair()
    open_call(client, server)
    client.handle_timer(T)
    client.data_to_send()  # the PING, never answered
    assert kinds(client.handle_timer(T + TIMEOUT)) == [w.EV_ERROR]
    client.data_to_send()
    try:
        late = client.start_request(PATH)
    except RuntimeError:
        return
    out = client.data_to_send()
    events = client.take_events()
    assert frames_of(out, HEADERS) == [], "a request sent on a failed connection"
    assert [(e.kind, e.stream_id, e.status) for e in events if e.stream_id == late][:1] == [
        (w.EV_TRAILERS, late, 14)
    ], events


def test_any_traffic_counts_as_alive() -> None:
    """grpc-go: any frame received proves the peer alive, the ACK is not required."""
    client, server = keepalive_pair()
    sid, _ = open_call(client, server, now=1.0)
    assert client.get_timer() == T  # sending is no proof the peer is alive
    server.send_message(sid, b"x")
    pump(client, server, 8.0)
    assert client.get_timer() == 8.0 + T
    assert client.handle_timer(12.0) == []
    assert frames_of(client.data_to_send(), PING) == []
    # A ping is out; data instead of the ACK also keeps the connection.
    client.handle_timer(18.0)
    client.data_to_send()  # the PING is lost
    server.send_message(sid, b"y")
    client.receive_data(server.data_to_send(), 19.0)
    assert client.handle_timer(18.0 + TIMEOUT) == []
    assert not client.terminated


def test_keepalive_without_streams_disabled() -> None:
    client, server = keepalive_pair(client_keepalive_without_streams=False)
    assert client.handle_timer(T) == []
    assert frames_of(client.data_to_send(), PING) == []
    assert client.handle_timer(5 * T) == []
    assert frames_of(client.data_to_send(), PING) == []
    sid, _ = open_call(client, server, now=5 * T)
    client.handle_timer(6 * T)
    assert len(frames_of(client.data_to_send(), PING)) == 1
    assert sid


def test_server_keepalive_pings_the_client() -> None:
    client, server = connected(server_keepalive_time=T, server_keepalive_timeout=TIMEOUT)
    assert server.get_timer() == T
    server.handle_timer(T)
    _, se = pump(client, server, T + 1)
    assert kinds(se) == [w.EV_PING_ACK]
    server.handle_timer(2 * T + 1)
    server.data_to_send()  # lost
    events = server.handle_timer(2 * T + 1 + TIMEOUT)
    assert [e.message for e in of_kind(events, w.EV_ERROR)] == [KEEPALIVE_FAILED]


def test_our_keepalive_satisfies_our_enforcement() -> None:
    """A client pinging every keepalive_time and a server enforcing min_ping_interval of
    keepalive_time: no strike ever, for hours."""
    client, server = connected(
        client_keepalive_time=T,
        client_keepalive_timeout=TIMEOUT,
        server_min_ping_interval=T,
        server_ping_without_streams=True,
    )
    now = 0.0
    for _ in range(100):
        now = client.get_timer()
        client.handle_timer(now)
        ce, se = pump(client, server, now)
        assert kinds(ce) == [w.EV_PING_ACK] and se == []
    assert now >= 100 * T
    assert not server.want_close and not client.want_close


# ---- ping enforcement (server) ---------------------------------------------------------


def ping_at(client: Any, server: Any, now: float) -> tuple[list[Any], list[Any], bytes]:
    client.ping(b"pingpong")
    wire = pump_wire(client, server, now)
    return wire.client_events, wire.server_events, wire.to_client


def assert_too_many_pings(ce: list[Any], se: list[Any], to_client: bytes, server: Any) -> None:
    goaway = [e for e in ce if e.kind == w.EV_GOAWAY]
    assert [(e.error_code, e.data) for e in goaway] == [(ENHANCE_YOUR_CALM, b"too_many_pings")]
    on_wire = frames_of(to_client, GOAWAY)
    assert [(f.error_code, f.debug_data) for f in on_wire] == [
        (ENHANCE_YOUR_CALM, b"too_many_pings")
    ]
    assert [e.message for e in of_kind(se, w.EV_ERROR)] == ["got too many pings from the client"]
    assert server.want_close


def test_pings_too_close_are_strikes_and_the_third_strike_ends_it() -> None:
    client, server = connected(server_min_ping_interval=10.0, server_ping_without_streams=True)
    for now in (0.0, 1.0, 2.0):  # the first ping is free; two strikes
        ce, se, _ = ping_at(client, server, now)
        assert kinds(ce) == [w.EV_PING_ACK] and se == []
    ce, se, to_client = ping_at(client, server, 3.0)
    assert_too_many_pings(ce, se, to_client, server)


def test_pings_at_the_minimum_interval_are_fine() -> None:
    client, server = connected(server_min_ping_interval=10.0, server_ping_without_streams=True)
    for i in range(20):
        ce, se, _ = ping_at(client, server, 10.0 * i)
        assert kinds(ce) == [w.EV_PING_ACK] and se == []
    assert not server.want_close


def test_pings_without_streams_count_against_two_hours() -> None:
    client, server = connected(server_min_ping_interval=10.0)
    for now in (0.0, 10.0, 20.0):  # 10 s apart is fine with a stream, not without
        ce, se, _ = ping_at(client, server, now)
        assert se == []
    ce, se, to_client = ping_at(client, server, 30.0)
    assert_too_many_pings(ce, se, to_client, server)


def test_pings_without_streams_two_hours_apart_are_fine() -> None:
    client, server = connected(server_min_ping_interval=10.0)
    for i in range(6):
        ce, se, _ = ping_at(client, server, i * w.PING_IDLE_INTERVAL)
        assert kinds(ce) == [w.EV_PING_ACK] and se == []
    assert not server.want_close


def test_with_an_open_stream_min_ping_interval_applies() -> None:
    client, server = connected(server_min_ping_interval=10.0)
    open_call(client, server)
    for i in range(10):
        ce, se, _ = ping_at(client, server, 10.0 * i)
        assert kinds(ce) == [w.EV_PING_ACK] and se == []
    assert not server.want_close


def test_strikes_are_forgiven_after_the_server_sends_headers_or_data() -> None:
    client, server = connected(server_min_ping_interval=10.0)
    sid, _ = open_call(client, server)
    for now in (0.0, 1.0, 2.0):
        _, se, _ = ping_at(client, server, now)
        assert se == []  # two strikes
    server.send_headers(sid)
    pump(client, server, 2.5)
    for now in (3.0, 3.1, 3.2):  # the first resets the strikes, two more strikes
        _, se, _ = ping_at(client, server, now)
        assert se == []
    server.send_message(sid, b"data")
    pump(client, server, 3.5)
    for now in (4.0, 4.1, 4.2):
        _, se, _ = ping_at(client, server, now)
        assert se == []
    ce, se, to_client = ping_at(client, server, 4.3)  # third strike since the last data
    assert_too_many_pings(ce, se, to_client, server)


def test_received_data_does_not_forgive_strikes() -> None:
    """Only what the server sends resets strikes, not what it receives."""
    client, server = connected(server_min_ping_interval=10.0)
    sid, _ = open_call(client, server)
    for now in (0.0, 1.0, 2.0):
        ping_at(client, server, now)
        client.send_message(sid, b"client data")
        _, se = pump(client, server, now)
        assert of_kind(se, w.EV_ERROR) == []
    ce, se, to_client = ping_at(client, server, 3.0)
    assert_too_many_pings(ce, se, to_client, server)


def test_ping_acks_are_not_strikes() -> None:
    client, server = connected(server_min_ping_interval=10.0)
    for i in range(10):
        server.ping(b"server%d!" % i)
        _, se = pump(client, server, float(i) / 10)
        assert kinds(se) == [w.EV_PING_ACK]
    assert not server.want_close


def test_no_enforcement_by_default() -> None:
    client, server = connected()
    for i in range(50):
        ce, se, _ = ping_at(client, server, i * 0.001)
        assert kinds(ce) == [w.EV_PING_ACK] and se == []
    assert not server.want_close


def test_ping_flood_with_enforcement_ends_it() -> None:
    client, server = connected(server_min_ping_interval=1.0)
    for _ in range(1000):
        client.ping(b"12345678")
    wire = pump_wire(client, server, 0.0)
    assert server.want_close
    assert len(frames_of(wire.to_client, PING)) <= w.MAX_OUTBOUND_ACK
    assert [f.error_code for f in frames_of(wire.to_client, GOAWAY)] == [ENHANCE_YOUR_CALM]


def test_nothing_is_taken_in_after_too_many_pings() -> None:
    """EV_ERROR means the connection is unusable: frames after the offending PING in the
    same read (here a new call with a message) must not become a call."""
    client, server = connected(server_min_ping_interval=10.0)
    for _ in range(w.MAX_PING_STRIKES + 2):
        client.ping(b"12345678")
    sid = client.start_request(PATH)
    client.send_message(sid, b"too late")
    events = server.receive_data(client.data_to_send(), 0.0)
    out = server.data_to_send()
    events += server.take_events()
    assert kinds(events)[:1] == [w.EV_ERROR], events
    assert of_kind(events, w.EV_REQUEST) == [] and of_kind(events, w.EV_MESSAGE) == [], events
    assert len(frames_of(out, PING)) <= w.MAX_PING_STRIKES + 1
    assert server.want_close


# ---- against grpcio's enforcement ---------------------------------------------------------


@pytest.fixture
def grpcio_server() -> Iterator[str]:
    """A grpcio server on a Unix socket that permits no pings without calls."""
    with tempfile.TemporaryDirectory(prefix="kf-ka-") as d:
        path = os.path.join(d, "s.sock")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2),
            options=[
                ("grpc.keepalive_permit_without_calls", 0),
                ("grpc.http2.min_ping_interval_without_data_ms", 300_000),
                ("grpc.http2.max_ping_strikes", 2),
            ],
        )
        server.add_insecure_port(f"unix:{path}")
        server.start()
        try:
            yield path
        finally:
            server.stop(None).wait()


def test_grpcio_server_enforcement_sends_too_many_pings(grpcio_server: str) -> None:
    """Our client pinging a grpcio server without calls, again and again: grpcio ends the
    connection with GOAWAY ENHANCE_YOUR_CALM "too_many_pings", which our engine reports as
    EV_GOAWAY; the same outcome as our own server's enforcement."""
    client = w.H2Connection(False, now=time.monotonic())
    events: list[Any] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10.0)
        sock.connect(grpcio_server)

        def flush() -> bool:
            try:
                sock.sendall(client.data_to_send())
            except (BrokenPipeError, ConnectionResetError):
                return False
            return True

        def read_until_acks(count: int) -> bool:
            """Read until ``count`` ACKs, a GOAWAY or the end; False once it is over."""
            while len(of_kind(events, w.EV_PING_ACK)) < count:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    return False
                if not data:
                    return False
                events.extend(client.receive_data(data, time.monotonic()))
                if of_kind(events, w.EV_GOAWAY) or not flush():
                    return False
            return True

        flush()
        for i in range(1, 21):
            client.ping(b"ping%04d" % i)
            if not flush() or not read_until_acks(i):
                break
    goaway = of_kind(events, w.EV_GOAWAY)
    assert goaway, f"grpcio never sent GOAWAY; events {events}"
    assert (goaway[0].error_code, goaway[0].data) == (ENHANCE_YOUR_CALM, b"too_many_pings")
    assert len(of_kind(events, w.EV_PING_ACK)) <= 4, events
