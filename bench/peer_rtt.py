"""What server peering costs a round trip: a 1 KiB echo through a server whose agent is
elsewhere (forwarded to its peer, one extra hop) against the same echo through the peer
that holds the agent (direct), same run (docs/high-availability.md, "Server peering").

Two of our proxy-servers (``--enable-peer-forwarding``, each listing the other with
``--peer-endpoints``) and one of our agents connected to the second only. The Go load
generator (bench/loadgen ``rtt``) runs ``--count`` 1 KiB round trips over one tunnel to
its echo backend, through the first server's frontend socket (forwarded) or the
second's (direct), alternating, ``--runs`` times each, in each frontend mode. Reported:
the median over runs of each run's p50 and p99, and the forwarded/direct ratio.

    .venv/bin/python -m bench.peer_rtt
    .venv/bin/python -m bench.peer_rtt --runs 3 --count 500 --modes http-connect
    .venv/bin/python -m bench.peer_rtt --json bench/results/peer-rtt.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench._tunnel_procs import (
    LOOPBACK,
    READY_TIMEOUT,
    Certs,
    Procs,
    agent_flags,
    build_loadgen,
    free_ports,
    make_certs,
    server_flags,
    wait_ready,
)

RUNS = 5
COUNT = 2000
MODES = ("http-connect", "grpc")
#: Bound on one load generator run (seconds).
RUN_TIMEOUT = 120.0


def _servers(procs: Procs, certs: Certs, folder: Path, mode: str) -> tuple[list[str], int]:
    """Two peering servers; their frontend sockets and the second one's agent port."""
    ports = [free_ports(4) for _ in range(2)]  # agent, health, admin, peer
    peers = ",".join(f"p{i}={LOOPBACK}:{p[3]}" for i, p in enumerate(ports))
    sockets = []
    for i, (agent, health, admin, peer) in enumerate(ports):
        uds = str(folder / f"{mode}-p{i}.sock")
        server = procs.start(
            f"{mode}-server-p{i}",
            [
                sys.executable,
                "-m",
                "konnectivity_fast.server",
                *server_flags(mode, uds, certs, agent_port=agent, health=health, admin=admin),
                f"--server-id=p{i}",
                "--enable-peer-forwarding",
                f"--peer-port={peer}",
                f"--peer-bind-address={LOOPBACK}",
                f"--peer-endpoints={peers}",
                f"--peer-cert={certs.server_cert}",
                f"--peer-key={certs.server_key}",
                f"--peer-ca-cert={certs.ca}",
                "--v=0",
            ],
        )
        wait_ready(server, health, "/healthz")
        sockets.append(uds)
    return sockets, ports[1][0]


def _agent(procs: Procs, certs: Certs, mode: str, port: int) -> None:
    health, admin = free_ports(2)
    agent = procs.start(
        f"{mode}-agent",
        [
            sys.executable,
            "-m",
            "konnectivity_fast.agent",
            *agent_flags(certs, port, health=health, admin=admin),
            "--v=0",
        ],
    )
    wait_ready(agent, health, "/readyz")


def _rtt(  # noqa: PLR0917
    procs: Procs, loadgen: str, mode: str, uds: str, target: str, count: int
) -> dict[str, float]:
    child = procs.start(
        f"rtt-{mode}",
        [loadgen, "rtt", f"-mode={mode}", f"-uds={uds}", f"-target={target}", f"-count={count}"],
    )
    # The load generator says READY once its warm-up round trips are done, then waits for
    # GO before the measured ones.
    child.expect("READY", READY_TIMEOUT)
    child.write_line("GO")
    line = child.expect("RESULT", RUN_TIMEOUT)
    procs.finish(child, RUN_TIMEOUT)
    result: dict[str, float] = json.loads(line)
    if "error" in result:
        raise RuntimeError(f"loadgen rtt via {uds}: {result['error']}")
    return result


def run(modes: Sequence[str], runs: int, count: int, folder: Path) -> dict[str, dict[str, float]]:
    procs = Procs(folder)
    loadgen = str(build_loadgen())
    report: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(procs.kill_all)
        certs = make_certs(folder)
        backend = procs.start("backend", [loadgen, "backend"])
        target = f"{LOOPBACK}:{backend.expect('READY', READY_TIMEOUT)}"
        for mode in modes:
            (forwarding, direct), agent_port = _servers(procs, certs, folder, mode)
            _agent(procs, certs, mode, agent_port)
            samples: dict[str, list[dict[str, float]]] = {"forwarded": [], "direct": []}
            for i in range(runs):
                order = ("forwarded", "direct") if i % 2 == 0 else ("direct", "forwarded")
                for path in order:
                    uds = forwarding if path == "forwarded" else direct
                    samples[path].append(_rtt(procs, loadgen, mode, uds, target, count))
            for path, results in samples.items():
                report[f"{mode}/{path}"] = {
                    "p50_ms": round(statistics.median(r["p50_ms"] for r in results), 4),
                    "p99_ms": round(statistics.median(r["p99_ms"] for r in results), 4),
                }
            fwd, dct = report[f"{mode}/forwarded"], report[f"{mode}/direct"]
            print(
                f"{mode:12s} direct p50 {dct['p50_ms'] * 1000:6.0f} us p99 "
                f"{dct['p99_ms'] * 1000:6.0f} us | forwarded p50 {fwd['p50_ms'] * 1000:6.0f} us "
                f"p99 {fwd['p99_ms'] * 1000:6.0f} us | extra p50 "
                f"{(fwd['p50_ms'] - dct['p50_ms']) * 1000:5.0f} us "
                f"({fwd['p50_ms'] / dct['p50_ms']:.2f}x)",
                flush=True,
            )
            procs.kill_all()
            backend = procs.start("backend", [loadgen, "backend"])
            target = f"{LOOPBACK}:{backend.expect('READY', READY_TIMEOUT)}"
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kf-peer-rtt-") as tmp:
        report = run(args.modes, args.runs, args.count, Path(tmp))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"count": args.count, "runs": args.runs, **report}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
