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
  (``loadgen setup``, ``--setup-loops`` loops for ``--setup-seconds``; the server picks an
  agent per dial, so dials spread over all of them): tunnels/s and server CPU per tunnel;
- **churn** (``--churn R``): R rounds of the N agents connecting and all leaving; server
  RSS with them held and after they left, per round; the figure is the last round's RSS
  held / the second round's (target: <= 1.2).

``--workers-compare 1 2`` instead: our server with ``--workers=1`` and with ``--workers=2``
(one supervisor process holding the listening sockets, worker processes accepting from
them, each a proxy-server of its own ID reporting the server count times the workers), and
upstream for reference, in the same run; every agent of the swarm holds one connection to
each worker (``loadgen swarm -servers=W``, dialling the one address until it saw W server
IDs), and the figures above (storm, slowest connect, connect CPU, KiB per agent, tunnels/s,
CPU per tunnel) with the server's CPU and RSS summed over its process tree; the table
gives each worker count's ratio to one worker's (bench/README.md, "Worker processes").

Usage::

    .venv/bin/python -m bench.server_scale                      # N = 1000, 3000; ~3 min
    .venv/bin/python -m bench.server_scale --agents 5000 --churn 20 --churn-agents 2000
    .venv/bin/python -m bench.server_scale --quick              # N = 300, churn 4 x 300
    .venv/bin/python -m bench.server_scale --workers-compare 1 2 --agents 2000

Ratios are ours / upstream of the same run; targets are reported, never asserted. The
swarm shares the machine's two CPUs with the server: only server CPU per unit of work is
compared, and the storm figures include the swarm's own TLS work. Server CPU and RSS are
those of the server's process tree (its worker processes with ``--workers``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._echo_proc import ChildError, cpu_seconds, machine_busy_seconds
from bench._machine import describe_machine
from bench._scale_report import median_run, report_table, workers_table
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
    tree_cpu_seconds,
    tree_pids,
    tree_rss_kib,
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


@dataclass(frozen=True)
class Variant:
    """A server as measured: an implementation, and for ours with ``--workers`` how many
    worker processes (0: the flag not given, as upstream, which has none)."""

    impl: str
    workers: int = 0

    @property
    def name(self) -> str:
        return f"{self.impl}-{self.workers}w" if self.workers else self.impl

    @property
    def flags(self) -> list[str]:
        return [f"--workers={self.workers}"] if self.workers else []

    @property
    def servers(self) -> int:
        """Distinct server IDs behind the agent port: one per worker."""
        return max(self.workers, 1)


@dataclass
class Server:
    variant: Variant
    proc: Proc
    agent_port: int
    uds: str

    @property
    def impl(self) -> str:
        return self.variant.name


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


def start_server(s: Setup, variant: Variant) -> Server:
    agent_port, health, admin = free_ports(3)
    uds = str(s.tmp / f"{variant.name}-{agent_port}.sock")
    program = program_command(variant.impl, "server", s.upstream)
    flags = server_flags("grpc", uds, s.certs, agent_port=agent_port, health=health, admin=admin)
    proc = s.procs.start(f"{variant.name}-server", [*program, *flags, *variant.flags])
    wait_ready(proc, health, "/healthz")
    return Server(variant, proc, agent_port, uds)


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
            f"-servers={server.variant.servers}",
        ],
    )
    swarm.expect("READY", READY_TIMEOUT)
    return swarm


class Phase:
    """CPU seconds over one phase of a run: the server's process tree, the benchmark's
    clients (``pids``: the swarm, the set-up generator), and the whole machine; ``busy``
    is the machine's use and ``others`` that of everything else on it (other work, which
    skews the figures), each as a fraction of all its CPUs."""

    def __init__(self, server: Server, *pids: int) -> None:
        self.root, self.pids = server.proc.pid, pids
        self.t0, self.machine = time.monotonic(), machine_busy_seconds()
        self.server_s = tree_cpu_seconds(self.root)
        self.clients_s = sum(cpu_seconds(p) for p in pids)
        self.busy = self.others = 0.0

    def end(self) -> Phase:
        self.server_s = tree_cpu_seconds(self.root) - self.server_s
        self.clients_s = sum(cpu_seconds(p) for p in self.pids) - self.clients_s
        machine = machine_busy_seconds() - self.machine
        capacity = max(time.monotonic() - self.t0, 1e-9) * (os.cpu_count() or 1)
        self.busy = round(machine / capacity, 2)
        self.others = round(max(machine - self.server_s - self.clients_s, 0.0) / capacity, 2)
        return self


