"""How long many agents take to hold every proxy-server through a round-robin balancer:
upstream v0.36.0's reconnect loop against ours, and ours with direct endpoints, in the
same run (docs/high-availability.md; issue 17's benchmark).

Three of our proxy-servers (``--server-count=3``) sit behind a round-robin TCP balancer
(the demo's, ``cli/demo/balancer.py``). For each kind of agent in turn, ``--agents``
agents start at once with upstream's default ``--sync-interval`` (1 s) and the
balancer's address; each agent's ``open_server_connections`` is polled until it reads 3.
Two figures per agent: the time from launch to holding all three (``all``), and from its
first connection to all three (``converge``: start-up cost left out, which is where a
Python agent pays and a Go one does not). Reported: median and maximum over the agents,
and the ratio of medians against upstream's.

Kinds: ``upstream`` (its agent), ``ours`` (default flags: duplicates are retried at once
while servers are missing), ``ours-list`` (``--proxy-server-list`` with each server's
own address), ``ours-headers`` (``--server-discovery=headers``, the servers started with
``--agent-advertise-address``; needs servers that offer ``server-endpoints.v1``).

    .venv/bin/python -m bench.ha_converge                  # 50 agents, every kind
    .venv/bin/python -m bench.ha_converge --agents 10 --kinds ours upstream
    .venv/bin/python -m bench.ha_converge --json bench/results/ha-converge.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._echo_proc import ChildError
from bench._tunnel_procs import (
    LOOPBACK,
    READY_TIMEOUT,
    Certs,
    Proc,
    Procs,
    agent_flags,
    build_upstream,
    free_ports,
    make_certs,
)
from bench.agent_rss import SERVERS, open_server_connections, start_servers

AGENTS = 50
KINDS = ("upstream", "ours", "ours-list", "ours-headers")
#: Every agent must hold all servers within this bound, or the run fails (seconds).
CONVERGE_BOUND = 120.0
#: Seconds between two rounds of polling every agent's metrics.
POLL = 0.1
VERBOSITY = 0


@dataclass(frozen=True)
class Result:
    kind: str
    agents: int
    all_median_s: float
    all_max_s: float
    converge_median_s: float
    converge_max_s: float


def _agent_argv(kind: str, upstream_bin: Path | None) -> list[str]:
    if kind == "upstream":
        assert upstream_bin is not None
        command = [str(upstream_bin / "proxy-agent")]
    else:
        command = [sys.executable, "-m", "konnectivity_fast.agent"]
    return [*command, f"--v={VERBOSITY}"]


def _kind_flags(kind: str, server_ports: list[int]) -> list[str]:
    if kind == "ours-list":
        return ["--proxy-server-list=" + ",".join(f"{LOOPBACK}:{p}" for p in server_ports)]
    if kind == "ours-headers":
        return ["--server-discovery=headers"]
    return []


def measure(  # noqa: PLR0917
    procs: Procs, kind: str, argv: list[str], agents: int, certs: Certs, lb: int
) -> tuple[list[float], list[float]]:
    """Start ``agents`` agents at once, dialling the balancer at ``lb``; per agent
    (launch->all, first->all) seconds."""
    started: list[tuple[Proc, int]] = []
    t0 = time.monotonic()
    for i in range(agents):
        health, admin = free_ports(2)
        child = procs.start(
            f"{kind}-{i}",
            [
                *argv,
                *agent_flags(certs, lb, health=health, admin=admin),
                f"--agent-id={kind}-{i}",
            ],
        )
        started.append((child, health))
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    try:
        while len(done) < agents:
            now = time.monotonic() - t0
            if now > CONVERGE_BOUND:
                raise ChildError(f"{kind}: {agents - len(done)} agents short after {now:.0f} s")
            for i, (child, health) in enumerate(started):
                if i in done:
                    continue
                if not child.alive():
                    raise ChildError(f"{child.name} exited")
                held = open_server_connections(health)
                stamp = time.monotonic() - t0
                if held >= 1:
                    first.setdefault(i, stamp)
                if held == SERVERS:
                    done[i] = stamp
            time.sleep(POLL)
    finally:
        for child, _ in started:
            procs.stop(child)
    return [done[i] for i in range(agents)], [done[i] - first[i] for i in range(agents)]


def run(kinds: Sequence[str], agents: int, log_dir: Path) -> list[Result]:
    upstream_bin = build_upstream() if "upstream" in kinds else None
    procs = Procs(log_dir)
    results: list[Result] = []
    with contextlib.ExitStack() as stack:
        stack.callback(procs.kill_all)
        certs = make_certs(log_dir)
        # Each server's agent port is its direct address; for the headers kind each one
        # advertises it.
        advertise = None
        if "ours-headers" in kinds:

            def advertise(port: int) -> list[str]:
                return [f"--agent-advertise-address={LOOPBACK}:{port}"]

        server_ports = start_servers(procs, certs, log_dir, own_flags=advertise)
        (lb,) = free_ports(1)
        balancer = procs.start(
            "balancer",
            [
                sys.executable,
                "-m",
                "konnectivity_fast.cli.demo.balancer",
                f"--listen={LOOPBACK}:{lb}",
                *(f"--backend={LOOPBACK}:{port}" for port in server_ports),
            ],
        )
        balancer.read_line(READY_TIMEOUT)
        for kind in kinds:
            argv = [*_agent_argv(kind, upstream_bin), *_kind_flags(kind, server_ports)]
            launch, converge = measure(procs, kind, argv, agents, certs, lb)
            result = Result(
                kind,
                agents,
                round(statistics.median(launch), 3),
                round(max(launch), 3),
                round(statistics.median(converge), 3),
                round(max(converge), 3),
            )
            results.append(result)
            print(
                f"{kind:13s} all 3 held: median {result.all_median_s:6.2f} s, max "
                f"{result.all_max_s:6.2f} s; first->all: median {result.converge_median_s:6.2f} "
                f"s, max {result.converge_max_s:6.2f} s",
                flush=True,
            )
            time.sleep(1.0)  # the servers notice the agents' departure
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=AGENTS)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kf-ha-converge-") as tmp:
        results = run(args.kinds, args.agents, Path(tmp))
    base = next((r for r in results if r.kind == "upstream"), None)
    if base is not None:
        print(f"\nratios of medians against upstream's ({args.agents} agents):")
        for r in results:
            if r is not base:
                print(
                    f"  {r.kind:13s} all {r.all_median_s / base.all_median_s:5.2f}x   "
                    f"first->all {r.converge_median_s / max(base.converge_median_s, 1e-3):5.2f}x"
                )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"servers": SERVERS, "results": [r.__dict__ for r in results]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
