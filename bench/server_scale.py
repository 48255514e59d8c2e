"""The proxy-server at cluster scale: ours against upstream v0.36.0, same run, held by a
swarm of fake agents (``loadgen swarm``, bench/loadgen/swarm.go: one TLS connection and
one Connect stream per agent, answering dials as a backend would; Go, so that only the
server's cost is measured, not an agent program's).

Figures, per implementation and agent count N (the servers get the same command line,
bench/_tunnel_procs.py's flags, gRPC frontend on a Unix socket):

- **KiB per agent**: (server RSS with N agents held - RSS before) / N;
- **connect CPU**: server CPU (user + system) while the N agents connect, per agent, ms;
- **storm**: N agents connecting at once (``--batch`` in flight): seconds from the first
  dial to the last agent's headers, and the slowest single connect;
- **tunnels**: with the N agents held, tunnel set-ups through the frontend
  (``loadgen setup``, ``--workers`` loops for ``--setup-seconds``; the server picks an
  agent per dial, so dials spread over all of them): tunnels/s and server CPU per tunnel;
- **churn** (``--churn R``): R rounds of the N agents connecting and all leaving; server
  RSS with them held and after they left, per round; the figure is the last round's RSS
  held / the second round's (target: <= 1.2).

Usage::

    .venv/bin/python -m bench.server_scale                      # N = 1000, 3000; ~3 min
    .venv/bin/python -m bench.server_scale --agents 5000 --churn 20 --churn-agents 2000
    .venv/bin/python -m bench.server_scale --quick              # N = 300, churn 4 x 300

Ratios are ours / upstream of the same run; targets are reported, never asserted. The
swarm shares the machine's two CPUs with the server: only server CPU per unit of work is
compared, and the storm figures include the swarm's own TLS work.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._echo_proc import ChildError, cpu_seconds, rss_kib
from bench._tunnel_procs import (
    Certs,
    Proc,
    Procs,
    build_loadgen,
    build_upstream,
    free_ports,
    make_certs,
    program_command,
    server_flags,
    wait_ready,
)

IMPLS = ("ours", "upstream")
#: Seconds for every agent of a round to connect (5,000 TLS handshakes on 2 cores, both
#: sides, take about 15 s), and for them to leave.
JOIN_TIMEOUT = 300.0
LEAVE_TIMEOUT = 60.0
#: The server's RSS is read this long after a round settled (a lazily freed buffer, a
#: delayed GC) rather than at once.
SETTLE = 1.0
READY_TIMEOUT = 30.0
#: Targets of the issue: churn RSS within 1.2x of round 2's; connect CPU <= upstream's;
#: memory per agent <= 0.5x upstream's; tunnel CPU <= 0.7x upstream's.
CHURN_TARGET = 1.2
MEMORY_TARGET = 0.5
TUNNEL_CPU_TARGET = 0.7


@dataclass
class Server:
    impl: str
    proc: Proc
    agent_port: int
    uds: str


@dataclass
class Setup:
    procs: Procs
    certs: Certs
    tmp: Path
    loadgen: Path
    upstream: Path | None
    batch: int
    results: dict[str, Any] = field(default_factory=dict)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def start_server(s: Setup, impl: str) -> Server:
    agent_port, health, admin = free_ports(3)
    uds = str(s.tmp / f"{impl}-{agent_port}.sock")
    program = program_command(impl, "server", s.upstream)
    flags = server_flags("grpc", uds, s.certs, agent_port=agent_port, health=health, admin=admin)
    proc = s.procs.start(f"{impl}-server", [*program, *flags])
    wait_ready(proc, health, "/healthz")
    return Server(impl, proc, agent_port, uds)


def start_swarm(s: Setup, server: Server, agents: int) -> Proc:
    c = s.certs
    swarm = s.procs.start(
        f"swarm-{server.impl}",
        [
            str(s.loadgen),
            "swarm",
            f"-target=127.0.0.1:{server.agent_port}",
            f"-ca={c.ca}",
            f"-cert={c.client_cert}",
            f"-key={c.client_key}",
            f"-conns={agents}",
            f"-batch={s.batch}",
        ],
    )
    swarm.expect("READY", READY_TIMEOUT)
    return swarm


def join(swarm: Proc, server: Server) -> tuple[dict[str, Any], float]:
    """One round of the swarm connecting: its report, and the server's CPU seconds."""
    before = cpu_seconds(server.proc.pid)
    swarm.write_line("JOIN")
    report: dict[str, Any] = json.loads(swarm.expect("JOINED", JOIN_TIMEOUT))
    spent = cpu_seconds(server.proc.pid) - before
    if report.get("failures"):
        progress(f"{server.impl}: {report['failures']} agents failed: {report.get('error')}")
    return report, spent


