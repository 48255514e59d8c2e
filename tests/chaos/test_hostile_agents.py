"""Authenticated agents that misbehave, against a proxy-server process serving tunnels.

- A flapping agent connects again and again with a live agent's ID (TLS, Connect, the
  server's response headers, hang up).
- A hostile fake agent (grpcio, packets built by the official protobuf runtime) sends
  packets the server must decode and reject: DATA, CLOSE_RSP and DIAL_RSP for connections
  and dials that do not exist, and packets whose payload is not their type's.
- A reset flood: Connect streams opened and reset at once (HTTP/2 "rapid reset"),
  reconnecting whenever the server cuts the connection.

Meanwhile a probe makes round trips through fresh tunnels (they go to the live agent:
``destHost`` routing). Afterwards the live agent is still there, the server's descriptors
are back, its memory stayed bounded and its log has no traceback. The server's CPU per
connect and per packet, and the probes' latency, are printed (upstream's beside ours in the
long form); ``bench/abuse.py`` is the measurement of record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from tests.support.agent_peer import Backend, backend, echo

from .checks import alive, clean_log, fds_back, rss_back
from .conftest import LONG, Chaos, impls
from .hostile import CRASHES_UPSTREAM, bogus_packets, flap, reset_flood
from .programs import Program, ServerSpec, start_agent, start_server
from .traffic import Prober

pytestmark = pytest.mark.timeout(900 if LONG else 200)

#: The probe dials 127.0.0.1: the agent that says it serves that address takes every dial,
#: never the hostile one.
STRATEGIES = "--proxy-strategies=destHost,default"
AGENT_IDENTIFIERS = "--agent-identifiers=ipv4=127.0.0.1"
LIVE = "live-agent"
#: Connects of the flapping agent; bogus packets of each kind; seconds of reset flood.
FLAPS = 2000 if LONG else 150
BOGUS_EACH = 5000 if LONG else 1000
BOGUS_KINDS = ("data-unknown", "close-rsp-unknown", "dial-rsp-unknown")
#: Packets whose payload is not their type's: one is enough to crash upstream's server.
MISMATCHED = 10
#: What our server logs when it refuses a peer for flooding control frames.
CONTROL_FLOOD_LINE = "HTTP/2 connection error: too many control frames"
#: The family that counts what the server received (upstream's name, ours too).
STREAM_PACKETS = "konnectivity_network_proxy_server_stream_packets_total{"
RESET_SECONDS = 12.0 if LONG else 3.0
#: Memory a server may add under these attacks: a few connections' buffers and the
#: streams the flood budgets let through (csrc/h2_flood.pxi, server/listeners.py).
RSS_BOUND_KIB = 64 << 10
#: The server's CPU counts as settled (it has handled what was sent) when it grows by
#: less than this over SETTLE_STEP seconds.
SETTLED_CPU = 0.01
SETTLE_STEP = 0.3
SETTLE_TIMEOUT = 30.0
#: Seconds upstream's server gets to exit after the packets that make it panic.
CRASH_WAIT = 5.0


@dataclass
class Victim:
    server: Program
    spec: ServerSpec
    prober: Prober


async def victim(chaos: Chaos, impl: str, echo_backend: Backend) -> Victim:
    spec = ServerSpec(impl, chaos.certs, chaos.workdir, extra=(STRATEGIES,))
    server = chaos.keep(await start_server(spec, f"server-{impl}"))
    chaos.keep(
        await start_agent(
            impl, chaos.certs, chaos.workdir, spec.ports.agent, LIVE, AGENT_IDENTIFIERS
        )
    )
    await server.wait_for("/readyz")
    prober = chaos.closing(Prober(spec.uds, echo_backend.address, "grpc").start())
    await prober.flowing()
    return Victim(server, spec, prober)


async def settled(server: Program) -> float:
    """Wait until the server's CPU stops climbing; its CPU seconds then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    last = server.stats().cpu
    while True:
        await asyncio.sleep(SETTLE_STEP)
        now = server.stats().cpu
        if now - last < SETTLED_CPU or loop.time() > deadline:
            return now
        last = now


async def after(v: Victim, baseline_fds: int) -> None:
    """The checks every scenario ends with: tunnels flow, the live agent is there,
    descriptors are back, the server is alive and its log clean."""
    await v.prober.flowing()
    await v.prober.stop()
    await v.server.wait_for("/readyz")
    await fds_back(v.server, baseline_fds)
    alive(v.server)
    clean_log(v.server)


def stop_all(chaos: Chaos) -> None:
    for program in chaos.programs:
        program.stop()


Scenario = Callable[[Chaos, str, Backend], Awaitable[str]]


def compare(chaos: Chaos, title: str, scenario: Scenario) -> None:
    """Run ``scenario`` on each implementation in turn (ours, and upstream's in the long
    form), then print its line for each."""

    async def main() -> None:
        figures: dict[str, str] = {}
        async with backend(echo) as echo_backend:
            for impl in impls():
                figures[impl] = await scenario(chaos, impl, echo_backend)
                stop_all(chaos)
        chaos.note(title)
        for impl, line in figures.items():
            chaos.note(f"  {impl}: {line}")

    chaos.run(main())


