"""Floods on every listener of a proxy-server process, while tunnels keep flowing.

At once, on each listener the server has (the frontend's Unix socket, or its TCP port with
mTLS in the long form; the agent port; the health and admin ports), peers that never read
flood it: HTTP/2 SETTINGS and PING frames a few at a time on the gRPC listeners, pipelined
HTTP/1.1 requests on the HTTP ones, beside slowloris connections on the health port. Each
must find the server no longer reading it, or closed; never a server that reads and throws
away (docs/architecture.md, "Bad input").
Peers that do read and send SETTINGS by the thousand must get GOAWAY ENHANCE_YOUR_CALM
(csrc/h2_flood.pxi). Meanwhile a probe makes round trips through fresh tunnels, and
afterwards the server's descriptors are back, its memory stayed bounded and its log says
what it refused.

The long form runs the same floods on upstream's server and prints both.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from tests.support.agent_peer import backend, echo
from tests.support.h2frames import ping, settings_frame

from .checks import alive, clean_log, fds_back
from .conftest import LONG, Chaos, impls
from .hostile import h2_flood, pipelined_flood, reading_flood, slowloris, tls_client
from .programs import LOOPBACK, Program, ServerPorts, ServerSpec, start_agent, start_server
from .traffic import Prober

pytestmark = pytest.mark.timeout(900 if LONG else 200)

#: Memory a flooded server may add to its baseline: a few connections' buffers
#: (the engine's MAX_OUTBOUND_ACK answers, the transport's high-water marks) each.
RSS_BOUND_KIB = 64 << 10
#: What a flooding HTTP/1 client pipelines: each request gets a small answer it never reads.
PIPELINED = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
#: The probe dials 127.0.0.1: the agent that says it serves that address takes every dial.
STRATEGIES = "--proxy-strategies=destHost,default"
AGENT_IDENTIFIERS = "--agent-identifiers=ipv4=127.0.0.1"
GOAWAY_CALM = "goaway 0xb"
#: Connections holding half a request head on the health port during the floods.
SLOWLORIS = 100

CASES = [("grpc", False), ("http-connect", False)]
if LONG:
    CASES += [("grpc", True), ("http-connect", True)]


@dataclass
class Outcome:
    floods: dict[str, str]
    cpu: float
    rss_added_kib: int
    probes: str


async def attack(chaos: Chaos, impl: str, mode: str, tcp: bool) -> tuple[Outcome, Program]:
    spec = ServerSpec(
        impl,
        chaos.certs,
        chaos.workdir,
        mode=mode,
        ports=ServerPorts.pick(tcp_frontend=tcp),
        extra=(STRATEGIES,),
    )
    server = chaos.keep(await start_server(spec, f"server-{mode}"))
    chaos.keep(
        await start_agent(
            impl, chaos.certs, chaos.workdir, spec.ports.agent, f"a-{mode}", AGENT_IDENTIFIERS
        )
    )
    await server.wait_for("/readyz")
    agent_tls = tls_client(chaos.certs, "h2")
    frontend: str | tuple[str, int] = (LOOPBACK, spec.ports.frontend) if tcp else spec.uds
    alpn = "h2" if mode == "grpc" else "http/1.1"
    frontend_tls = tls_client(chaos.certs, alpn) if tcp else None
    async with backend(echo) as echo_backend:
        # A TCP frontend has no Unix socket for the probe: the floods' other checks remain.
        prober = None
        if not tcp:
            prober = chaos.closing(Prober(spec.uds, echo_backend.address, mode).start())
        if prober is not None:
            await prober.flowing()
        await asyncio.sleep(0.5)  # let the start-up's garbage settle before the baseline
        before = server.stats()
        floods = {
            "agent SETTINGS": h2_flood((LOOPBACK, spec.ports.agent), agent_tls, settings_frame()),
            "agent PING": h2_flood((LOOPBACK, spec.ports.agent), agent_tls, ping()),
            "agent SETTINGS, reading": reading_flood((LOOPBACK, spec.ports.agent), agent_tls),
            "health": pipelined_flood((LOOPBACK, spec.ports.health), None, PIPELINED),
            "admin": pipelined_flood((LOOPBACK, spec.ports.admin), None, PIPELINED),
        }
        if mode == "grpc":
            floods["frontend SETTINGS"] = h2_flood(frontend, frontend_tls, settings_frame())
            floods["frontend PING"] = h2_flood(frontend, frontend_tls, ping())
            floods["frontend SETTINGS, reading"] = reading_flood(frontend, frontend_tls)
        else:
            floods["frontend pipelined"] = pipelined_flood(frontend, frontend_tls, PIPELINED)
        # Slowloris beside the floods: half-written request heads on the health port must
        # not keep /healthz from answering.
        async with slowloris(LOOPBACK, spec.ports.health, SLOWLORIS):
            results = await asyncio.gather(*floods.values())
            peak = server.stats()
            healthz, _ = await server.get("/healthz")
            assert healthz == 200, f"{impl}: /healthz answered {healthz} beside slowloris"
        if prober is not None:
            await prober.flowing()
            await prober.stop()
    outcomes = {name: r.outcome for name, r in zip(floods, results, strict=True)}
    await server.wait_for("/readyz")
    await fds_back(server, before.fds)
    alive(server)
    clean_log(server)
    probes = prober.summary() if prober is not None else "no probe (TCP frontend)"
    return Outcome(outcomes, peak.cpu - before.cpu, peak.rss_kib - before.rss_kib, probes), server


def check_ours(outcome: Outcome, server: Program) -> None:
    for name, result in outcome.floods.items():
        if name.endswith("reading"):
            assert result.startswith(GOAWAY_CALM), (name, result)
            assert "too_many_control_frames" in result, (name, result)
        else:
            assert result in ("stopped reading", "closed"), (name, result)
    assert outcome.rss_added_kib < RSS_BOUND_KIB, outcome
    log = server.log()
    assert "HTTP/2 connection error: too many control frames" in log, log[-3000:]


@pytest.mark.parametrize(("mode", "tcp"), CASES)
def test_floods_on_every_listener(chaos: Chaos, mode: str, tcp: bool) -> None:
    async def main() -> None:
        results: dict[str, Outcome] = {}
        for impl in impls():
            results[impl], server = await attack(chaos, impl, mode, tcp)
            if impl == "ours":
                check_ours(results[impl], server)
            for program in chaos.programs:
                program.stop()
        frontend = "TCP+mTLS" if tcp else "Unix socket"
        chaos.note(f"floods, {mode} server, frontend on a {frontend}:")
        for name in results["ours"].floods:
            chaos.note(
                f"  {name:28} "
                + " | ".join(f"{impl}: {r.floods[name]}" for impl, r in results.items())
            )
        for impl, r in results.items():
            chaos.note(
                f"  {impl}: server CPU {r.cpu:.2f} s during the floods, RSS "
                f"{r.rss_added_kib / 1024:+.1f} MiB; {r.probes}"
            )

    chaos.run(main())
