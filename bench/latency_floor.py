"""The latency chain against its floor (issue 20 item 1): a 1 KiB round trip over an
established tunnel, and the tunnel set-up rate, through our proxy-server + proxy-agent,
upstream v0.36.0's, and two bare relay processes (bench/_floor_relay.py: the same socket
chain, Unix socket in, TCP between, TCP out, with nothing of ours), plus the bare relays
with TLS between them (what TLS alone adds on the middle hop), and direct TCP. Same run,
HTTP-CONNECT mode (the floor relays speak CONNECT, not gRPC), cells interleaved.

The Go load generator (bench/loadgen) measures: ``rtt`` (``--count`` 1 KiB round trips on
one tunnel after 50 warm-up ones; p50/p99) and ``setup`` (dial, 1-byte exchange, close,
in a loop for 2 s with 1 and 16 workers; tunnels/s). Reported: medians over ``--runs``
and the ratios the issue sets targets for (ours/upstream, ours/floor), never asserted.

    .venv/bin/python -m bench.latency_floor
    .venv/bin/python -m bench.latency_floor --runs 3 --json bench/results/latency-floor.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench._tunnel_procs import (
    LOOPBACK,
    READY_TIMEOUT,
    Certs,
    Procs,
    build_loadgen,
    build_upstream,
    free_ports,
    make_certs,
    start_pair,
)

RUNS = 5
RTT_COUNT = 2000
SETUP_SECONDS = 2.0
KINDS = ("direct", "floor", "floor-tls", "ours", "upstream")
#: Bound on one load generator run, beyond its own duration (seconds).
RUN_GRACE = 60.0


@dataclass
class Way:
    """How a load generator reaches the backend: its ``-mode`` and frontend socket."""

    kind: str
    mode: str
    uds: str = ""

    def flags(self) -> list[str]:
        return [f"-mode={self.mode}"] + ([f"-uds={self.uds}"] if self.uds else [])


def start_floor_procs(
    procs: Procs, folder: Path, certs: Certs | None
) -> tuple[str, dict[str, int]]:
    """The two bare relays (with TLS between them when ``certs``): the front relay's Unix
    socket, and the relays' pids."""
    kind = "floor-tls" if certs else "floor"
    (port,) = free_ports(1)
    uds = str(folder / f"{kind}.sock")
    tls_back: list[str] = []
    tls_front: list[str] = []
    if certs is not None:
        tls_back = [f"--cert={certs.server_cert}", f"--key={certs.server_key}", f"--ca={certs.ca}"]
        tls_front = [f"--cert={certs.client_cert}", f"--key={certs.client_key}", f"--ca={certs.ca}"]
    relay = [sys.executable, "-m", "bench._floor_relay"]
    back = procs.start(f"{kind}-back", [*relay, "back", f"--port={port}", *tls_back])
    back.expect("READY", READY_TIMEOUT)
    front = procs.start(
        f"{kind}-front", [*relay, "front", f"--uds={uds}", f"--back-port={port}", *tls_front]
    )
    front.expect("READY", READY_TIMEOUT)
    return uds, {"front": front.pid, "back": back.pid}


def start_floor(procs: Procs, folder: Path, certs: Certs | None) -> Way:
    uds, _ = start_floor_procs(procs, folder, certs)
    return Way("floor-tls" if certs else "floor", "http-connect", uds)


def measure(
    procs: Procs, loadgen: str, way: Way, target: str, command: list[str]
) -> dict[str, float]:
    child = procs.start(
        f"loadgen-{command[0]}-{way.kind}",
        [loadgen, *command[:1], *way.flags(), f"-target={target}", *command[1:]],
    )
    child.expect("READY", READY_TIMEOUT)
    child.write_line("GO")
    line = child.expect("RESULT", SETUP_SECONDS + RUN_GRACE)
    procs.finish(child, RUN_GRACE)
    result: dict[str, float] = json.loads(line)
    if "error" in result:
        raise RuntimeError(f"{way.kind} {command[0]}: {result['error']}")
    return result


CELLS = {
    "rtt": ["rtt", f"-count={RTT_COUNT}"],
    "setup1": ["setup", "-workers=1", f"-duration={SETUP_SECONDS:g}s"],
    "setup16": ["setup", "-workers=16", f"-duration={SETUP_SECONDS:g}s"],
}