def leave(swarm: Proc) -> None:
    swarm.write_line("LEAVE")
    swarm.expect("LEFT", LEAVE_TIMEOUT)


def settled_rss(server: Server) -> int:
    time.sleep(SETTLE)
    return rss_kib(server.proc.pid)


def tunnels(s: Setup, server: Server, workers: int, seconds: float) -> dict[str, float]:
    """Tunnel set-ups through the frontend while the swarm holds the agents."""
    gen = s.procs.start(
        f"setup-{server.impl}",
        [
            str(s.loadgen),
            "setup",
            "-mode=grpc",
            f"-uds={server.uds}",
            "-target=swarm-backend:1",
            f"-workers={workers}",
            f"-duration={seconds}s",
        ],
    )
    gen.expect("READY", READY_TIMEOUT)
    before = cpu_seconds(server.proc.pid)
    gen.write_line("GO")
    r = json.loads(gen.expect("RESULT", seconds + JOIN_TIMEOUT))
    spent = cpu_seconds(server.proc.pid) - before
    s.procs.finish(gen, READY_TIMEOUT)
    if "error" in r and not r.get("tunnels"):
        raise ChildError(f"{server.impl}: tunnel set-ups failed: {r['error']}")
    made = int(r["tunnels"])
    return {
        "tunnels_per_s": round(made / float(r["seconds"]), 1),
        "server_cpu_ms_per_tunnel": round(spent / max(made, 1) * 1e3, 3),
        "failures": int(r.get("failures", 0)),
    }


def scale_run(s: Setup, impl: str, agents: int, args: argparse.Namespace) -> dict[str, Any]:
    server = start_server(s, impl)
    try:
        swarm = start_swarm(s, server, agents)
        time.sleep(SETTLE)
        base = rss_kib(server.proc.pid)
        report, spent = join(swarm, server)
        held = settled_rss(server)
        connected = max(int(report["connected"]), 1)
        out: dict[str, Any] = {
            "connected": int(report["connected"]),
            "rss_base_mib": round(base / 1024, 1),
            "rss_held_mib": round(held / 1024, 1),
            "kib_per_agent": round((held - base) / connected, 1),
            "connect_cpu_ms": round(spent / connected * 1e3, 3),
            "storm_s": round(float(report["seconds"]), 2),
            "worst_connect_ms": round(float(report["max_ms"]), 1),
            "p50_connect_ms": round(float(report["p50_ms"]), 1),
        }
        if args.setup_seconds > 0:
            out |= tunnels(s, server, args.workers, args.setup_seconds)
        leave(swarm)
        quit_swarm(s, swarm)
        return out
    finally:
        s.procs.stop(server.proc)


def quit_swarm(s: Setup, swarm: Proc) -> None:
    swarm.write_line("QUIT")
    s.procs.finish(swarm, READY_TIMEOUT)


def churn_run(s: Setup, impl: str, agents: int, rounds: int) -> dict[str, Any]:
    server = start_server(s, impl)
    try:
        swarm = start_swarm(s, server, agents)
        held: list[float] = []
        left: list[float] = []
        for r in range(rounds):
            join(swarm, server)
            held.append(round(settled_rss(server) / 1024, 1))
            leave(swarm)
            left.append(round(settled_rss(server) / 1024, 1))
            progress(f"churn {impl} round {r + 1}/{rounds}: held {held[-1]} MiB, left {left[-1]}")
        quit_swarm(s, swarm)
        ratio = round(held[-1] / held[1], 2) if len(held) > 1 else None
        return {"held_mib": held, "left_mib": left, "last_over_second": ratio}
    finally:
        s.procs.stop(server.proc)