async def flapping(chaos: Chaos, impl: str, echo_backend: Backend) -> str:
    v = await victim(chaos, impl, echo_backend)
    before = v.server.stats()
    loop = asyncio.get_running_loop()
    started = loop.time()
    served = await flap(v.spec.ports.agent, chaos.certs, LIVE, FLAPS)
    took = loop.time() - started
    cpu = await settled(v.server) - before.cpu
    rss = v.server.stats().rss_kib - before.rss_kib
    assert served == FLAPS, f"{impl}: {served} of {FLAPS} connects answered"
    await after(v, before.fds)
    if impl == "ours":
        assert rss < RSS_BOUND_KIB
    return (
        f"{1000 * cpu / FLAPS:.2f} ms server CPU per connect, {FLAPS / took:.0f} connects/s, "
        f"RSS {rss / 1024:+.1f} MiB; {v.prober.summary()}"
    )


def test_flapping_agent(chaos: Chaos) -> None:
    compare(chaos, f"flapping agent, {FLAPS} connects with a live agent's ID:", flapping)


async def packets_from_agents(server: Program) -> int:
    """Packets the server says it received from agents (upstream's metric, ours too)."""
    status, body = await server.get("/metrics")
    assert status == 200, f"{server.name}: /metrics answered {status}"
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(STREAM_PACKETS) and 'segment="from_agent"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


async def hostile(chaos: Chaos, impl: str, echo_backend: Backend) -> str:
    v = await victim(chaos, impl, echo_backend)
    port = v.spec.ports.agent
    before = v.server.stats()
    await v.prober.stop()  # the probes' packets would count with the bogus ones
    counted = await packets_from_agents(v.server)
    cpu = v.server.stats().cpu
    refusals = v.server.log().count(CONTROL_FLOOD_LINE)
    agent = await bogus_packets(port, chaos.certs, BOGUS_KINDS, BOGUS_EACH)
    cpu = await settled(v.server) - cpu
    handled = await packets_from_agents(v.server) - counted
    # grpcio's PINGs in answer to our data may exceed the agent listener's control-frame
    # budget (server/listeners.py): then the server says so and cuts it.
    refused = v.server.log().count(CONTROL_FLOOD_LINE) > refusals
    cut = ", then cut with GOAWAY too_many_control_frames" if refused else ""
    await agent.close()
    sent = BOGUS_EACH * len(BOGUS_KINDS)
    assert handled > 0, f"{impl}: no bogus packet reached the server"
    line = (
        f"{1e6 * cpu / handled:.0f} µs server CPU per bogus packet ({handled} of {sent} "
        f"handled{cut})"
    )
    v.prober = chaos.closing(Prober(v.spec.uds, echo_backend.address, "grpc").start())
    # Packets whose payload is not their type's: upstream's server panics.
    crasher = await bogus_packets(port, chaos.certs, [CRASHES_UPSTREAM], MISMATCHED)
    await settled(v.server)
    await crasher.close()
    if impl == "upstream":  # a panicking Go program takes a moment to exit
        for _ in range(int(CRASH_WAIT / SETTLE_STEP)):
            if not v.server.alive():
                break
            await asyncio.sleep(SETTLE_STEP)
    if impl == "ours" or v.server.alive():
        await after(v, before.fds)
        if impl == "ours":
            assert v.server.stats().rss_kib - before.rss_kib < RSS_BOUND_KIB
        return f"{line}; survives {CRASHES_UPSTREAM} packets; {v.prober.summary()}"
    await v.prober.stop()
    crash = "panic" if "panic:" in v.server.log() else "exit"
    assert v.server.proc is not None
    return f"{line}; {crash} on {CRASHES_UPSTREAM} packets (exit {v.server.proc.poll()})"


def test_hostile_fake_agent(chaos: Chaos) -> None:
    title = f"hostile fake agent, {BOGUS_EACH} of each of {', '.join(BOGUS_KINDS)}:"
    compare(chaos, title, hostile)


async def resetting(chaos: Chaos, impl: str, echo_backend: Backend) -> str:
    v = await victim(chaos, impl, echo_backend)
    await asyncio.sleep(1.0)  # some probes before, for their latency
    quiet = v.prober.summary()
    before = v.server.stats()
    probes_before = len(v.prober.latencies)
    peak = [before.rss_kib]

    async def sample() -> None:
        while True:
            peak.append(v.server.stats().rss_kib)
            await asyncio.sleep(0.1)

    sampler = asyncio.get_running_loop().create_task(sample())
    try:
        streams, connections = await reset_flood(
            v.spec.ports.agent, chaos.certs, "reset-flooder", RESET_SECONDS
        )
    finally:
        sampler.cancel()
    during = sorted(v.prober.latencies[probes_before:])
    await settled(v.server)
    await after(v, before.fds)
    top = max(peak)
    if impl == "ours":
        assert top - before.rss_kib < RSS_BOUND_KIB, (top, before.rss_kib)
    back = ""
    if LONG:  # memory given back within a minute of idleness (cli/malloc.py)
        took = await rss_back(v.server, before.rss_kib, must=impl == "ours")
        back = ", not within 20 % after 60 s idle" if took is None else ""
        back = back or f", within 20 % after {took:.0f} s idle"
    rest = v.server.stats().rss_kib
    p50 = f"{1000 * during[len(during) // 2]:.1f} ms" if during else "none"
    return (
        f"{streams} streams over {connections} connections; RSS {before.rss_kib >> 10} -> "
        f"{top >> 10} (peak) -> {rest >> 10} MiB{back}; probes during: {len(during)}, "
        f"p50 {p50} (before: {quiet})"
    )


def test_reset_flood_on_agent_port(chaos: Chaos) -> None:
    compare(chaos, f"reset flood on the agent port, {RESET_SECONDS:.0f} s:", resetting)