def run(kinds: Sequence[str], runs: int, folder: Path) -> dict[str, dict[str, dict[str, float]]]:
    procs = Procs(folder)
    loadgen = str(build_loadgen())
    upstream_bin = build_upstream() if "upstream" in kinds else None
    samples: dict[str, dict[str, list[dict[str, float]]]] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(procs.kill_all)
        certs = make_certs(folder)
        backend = procs.start("backend", [loadgen, "backend"])
        target = f"{LOOPBACK}:{backend.expect('READY', READY_TIMEOUT)}"
        ways: list[Way] = []
        for kind in kinds:
            if kind == "direct":
                ways.append(Way("direct", "direct"))
            elif kind in ("floor", "floor-tls"):
                ways.append(start_floor(procs, folder, certs if kind == "floor-tls" else None))
            else:
                pair = start_pair(
                    procs,
                    impl=kind,
                    mode="http-connect",
                    certs=certs,
                    sock_dir=folder,
                    upstream_bin=upstream_bin,
                    verbosity=0,
                )
                ways.append(Way(kind, "http-connect", pair.uds))
        for i in range(runs):
            for cell, command in CELLS.items():
                order = ways if i % 2 == 0 else list(reversed(ways))
                for way in order:
                    result = measure(procs, loadgen, way, target, command)
                    samples.setdefault(cell, {}).setdefault(way.kind, []).append(result)
            print(f"run {i + 1}/{runs} done", flush=True)
    return {
        cell: {kind: _median(rs) for kind, rs in by_kind.items()}
        for cell, by_kind in samples.items()
    }


def _median(results: list[dict[str, float]]) -> dict[str, float]:
    keys = (
        ("p50_ms", "p99_ms")
        if "tunnels" not in results[0]
        else ("p50_ms", "p99_ms", "tunnels", "seconds")
    )
    out = {k: statistics.median(r[k] for r in results) for k in keys}
    if "tunnels" in out:
        out["per_s"] = statistics.median(r["tunnels"] / r["seconds"] for r in results)
    return out


def report(medians: dict[str, dict[str, dict[str, float]]]) -> None:
    rtt = medians["rtt"]
    print("\n1 KiB round trip, HTTP-CONNECT (median of runs):")
    for kind, m in rtt.items():
        print(f"  {kind:10s} p50 {m['p50_ms'] * 1000:7.0f} us   p99 {m['p99_ms'] * 1000:7.0f} us")
    for cell in ("setup1", "setup16"):
        print(f"\ntunnel set-up, {cell[5:]} worker(s):")
        for kind, m in medians[cell].items():
            print(f"  {kind:10s} {m['per_s']:8.0f} tunnels/s   p50 {m['p50_ms'] * 1000:6.0f} us")
    if "ours" in rtt and "upstream" in rtt:
        o, u = rtt["ours"], rtt["upstream"]
        print(
            f"\nours/upstream rtt: p50 {o['p50_ms'] / u['p50_ms']:.2f}x (target <= 0.5), "
            f"p99 {o['p99_ms'] / u['p99_ms']:.2f}x (target <= 0.5)"
        )
        for cell in ("setup1", "setup16"):
            ratio = medians[cell]["ours"]["per_s"] / medians[cell]["upstream"]["per_s"]
            print(f"ours/upstream set-up rate, {cell[5:]} worker(s): {ratio:.2f}x (target >= 1.5)")
    if "ours" in rtt and "floor" in rtt:
        ratio = rtt["ours"]["p50_ms"] / rtt["floor"]["p50_ms"]
        print(f"ours/floor rtt p50: {ratio:.2f}x (target <= 1.5)")
    if "floor" in rtt and "floor-tls" in rtt:
        extra = (rtt["floor-tls"]["p50_ms"] - rtt["floor"]["p50_ms"]) * 1000
        print(f"TLS on the middle hop adds {extra:.0f} us to the floor's p50")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kf-latency-floor-") as tmp:
        medians = run(args.kinds, args.runs, Path(tmp))
    report(medians)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": args.runs, "medians": medians}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