def ratio(ours: float, upstream: float) -> str:
    return f"{ours / upstream:.2f}x" if upstream else "-"


def _target(ours: float | None, upstream: float | None, target: float | None) -> str:
    if target is None or ours is None or upstream is None:
        return ""
    met = ours is not None and upstream is not None and upstream > 0 and ours / upstream <= target
    return f"<= {target:g}x  {'met' if met else 'NOT met'}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def report_table(results: dict[str, Any]) -> str:
    lines = ["server at scale: ours vs upstream v0.36.0, same run (fake agents: loadgen swarm)"]
    figures = [
        ("kib_per_agent", "KiB per agent", MEMORY_TARGET),
        ("connect_cpu_ms", "connect CPU, ms/agent", 1.0),
        ("storm_s", "storm, s", None),
        ("worst_connect_ms", "slowest connect, ms", 2.0),
        ("tunnels_per_s", "tunnels/s", None),
        ("server_cpu_ms_per_tunnel", "server CPU, ms/tunnel", TUNNEL_CPU_TARGET),
    ]
    for n, by_impl in sorted(results.get("scale", {}).items(), key=lambda kv: int(kv[0])):
        lines += [
            f"\nN = {n} agents",
            f"{'figure':26s} {'ours':>9s} {'upstream':>9s} ours/up  target",
        ]
        for key, label, target in figures:
            o = by_impl.get("ours", {}).get(key)
            u = by_impl.get("upstream", {}).get(key)
            r = ratio(o, u) if o is not None and u else "-"
            lines.append(
                f"{label:26s} {_cell(o):>9s} {_cell(u):>9s} {r:>7s}  {_target(o, u, target)}"
            )
    churn = results.get("churn")
    if churn:
        lines.append(f"\nchurn: {churn['agents']} agents x {churn['rounds']} rounds, RSS held, MiB")
        for impl, c in churn["by_impl"].items():
            last = c["last_over_second"]
            mark = ""
            if last is not None:
                met = "met" if last <= CHURN_TARGET else "NOT met"
                mark = f"  last/2nd {last} (target <= {CHURN_TARGET}: {met})"
            lines.append(f"  {impl:9s} {' '.join(f'{v:g}' for v in c['held_mib'])}{mark}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--batch", type=int, default=200, help="agents connecting at once")
    parser.add_argument("--workers", type=int, default=16, help="tunnel set-up loops")
    parser.add_argument("--setup-seconds", type=float, default=3.0, help="0: no tunnels")
    parser.add_argument("--churn", type=int, default=0, help="rounds of the churn mode")
    parser.add_argument("--churn-agents", type=int, default=2000)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--quick", action="store_true", help="N = 300, churn 4 x 300, 1 s set-ups")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.agents, args.churn, args.churn_agents, args.setup_seconds = [300], 4, 300, 1.0
    up = build_upstream() if "upstream" in args.impls else None
    results: dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kf-scale-") as d:
        tmp = Path(d)
        procs = Procs(tmp)
        s = Setup(procs, make_certs(tmp), tmp, build_loadgen(), up, args.batch)
        try:
            scale: dict[str, dict[str, Any]] = {}
            for n in args.agents:
                for impl in args.impls:
                    r = scale_run(s, impl, n, args)
                    scale.setdefault(str(n), {})[impl] = r
                    progress(f"N={n} {impl}: {r}")
            results["scale"] = scale
            if args.churn:
                by_impl = {
                    impl: churn_run(s, impl, args.churn_agents, args.churn) for impl in args.impls
                }
                results["churn"] = {
                    "agents": args.churn_agents,
                    "rounds": args.churn,
                    "by_impl": by_impl,
                }
        finally:
            procs.kill_all()
    results["seconds"] = round(time.monotonic() - started, 1)
    print(report_table(results))
    print(f"{results['seconds']} s; targets reported, not asserted")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