def join(swarm: Proc, server: Server) -> tuple[dict[str, Any], float]:
    """One round of the swarm connecting: its report (with ``swarm_cpu_s``, and ``busy``
    and ``others`` of ``Phase``), and the server's CPU seconds."""
    phase = Phase(server, swarm.pid)
    swarm.write_line("JOIN")
    report: dict[str, Any] = json.loads(swarm.expect("JOINED", JOIN_TIMEOUT))
    phase.end()
    spent = phase.server_s
    report["swarm_cpu_s"] = phase.clients_s
    report["busy"], report["others"] = phase.busy, phase.others
    if report.get("failures"):
        progress(f"{server.impl}: {report['failures']} agents failed: {report.get('error')}")
    return report, spent


def leave(swarm: Proc) -> None:
    swarm.write_line("LEAVE")
    swarm.expect("LEFT", LEAVE_TIMEOUT)


def settled_rss(server: Server) -> int:
    time.sleep(SETTLE)
    return tree_rss_kib(server.proc.pid)


def tunnels(s: Setup, server: Server, swarm: Proc, loops: int, seconds: float) -> dict[str, float]:
    """Tunnel set-ups through the frontend while the swarm holds the agents."""
    gen = s.procs.start(
        f"setup-{server.impl}",
        [
            str(s.loadgen),
            "setup",
            "-mode=grpc",
            f"-uds={server.uds}",
            "-target=swarm-backend:1",
            f"-workers={loops}",
            f"-duration={seconds}s",
        ],
    )
    gen.expect("READY", READY_TIMEOUT)
    phase = Phase(server, gen.pid, swarm.pid)
    gen.write_line("GO")
    r = json.loads(gen.expect("RESULT", seconds + JOIN_TIMEOUT))
    phase.end()
    spent = phase.server_s
    s.procs.finish(gen, READY_TIMEOUT)
    if "error" in r and not r.get("tunnels"):
        raise ChildError(f"{server.impl}: tunnel set-ups failed: {r['error']}")
    made = int(r["tunnels"])
    return {
        "tunnels_per_s": round(made / float(r["seconds"]), 1),
        "server_cpu_ms_per_tunnel": round(spent / max(made, 1) * 1e3, 3),
        "failures": int(r.get("failures", 0)),
        "tunnels_busy": phase.busy,
        "tunnels_others": phase.others,
    }


def scale_run(s: Setup, variant: Variant, agents: int, args: argparse.Namespace) -> dict[str, Any]:
    server = start_server(s, variant)
    try:
        swarm = start_swarm(s, server, agents)
        time.sleep(SETTLE)
        base = tree_rss_kib(server.proc.pid)
        report, spent = join(swarm, server)
        held = settled_rss(server)
        connected = max(int(report["connected"]), 1)
        dials = int(report.get("dials", report["connected"]))
        out: dict[str, Any] = {
            "connected": int(report["connected"]),
            "rss_base_mib": round(base / 1024, 1),
            "rss_held_mib": round(held / 1024, 1),
            "kib_per_agent": round((held - base) / connected, 1),
            "connect_cpu_ms": round(spent / connected * 1e3, 3),
            "storm_s": round(float(report["seconds"]), 2),
            "worst_connect_ms": round(float(report["max_ms"]), 1),
            "p50_connect_ms": round(float(report["p50_ms"]), 1),
            "dials": dials,
            # Per connection made (duplicates included): with W workers an agent's connect
            # is W connections and more, so these are the figures comparable across W.
            "dials_per_s": round(dials / max(float(report["seconds"]), 1e-9), 1),
            "connect_cpu_ms_per_dial": round(spent / max(dials, 1) * 1e3, 3),
            "servers": report.get("servers", {}),
            "server_counts": report.get("server_counts", {}),
            "storm_busy": report["busy"],
            "storm_others": report["others"],
            "swarm_cpu_ms_per_agent": round(report["swarm_cpu_s"] / connected * 1e3, 3),
            "processes": len(tree_pids(server.proc.pid)),
        }
        if args.setup_seconds > 0:
            out |= tunnels(s, server, swarm, args.setup_loops, args.setup_seconds)
        leave(swarm)
        quit_swarm(s, swarm)
        return out
    finally:
        s.procs.stop(server.proc)


