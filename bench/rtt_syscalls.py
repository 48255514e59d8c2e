"""CPU time and system calls per 1 KiB round trip, per process, for ours, upstream
v0.36.0's and the bare relays (issue 20 item 2: where the round trip goes). Counts, unlike
times, do not depend on how busy the machine is, so they can be compared across runs.

For each kind, the pair (or the two relays) starts as in bench/latency_floor.py; the Go
load generator opens one HTTP-CONNECT tunnel, makes its 50 warm-up round trips, and then
``--count`` measured ones while ``strace -c -f`` is attached to each of the two processes;
each process's calls are divided by the count. A first pass without strace reads each
process's CPU time (``/proc/<pid>/stat``) over ``CPU_ROUNDS`` times as many round trips.
Needs ``strace`` and ptrace permission
(root, or ``kernel.yama.ptrace_scope=0``).

    .venv/bin/python -m bench.rtt_syscalls
    .venv/bin/python -m bench.rtt_syscalls --kinds ours floor --count 5000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench._tunnel_procs import (
    LOOPBACK,
    READY_TIMEOUT,
    Procs,
    build_loadgen,
    build_upstream,
    cpu_split,
    make_certs,
    start_pair,
)
from bench.latency_floor import RUN_GRACE, start_floor_procs

COUNT = 2000
KINDS = ("floor", "ours", "upstream")
#: The CPU pass makes this many times ``--count`` round trips: CPU time is read in clock
#: ticks (10 ms), so it needs a longer run than the system call count.
CPU_ROUNDS = 5
#: Seconds for strace to attach to every thread before the measured round trips start.
ATTACH_SETTLE = 1.0
# A row of strace -c's table: % time, seconds, usecs/call, calls, [errors,] name.
_ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def parse_summary(text: str) -> dict[str, int]:
    """Calls by system call name from ``strace -c`` output."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return calls


def measure(kind: str, folder: Path, count: int) -> dict[str, dict[str, float]]:
    procs = Procs(folder)
    loadgen = str(build_loadgen())
    with contextlib.ExitStack() as stack:
        stack.callback(procs.kill_all)
        certs = make_certs(folder)
        backend = procs.start("backend", [loadgen, "backend"])
        target = f"{LOOPBACK}:{backend.expect('READY', READY_TIMEOUT)}"
        if kind.startswith("floor"):
            uds, pids = start_floor_procs(procs, folder, certs if kind == "floor-tls" else None)
        else:
            pair = start_pair(
                procs,
                impl=kind,
                mode="http-connect",
                certs=certs,
                sock_dir=folder,
                upstream_bin=build_upstream() if kind == "upstream" else None,
                verbosity=0,
            )
            uds, pids = pair.uds, {"server": pair.server.pid, "agent": pair.agent.pid}
        rtt = [loadgen, "rtt", "-mode=http-connect", f"-uds={uds}", f"-target={target}"]
        cpu = _cpu_per_round_trip(procs, [*rtt, f"-count={count * CPU_ROUNDS}"], pids)
        child = procs.start(f"loadgen-{kind}", [*rtt, f"-count={count}"])
        child.expect("READY", READY_TIMEOUT)  # the warm-up round trips are done
        tracers = {
            name: subprocess.Popen(
                ["strace", "-c", "-f", "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name, pid in pids.items()
        }
        with contextlib.suppress(subprocess.TimeoutExpired):
            tracers[next(iter(tracers))].wait(ATTACH_SETTLE)
        child.write_line("GO")
        child.expect("RESULT", RUN_GRACE)
        out: dict[str, dict[str, float]] = {}
        for name, tracer in tracers.items():
            tracer.send_signal(signal.SIGINT)
            _, err = tracer.communicate(timeout=RUN_GRACE)
            calls = parse_summary(err)
            out[name] = {
                k: round(v / count, 2) for k, v in sorted(calls.items()) if v / count >= 0.05
            }
            out[name]["total"] = round(sum(calls.values()) / count, 2)
            out[name]["cpu_us"] = cpu[name]
        procs.finish(child, RUN_GRACE)
    return out


def _cpu_per_round_trip(procs: Procs, argv: list[str], pids: dict[str, int]) -> dict[str, float]:
    """Microseconds of CPU (user + system) each process spends per round trip, measured
    without strace attached (it would inflate them)."""
    child = procs.start("loadgen-cpu", argv)
    child.expect("READY", READY_TIMEOUT)
    before = {name: sum(cpu_split(pid)) for name, pid in pids.items()}
    child.write_line("GO")
    result = json.loads(child.expect("RESULT", RUN_GRACE))
    after = {name: sum(cpu_split(pid)) for name, pid in pids.items()}
    procs.finish(child, RUN_GRACE)
    return {name: round((after[name] - before[name]) / result["count"] * 1e6, 1) for name in pids}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", choices=(*KINDS, "floor-tls"), default=list(KINDS))
    parser.add_argument("--count", type=int, default=COUNT)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is not installed", file=sys.stderr)
        return 2
    results = {}
    for kind in args.kinds:
        with tempfile.TemporaryDirectory(prefix=f"kf-rtt-sys-{kind}-") as tmp:
            results[kind] = measure(kind, Path(tmp), args.count)
        for proc, calls in results[kind].items():
            top = ", ".join(f"{k} {v:g}" for k, v in calls.items() if k not in ("total", "cpu_us"))
            print(
                f"{kind:9s} {proc:7s} {calls['cpu_us']:5.1f} us CPU, {calls['total']:5.1f} "
                f"syscalls per round trip: {top}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"count": args.count, **results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
