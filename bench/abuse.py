"""What hostile agents cost the proxy-server: ours against upstream v0.36.0, same run.

Two figures, each the server's CPU time (utime + stime from /proc) over the attack divided
by what the attacker got done:

- **µs per bogus packet**: an authenticated fake agent (client certificate) holds one
  Connect stream and sends packets the server must decode and reject
  (``bench/_abuse_peer.py KINDS``): DATA for unknown connectIDs (answered with CLOSE_REQ),
  CLOSE_RSP for unknown IDs (ignored), DIAL_RSP for unknown dials (counted, answered with
  CLOSE_REQ), and, to ours only, packets whose payload does not match their type (they
  crash upstream's server).
- **ms per agent connect**: while a real agent is connected, a flapping agent connects with
  its ID at ``--rate`` per second (TLS handshake, Connect, the server's headers, hang up);
  also the rate the server kept up with.

Usage::

    .venv/bin/python -m bench.abuse                  # 3 runs of each, ~2 minutes
    .venv/bin/python -m bench.abuse --runs 1 --count 20000 --flap-seconds 3

Both servers get the same command line (bench/_tunnel_procs.py's flags), the same
generator and the same load; runs are interleaved. Ratios are ours / upstream of the
medians (below 1: ours costs less); targets are reported, never asserted. The generator
shares the machine's CPUs with the server, which is why only server CPU per unit of work
is compared, never wall-clock throughput alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench._echo_proc import ChildError, cpu_seconds
from bench._tunnel_procs import (
    LOOPBACK,
    Certs,
    Proc,
    Procs,
    build_upstream,
    free_ports,
    make_certs,
    program_command,
    server_flags,
    wait_ready,
)

IMPLS = ("ours", "upstream")
BOGUS_KINDS = ("data-unknown", "close-rsp-unknown", "dial-rsp-unknown", "mismatch")
# The one kind upstream's server cannot survive (pkg/server/server.go serveRecvBackend
# reads payloads without checking them).
CRASHES_UPSTREAM = "mismatch"
# Seconds for a peer to connect, for a run to finish.
READY_TIMEOUT = 30.0
RUN_TIMEOUT = 120.0
LIVE_AGENT = "live-agent"


@dataclass(frozen=True)
class Setup:
    """What every run shares: its children, certificates, folder and upstream's binaries."""

    procs: Procs
    certs: Certs
    tmp: Path
    upstream: Path | None


@dataclass
class Figures:
    """Every run's figure per (scenario, impl)."""

    runs: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    rates: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def add(self, scenario: str, impl: str, value: float, rate: float | None = None) -> None:
        self.runs.setdefault((scenario, impl), []).append(value)
        if rate is not None:
            self.rates.setdefault((scenario, impl), []).append(rate)


def start_server(
    procs: Procs, impl: str, certs: Certs, tmp: Path, upstream: Path | None
) -> tuple[Proc, int]:
    """A gRPC-mode proxy-server; (process, agent port)."""
    agent_port, health, admin = free_ports(3)
    server = procs.start(
        f"{impl}-server",
        [
            *program_command(impl, "server", upstream),
            *server_flags(
                "grpc",
                f"{tmp}/{impl}-{agent_port}.sock",
                certs,
                agent_port=agent_port,
                health=health,
                admin=admin,
            ),
        ],
    )
    wait_ready(server, health, "/healthz")
    return server, agent_port


def start_agent(procs: Procs, impl: str, certs: Certs, port: int, upstream: Path | None) -> Proc:
    health, admin = free_ports(2)
    agent = procs.start(
        f"{impl}-agent",
        [
            *program_command(impl, "agent", upstream),
            f"--agent-id={LIVE_AGENT}",
            f"--ca-cert={certs.ca}",
            f"--agent-cert={certs.client_cert}",
            f"--agent-key={certs.client_key}",
            f"--proxy-server-host={LOOPBACK}",
            f"--proxy-server-port={port}",
            f"--health-server-host={LOOPBACK}",
            f"--health-server-port={health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-server-port={admin}",
        ],
    )
    wait_ready(agent, health, "/readyz")
    return agent


def _peer(procs: Procs, mode: str, certs: Certs, port: int, *extra: str) -> Proc:
    return procs.start(
        f"peer-{mode}",
        [
            sys.executable,
            "-m",
            "bench._abuse_peer",
            mode,
            f"--port={port}",
            f"--ca={certs.ca}",
            f"--cert={certs.client_cert}",
            f"--key={certs.client_key}",
            *extra,
        ],
    )