def quit_swarm(s: Setup, swarm: Proc) -> None:
    swarm.write_line("QUIT")
    s.procs.finish(swarm, READY_TIMEOUT)


def churn_run(s: Setup, impl: str, agents: int, rounds: int) -> dict[str, Any]:
    server = start_server(s, Variant(impl))
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


def worker_variants(counts: Sequence[int], impls: Sequence[str]) -> list[Variant]:
    """Ours with each worker count, then upstream (no workers) for reference."""
    variants = [Variant("ours", w) for w in counts] if "ours" in impls else []
    return variants + ([Variant("upstream")] if "upstream" in impls else [])


def all_workers_held(r: dict[str, Any], agents: int, workers: int) -> bool:
    """Every agent connected, each holding one connection to each of ``workers`` distinct
    server IDs, every one told the server count was a multiple of ``workers``."""
    servers: dict[str, int] = r.get("servers", {})
    counts: dict[str, int] = r.get("server_counts", {})
    told = all(c.isdigit() and int(c) % workers == 0 for c in counts)
    return (
        r.get("connected") == agents
        and len(servers) == workers
        and all(n == agents for n in servers.values())
        and told
    )


def workers_compare(s: Setup, args: argparse.Namespace) -> dict[str, Any]:
    """Every variant of ``worker_variants`` held by each N of ``--agents``, ``--repeats``
    times, the order reversed every other repeat (the machine's load drifts)."""
    by_agents: dict[str, dict[str, Any]] = {}
    variants = worker_variants(args.workers_compare, args.impls)
    for n in args.agents:
        runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        for i in range(args.repeats):
            for variant in variants if i % 2 == 0 else variants[::-1]:
                r = scale_run(s, variant, n, args)
                if variant.workers:
                    r["all_workers_held"] = all_workers_held(r, n, variant.workers)
                runs[variant.name].append(r)
                progress(f"N={n} {variant.name} run {i + 1}/{args.repeats}: {r}")
        by_agents[str(n)] = {name: median_run(rs) for name, rs in runs.items()}
    return {"counts": list(args.workers_compare), "repeats": args.repeats, "by_agents": by_agents}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--batch", type=int, default=200, help="agents connecting at once")
    parser.add_argument("--setup-loops", type=int, default=16, help="tunnel set-up loops")
    parser.add_argument("--setup-seconds", type=float, default=3.0, help="0: no tunnels")
    parser.add_argument("--churn", type=int, default=0, help="rounds of the churn mode")
    parser.add_argument("--churn-agents", type=int, default=2000)
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--quick", action="store_true", help="N = 300, churn 4 x 300, 1 s set-ups")
    parser.add_argument(
        "--workers-compare",
        type=int,
        nargs="+",
        metavar="W",
        help="instead: our server with --workers=W for each W (e.g. 1 2), upstream for reference",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="--workers-compare: runs of each, medians"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.workers_compare and args.churn:
        parser.error("--workers-compare measures no churn")
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
            if args.workers_compare:
                results["machine"] = describe_machine(up)
                results["workers_compare"] = workers_compare(s, args)
                # Other work on the machine skews the comparison (a server of W processes
                # gets a larger share of contended CPUs): the load after, beside before.
                results["machine"]["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
            scale: dict[str, dict[str, Any]] = {}
            for n in args.agents if not args.workers_compare else ():
                for impl in args.impls:
                    r = scale_run(s, Variant(impl), n, args)
                    scale.setdefault(str(n), {})[impl] = r
                    progress(f"N={n} {impl}: {r}")
            if scale:
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
    print(workers_table(results) if args.workers_compare else report_table(results))
    print(f"{results['seconds']} s; targets reported, not asserted")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