def bogus_run(setup: Setup, impl: str, kind: str, count: int, pace: str) -> float:
    """Server µs per bogus packet."""
    procs, certs = setup.procs, setup.certs
    server, port = start_server(procs, impl, certs, setup.tmp, setup.upstream)
    try:
        peer = _peer(
            procs, "bogus", certs, port, f"--kind={kind}", f"--count={count}", f"--pace={pace}"
        )
        peer.expect("ready", READY_TIMEOUT)
        before = cpu_seconds(server.pid)
        peer.write_line("go")
        sent, _answers, _seconds = peer.expect("done", RUN_TIMEOUT).split()
        spent = cpu_seconds(server.pid) - before
        if int(sent) < count:
            print(f"{impl} {kind} {pace}: the server ended the stream early", file=sys.stderr)
        if not server.alive():
            raise ChildError(f"{impl} server died under {kind}")
        procs.finish(peer, READY_TIMEOUT)
        return spent / int(sent) * 1e6
    finally:
        procs.stop(server)


def flap_run(setup: Setup, impl: str, rate: float, seconds: float) -> tuple[float, float]:
    """(server ms per connect, connects per second achieved)."""
    procs, certs = setup.procs, setup.certs
    server, port = start_server(procs, impl, certs, setup.tmp, setup.upstream)
    agent = start_agent(procs, impl, certs, port, setup.upstream)
    try:
        peer = _peer(
            procs,
            "flap",
            certs,
            port,
            f"--agent-id={LIVE_AGENT}",
            f"--rate={rate}",
            f"--seconds={seconds}",
        )
        peer.expect("ready", READY_TIMEOUT)
        time.sleep(0.5)  # the live agent's own connect is not counted
        before = cpu_seconds(server.pid)
        peer.write_line("go")
        done, _failed, took = peer.expect("done", RUN_TIMEOUT).split()
        spent = cpu_seconds(server.pid) - before
        procs.finish(peer, READY_TIMEOUT)
        connects = int(done)
        if connects == 0:
            raise ChildError(f"{impl}: the flapping agent never connected")
        return spent / connects * 1e3, connects / float(took)
    finally:
        procs.stop(agent)
        procs.stop(server)


def report(figures: Figures, args: argparse.Namespace) -> None:
    rows = []
    bogus = [(f"bogus {k} {p}", "µs/packet") for k in BOGUS_KINDS for p in ("batch", "single")]
    for scenario, unit in [*bogus, ("flap", "ms/connect")]:
        cells = []
        for impl in IMPLS:
            runs = figures.runs.get((scenario, impl))
            cells.append(statistics.median(runs) if runs else None)
        ours, upstream = cells
        ratio = f"{ours / upstream:.2f}" if ours and upstream else "-"
        up_text = (
            f"{upstream:.1f}" if upstream else ("crashes" if CRASHES_UPSTREAM in scenario else "-")
        )
        rows.append((scenario, unit, f"{ours:.1f}" if ours else "-", up_text, ratio))
    print(f"\nServer CPU per unit of abuse, median of {args.runs} run(s); ratio ours/upstream")
    print(f"{'scenario':32} {'unit':11} {'ours':>8} {'upstream':>9} {'ratio':>6}  target")
    for scenario, unit, ours_t, up_t, ratio in rows:
        print(f"{scenario:32} {unit:11} {ours_t:>8} {up_t:>9} {ratio:>6}  <= 1.00")
    for impl in IMPLS:
        rates = figures.rates.get(("flap", impl))
        if rates:
            print(
                f"flapping agent, {impl}: {statistics.median(rates):.0f} connects/s served "
                f"of {args.rate:.0f}/s offered"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--count", type=int, default=200_000, help="bogus packets per run, batched")
    parser.add_argument(
        "--single-count", type=int, default=40_000, help="bogus packets per run, one per write"
    )
    parser.add_argument("--rate", type=float, default=500.0, help="flapping connects per second")
    parser.add_argument("--flap-seconds", type=float, default=5.0)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--kinds", nargs="+", choices=BOGUS_KINDS, default=list(BOGUS_KINDS))
    parser.add_argument("--no-flap", action="store_true")
    args = parser.parse_args()
    up = build_upstream() if "upstream" in args.impls else None
    figures = Figures()
    with tempfile.TemporaryDirectory(prefix="kf-abuse-") as d:
        tmp = Path(d)
        procs = Procs(tmp)
        setup = Setup(procs, make_certs(tmp), tmp, up)
        try:
            for run in range(args.runs):
                for kind in args.kinds:
                    for pace, count in (("batch", args.count), ("single", args.single_count)):
                        for impl in args.impls:
                            if impl == "upstream" and kind == CRASHES_UPSTREAM:
                                continue
                            us = bogus_run(setup, impl, kind, count, pace)
                            figures.add(f"bogus {kind} {pace}", impl, us)
                            print(
                                f"run {run + 1} bogus {kind} {pace} {impl}: {us:.1f} µs/packet",
                                file=sys.stderr,
                            )
                if not args.no_flap:
                    for impl in args.impls:
                        ms, rate = flap_run(setup, impl, args.rate, args.flap_seconds)
                        figures.add("flap", impl, ms, rate)
                        print(
                            f"run {run + 1} flap {impl}: {ms:.2f} ms/connect at {rate:.0f}/s",
                            file=sys.stderr,
                        )
        finally:
            procs.kill_all()
    report(figures, args)


if __name__ == "__main__":
    main()
