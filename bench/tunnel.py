"""Tunnel benchmark: our proxy-server + proxy-agent against upstream's v0.36.0 Go binaries
and against a direct loopback connection, same machine, same run.

    .venv/bin/python -m bench.tunnel [--quick] [--family hol] [--json out.json] [--chart out.png]

Each implementation runs as deployed: proxy-server with its frontend (gRPC or HTTP-CONNECT)
on a Unix socket, one proxy-agent linked to it over TLS with client certificates. The
backend and the load generators are Go programs (bench/loadgen), each in its own process;
the gRPC frontend is driven with the published konnectivity-client library, one tunnel per
gRPC connection as kube-apiserver does. The head-of-line scenarios also run our server with
upstream's agent ("ours-upstream-agent"), and ours with per-tunnel flow control flow.v1 on
both sides ("ours-flow", which also runs the bulk transfers: flow control on vs off). CPU
time and RSS come from /proc. Every figure is
the median of ``--runs`` runs (min-max beside it), runs interleaved across implementations;
ratios ours/upstream and ours/direct are printed with the project's targets (reported,
never asserted). See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench._echo_proc import ChildError, machine_busy_seconds, rss_kib
from bench._machine import describe_machine, source_state
from bench._tunnel_procs import (
    FLOW,
    IMPLS,
    LOOPBACK,
    MIXED,
    SIDES,
    Pair,
    Proc,
    Procs,
    build_loadgen,
    build_upstream,
    cpu_split,
    flow_credit,
    make_certs,
    start_pair,
    stop_pair,
)
from bench._tunnel_report import BULK, SLOW, brief, render, summarize
from konnectivity_fast.server.buffering import TUNNEL_BUFFER_BUDGET, TUNNEL_STALL_TIMEOUT

MIB = 1 << 20
MODES = ("grpc", "http-connect")
# The slow-reader scenarios (SLOW in bench/_tunnel_report.py says what each runs).
SLOW_NAMES = tuple(SLOW)
SCENARIOS = (
    "down1",
    "up1",
    "down8",
    "setup1",
    "setup16",
    "rtt",
    "idle",
    "holsmall",
    "hol",
    *SLOW_NAMES,
)
# Fresh-pair scenarios in this order: "hol" (an endless stalled download) may wedge the
# pair for good, so it comes last; each slow-reader scenario gets a pair of its own.
FRESH = ("idle", "holsmall", "hol", *SLOW_NAMES)
# The scenarios that run on the long-lived pairs (and on direct TCP); "idle" and "hol"
# each get fresh pairs (a stalled reader may wedge a pair for good).
SHARED = ("down1", "up1", "down8", "setup1", "setup16", "rtt")
# The head-of-line family (``--family hol``, ``make bench-hol``): only these also run our
# server with upstream's agent, which tells whether a defect is the server's or the agent's.
HOL_FAMILY = ("holsmall", "hol", *SLOW_NAMES)
# The scenarios of the pairings that do not run them all: our server with upstream's agent
# runs the head-of-line family; ours with flow.v1 runs it too, and the bulk transfers
# (flow control on vs off, the same run).
PAIRING_SCENARIOS: dict[str, tuple[str, ...]] = {
    MIXED: HOL_FAMILY,
    FLOW: (*HOL_FAMILY, *BULK),
}
# Its short form (--quick): the 4 MB/s reader, whose freeze (budget / rate) is 4 s.
HOL_QUICK = ("slow4", "slow4x8", "slow4x8r10")
# The short form of the family in the quick run of the whole benchmark (make bench QUICK=1).
QUICK_SLOW = ("slow4",)
START_TIMEOUT = 60.0
# Seconds allowed past a load generator's own -timeout for its result line.
RESULT_GRACE = 15.0
# Before a run, wait (up to Config.settle s) until the rest of the machine uses less than
# QUIET_PCT % of a core, sampled over QUIET_SAMPLE s.
QUIET_PCT = 25.0
QUIET_SAMPLE = 0.3
# py-spy samples per second with --profile, and the seconds it gets to attach.
PROFILE_RATE = 250
PROFILE_ATTACH = 0.5
# Let RSS settle after the idle tunnels are open (Go's scavenger, our allocator).
IDLE_SETTLE = 1.0


@dataclass
class Config:
    runs: int = 3
    single_bytes: int = 256 * MIB
    multi_conns: int = 8
    multi_bytes: int = 64 * MIB
    upload_write: int = 16 << 10  # kube-apiserver writes TLS-record-sized pieces
    setup_seconds: float = 2.0
    setup_workers: int = 16
    rtt_count: int = 2000
    idle_tunnels: int = 1000
    hol_bytes: int = 32 * MIB
    hol_window: float = 5.0
    hol_probe: float = 5.0
    hol_stall: float = 1.0
    hol_stall_bytes: int = 1 << 40  # "never ends": more than any buffer on the path
    # "holsmall": the stalled tunnel asks for less than our per-tunnel buffer budget
    # (konnectivity_fast.server.buffering.TUNNEL_BUFFER_BUDGET, 16 MiB).
    hol_small_bytes: int = 8 * MIB
    # "hol" measures once more this long after the stall began: past our server's
    # TUNNEL_STALL_TIMEOUT (and upstream konnectivity-client's 10 s read timeout), when a
    # proxy that gives up on the stalled tunnel lets the others go again.
    hol_after: float = TUNNEL_STALL_TIMEOUT + 2.0
    # Slow readers (SLOW): each phase in seconds. "base": the echo or the downloads alone.
    slow_base: float = 3.0
    # Slow reading before the echo is measured, and the downloads' phase beside it before
    # slow_measure: 0 = per rate, the time the reader takes to read a tunnel budget
    # (TUNNEL_BUFFER_BUDGET / rate: 16.8 s at 1 MB/s, 4.2 s at 4 MB/s) + slow_fill_margin.
    slow_fill: float = 0.0
    slow_fill_margin: float = 3.0
    slow_measure: float = 5.0
    # Downloads count from this long after the slow reader began ("from the first second").
    slow_from: float = 1.0
    # Bound on one echo or one new tunnel beside a slow reader: past the longest freeze
    # (a budget at 1 MB/s).
    slow_probe: float = 30.0
    # One 1 KiB echo per interval at most (an interactive client, not a flood).
    slow_interval: float = 0.01
    # Each of the 8 downloads of the "r10" scenarios reads at this rate.
    slow_other_rate: float = 10e6
    # "stallx8": how long the 8 downloads run beside the reader that never reads: past
    # TUNNEL_STALL_TIMEOUT, after which our server closes the stalled tunnel.
    stall_seconds: float = TUNNEL_STALL_TIMEOUT + 4.0
    verbosity: int = 0
    settle: float = 2.0
    impls: tuple[str, ...] = IMPLS
    modes: tuple[str, ...] = MODES
    scenarios: tuple[str, ...] = SCENARIOS
    direct: bool = True
    # Long-lived pairs per pairing for the transfer, set-up and round-trip scenarios; run
    # N uses pair N mod ``pairs``. Two pairs of the same build, started the same way, keep
    # a bias of their own for their whole life (528 vs 618 MB/s median over 15 uploads
    # each, 2026-12-07): with one pair per pairing, a ratio between two pairings carries
    # both pairs' biases however many runs there are.
    pairs: int = 1
    profile: str = ""  # a folder: py-spy records our server and agent per scenario
    profile_native: bool = False  # py-spy --native (pauses the process at each sample)


QUICK = {
    "runs": 1,
    "single_bytes": 32 * MIB,
    "multi_bytes": 8 * MIB,
    "setup_seconds": 0.5,
    "rtt_count": 300,
    "idle_tunnels": 200,
    "hol_bytes": 4 * MIB,
    "hol_window": 3.0,
    "hol_probe": 3.0,
    "hol_stall": 0.5,
    "settle": 0.0,
    "slow_base": 1.5,
    "slow_fill_margin": 0.5,
    "slow_measure": 2.0,
    "stall_seconds": TUNNEL_STALL_TIMEOUT + 2.0,
    # The mixed and flow.v1 pairings run with --family hol (--impls adds them here).
    "impls": ("ours", "upstream"),
    "scenarios": (*SCENARIOS[: SCENARIOS.index(SLOW_NAMES[0])], *QUICK_SLOW),
}

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def runs_scenario(impl: str, name: str) -> bool:
    """Whether pairing ``impl`` takes part in scenario ``name`` (PAIRING_SCENARIOS)."""
    return name in PAIRING_SCENARIOS.get(impl, (name,))


@dataclass
class Target:
    """Where a load generator sends its tunnels: a pair's frontend, or direct TCP."""

    key: str  # "direct", "ours/grpc", "upstream/http-connect", ...
    mode: str  # loadgen -mode
    pair: Pair | None = None

    def frontend(self) -> list[str]:
        return [f"-mode={self.mode}"] + ([f"-uds={self.pair.uds}"] if self.pair else [])

    def pids(self) -> dict[str, int]:
        if self.pair is None:
            return {}
        return {"server": self.pair.server.pid, "agent": self.pair.agent.pid}


@dataclass
class Bench:
    config: Config
    progress: Progress
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kf-tun-")))

    def __post_init__(self) -> None:
        self.procs = Procs(self.dir)
        # Other sessions may edit the working tree during a long run: say what it was then.
        self.source_at_start = source_state()
        self.loadavg_at_start = _loadavg().split()
        self.loadgen = str(build_loadgen())
        uses_upstream = any("upstream" in SIDES[impl] for impl in self.config.impls)
        self.upstream_bin = build_upstream() if uses_upstream else None
        self.certs = make_certs(self.dir)
        self.backend = self.procs.start("backend", [self.loadgen, "backend"])
        self.target_addr = f"{LOOPBACK}:{int(self.backend.expect('READY', START_TIMEOUT))}"

    def close(self) -> None:
        self.procs.kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def pair(self, impl: str, mode: str) -> Pair:
        return start_pair(
            self.procs,
            impl=impl,
            mode=mode,
            certs=self.certs,
            sock_dir=self.dir,
            upstream_bin=self.upstream_bin,
            verbosity=self.config.verbosity,
        )

    def wait_quiet(self) -> float:
        """Wait (bounded by Config.settle) for the machine to be quiet; the last busy %."""
        deadline = time.monotonic() + self.config.settle
        busy = 0.0
        while time.monotonic() < deadline:
            b0, t0 = machine_busy_seconds(), time.monotonic()
            time.sleep(QUIET_SAMPLE)
            busy = 100.0 * (machine_busy_seconds() - b0) / (time.monotonic() - t0)
            if busy < QUIET_PCT:
                break
        return busy

    # -- one load-generator run --

    def measure(
        self, target: Target, command: str, args: list[str], timeout: float
    ) -> dict[str, Any]:
        """Run one load generator against ``target``; its result plus the CPU time every
        process used between GO and RESULT, and the machine's."""
        loadgen = self.procs.start(
            f"loadgen-{command}-{target.key.replace('/', '-')}",
            [
                self.loadgen,
                command,
                *target.frontend(),
                f"-target={self.target_addr}",
                f"-timeout={timeout:g}s",
                *args,
            ],
        )
        pids = {**target.pids(), "loadgen": loadgen.pid, "backend": self.backend.pid}
        flow = target.pair is not None and target.pair.impl == FLOW
        try:
            loadgen.expect("READY", START_TIMEOUT)
            spies = self._spy(target, command, args)
            credit0 = flow_credit(target.pair) if flow and target.pair else None
            c0 = {k: cpu_split(p) for k, p in pids.items()}
            m0, w0 = machine_busy_seconds(), time.monotonic()
            loadgen.write_line("GO")
            line = loadgen.expect("RESULT", timeout + RESULT_GRACE)
            w1, m1 = time.monotonic(), machine_busy_seconds()
            c1 = {k: cpu_split(p) for k, p in pids.items()}
            credit1 = flow_credit(target.pair) if flow and target.pair else None
            self._unspy(spies)
            self.procs.finish(loadgen, RESULT_GRACE)
        except ChildError as exc:
            self.procs.stop(loadgen)
            return {"error": str(exc)[:2000]}
        result: dict[str, Any] = json.loads(line)
        if credit0 is not None and credit1 is not None:
            # flow.v1 credit the server granted / received during the run: > 0 shows the
            # extension was negotiated and used (its 256 KiB initial windows are not counted).
            for direction in ("granted", "received"):
                result[f"flow_credit_{direction}_bytes"] = credit1.get(
                    direction, 0.0
                ) - credit0.get(direction, 0.0)
        wall = w1 - w0
        cpu = {f"{k}_cpu_s": sum(c1[k]) - sum(c0[k]) for k in pids}
        # The kernel's share (syscalls, loopback TCP, Unix sockets) of each process's CPU.
        result.update({f"{k}_sys_s": c1[k][1] - c0[k][1] for k in pids})
        result.update(cpu, wall_s=wall, machine_busy_pct=100.0 * (m1 - m0) / wall)
        result["other_cpu_pct"] = max(
            0.0, result["machine_busy_pct"] - 100.0 * sum(cpu.values()) / wall
        )
        return result

    def _spy(self, target: Target, command: str, args: list[str]) -> list[Proc]:
        """With --profile: py-spy (raw collapsed stacks, non-blocking) on our server and
        agent for the duration of one load-generator run; not counted in their CPU."""
        pair = target.pair
        if not self.config.profile or pair is None or SIDES[pair.impl] != ("ours", "ours"):
            return []
        out = Path(self.config.profile)
        out.mkdir(parents=True, exist_ok=True)
        impl = [] if pair.impl == "ours" else [pair.impl]
        tag = "-".join([command, *impl, target.mode, *(a.lstrip("-").split("=")[-1] for a in args)])
        spies = []
        for role, proc in (("server", pair.server), ("agent", pair.agent)):
            spy = self.procs.start(
                f"py-spy-{role}",
                [
                    str(Path(sys.executable).parent / "py-spy"),
                    "record",
                    # --native needs the process paused while it unwinds C frames.
                    "--native" if self.config.profile_native else "--nonblocking",
                    "--format=raw",
                    f"--rate={PROFILE_RATE}",
                    f"--pid={proc.pid}",
                    f"--output={out / f'{tag}-{role}.txt'}",
                ],
            )
            spies.append(spy)
        time.sleep(PROFILE_ATTACH)
        return spies

    def _unspy(self, spies: list[Proc]) -> None:
        for spy in spies:
            spy.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in spies:
            self.procs.finish(spy, 30.0)

    def scenario(self, name: str, target: Target) -> dict[str, Any]:
        c = self.config
        if name in BULK:
            conns, size, direction = BULK[name](c)
            args = [
                f"-conns={conns}",
                f"-bytes={size}",
                f"-dir={direction}",
                f"-wsize={c.upload_write}",
            ]
            return self.measure(target, "bulk", args, 120.0)
        if name in ("setup1", "setup16"):
            workers = 1 if name == "setup1" else c.setup_workers
            args = [f"-workers={workers}", f"-duration={c.setup_seconds:g}s"]
            return self.measure(target, "setup", args, c.setup_seconds + 60.0)
        if name == "rtt":
            return self.measure(target, "rtt", [f"-count={c.rtt_count}"], 60.0)
        raise ValueError(name)

    # -- fresh pairs: idle tunnels and head-of-line blocking --

    def idle(self, target: Target) -> dict[str, Any]:
        assert target.pair is not None
        c = self.config
        pair = target.pair
        loadgen = self.procs.start(
            f"loadgen-idle-{pair.impl}-{pair.mode}",
            [
                self.loadgen,
                "idle",
                *target.frontend(),
                f"-target={self.target_addr}",
                f"-conns={c.idle_tunnels}",
                "-timeout=120s",
            ],
        )
        try:
            loadgen.expect("READY", START_TIMEOUT)
            time.sleep(IDLE_SETTLE)
            before = {"server": rss_kib(pair.server.pid), "agent": rss_kib(pair.agent.pid)}
            loadgen.write_line("GO")
            opened = int(loadgen.expect("OPENED", 120.0))
            time.sleep(IDLE_SETTLE)
            after = {"server": rss_kib(pair.server.pid), "agent": rss_kib(pair.agent.pid)}
            loadgen.write_line("CLOSE")
            loadgen.expect("RESULT", 60.0)
            self.procs.finish(loadgen, RESULT_GRACE)
        except ChildError as exc:
            self.procs.stop(loadgen)
            return {"error": str(exc)[:2000]}
        return {"tunnels": opened, "rss_before_kib": before, "rss_after_kib": after}

    def hol(self, target: Target, stall_bytes: int, after: float) -> dict[str, Any]:
        c = self.config
        args = [
            f"-conns={c.multi_conns}",
            f"-bytes={c.hol_bytes}",
            f"-window={c.hol_window:g}s",
            f"-probe={c.hol_probe:g}s",
            f"-stall={c.hol_stall:g}s",
            f"-stall-bytes={stall_bytes}",
            f"-after={after:g}s",
        ]
        bound = 3 * c.hol_window + 2 * c.hol_probe + after + 60.0
        return self.measure(target, "hol", args, bound)

    def slow_fill(self, rate: float) -> float:
        """Seconds of slow reading before the measured phase (Config.slow_fill)."""
        c = self.config
        return c.slow_fill or TUNNEL_BUFFER_BUDGET / rate + c.slow_fill_margin

    def slow(self, name: str, target: Target) -> dict[str, Any]:
        """One tunnel read steadily at a slow rate (or never) beside an echo or downloads."""
        c = self.config
        kind, rate, paced = SLOW[name]
        if rate > 0:
            fill, measure = self.slow_fill(rate), c.slow_measure
        else:  # a reader that never reads: the downloads beside it from its first second
            fill, measure = 0.0, c.stall_seconds
        args = [
            f"-kind={kind}",
            f"-rate={rate:g}",
            f"-other-rate={c.slow_other_rate if paced else 0:g}",
            f"-conns={c.multi_conns}",
            f"-base={c.slow_base:g}s",
            f"-fill={fill:g}s",
            f"-measure={measure:g}s",
            f"-from={c.slow_from:g}s",
            f"-probe={c.slow_probe:g}s",
            f"-interval={c.slow_interval * 1e3:g}ms",
        ]
        bound = 2 * c.slow_base + fill + measure + 4 * c.slow_probe + 30.0
        return self.measure(target, "slow", args, bound)

    def fresh(self, name: str, target: Target) -> dict[str, Any]:
        if name == "idle":
            return self.idle(target)
        if name in SLOW:
            return self.slow(name, target)
        c = self.config
        if name == "holsmall":
            return self.hol(target, c.hol_small_bytes, 0.0)
        return self.hol(target, c.hol_stall_bytes, c.hol_after)

    # -- the plan --

    def targets(self, shared: list[str]) -> list[list[Target]]:
        """The long-lived pairs (and direct TCP), ``Config.pairs`` of each pairing: a
        pairing only if it runs one of ``shared``."""
        c = self.config
        out = [[Target("direct", "direct")]] if c.direct else []
        for mode in c.modes:
            for impl in c.impls:
                if any(runs_scenario(impl, s) for s in shared):
                    key = f"{impl}/{mode}"
                    out.append([Target(key, mode, self.pair(impl, mode)) for _ in range(c.pairs)])
        return out

    def run(self) -> dict[str, Any]:
        c = self.config
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
        shared = [s for s in SHARED if s in c.scenarios]
        pairings = self.targets(shared) if shared else []
        self.progress(
            "pairs up: "
            + ", ".join(
                f"{t.key} server {t.pair.server.pid} agent {t.pair.agent.pid}"
                for pool in pairings
                for t in pool
                if t.pair
            )
        )
        plan = [
            (name, pool)
            for name in shared
            for pool in pairings
            if pool[0].pair is None or runs_scenario(pool[0].pair.impl, name)
        ]
        step, total = 0, c.runs * len(plan)
        # Interleaved (run 1 of every cell, then run 2, ...): a slow spell of the shared
        # machine does not fall on one implementation only. Every other run goes through
        # the cells backwards, so that no cell always follows the same one (a transfer
        # leaves the machine warm or busy for the next).
        for run in range(c.runs):
            for name, pool in plan if run % 2 == 0 else plan[::-1]:
                step += 1
                target = pool[run % len(pool)]
                busy = self.wait_quiet()
                result = self.scenario(name, target)
                result["busy_before_pct"] = busy
                if len(pool) > 1:
                    result["pair"] = run % len(pool)
                runs.setdefault(name, {}).setdefault(target.key, []).append(result)
                self.progress(f"[{step}/{total}] {name:8s} {target.key:22s} {_brief(name, result)}")
                self._revive(target)
        for pool in pairings:
            for target in pool:
                if target.pair is not None:
                    stop_pair(self.procs, target.pair)
        # One pair for idle, holsmall and hol (in that order); one for each slow reader.
        groups = [[s for s in FRESH if s in c.scenarios and s not in SLOW]]
        groups += [[s] for s in FRESH if s in c.scenarios and s in SLOW]
        for run in range(c.runs):
            for group in groups:
                for mode in c.modes:
                    for impl in c.impls if run % 2 == 0 else c.impls[::-1]:
                        names = [s for s in group if runs_scenario(impl, s)]
                        if names:
                            self._fresh_pair(run, names, impl, mode, runs)
        machine = describe_machine(self.upstream_bin)
        machine["loadavg"] = self.loadavg_at_start
        if self.source_at_start != source_state():
            machine["source_at_start"] = self.source_at_start
        return summarize(asdict(c), machine, runs)

    def _fresh_pair(
        self,
        run: int,
        names: list[str],
        impl: str,
        mode: str,
        runs: dict[str, dict[str, list[dict[str, Any]]]],
    ) -> None:
        """Run ``names`` in order on a new pair, then stop it."""
        c = self.config
        target = Target(f"{impl}/{mode}", mode, self.pair(impl, mode))
        for name in names:
            self.wait_quiet()
            result = self.fresh(name, target)
            cell = runs.setdefault(name, {}).setdefault(target.key, [])
            if cell:  # the chart plots one run's time series: the first's
                result.pop("series", None)
            cell.append(result)
            self.progress(f"[{name} {run + 1}/{c.runs}] {target.key:32s} {_brief(name, result)}")
        assert target.pair is not None
        stop_pair(self.procs, target.pair)

    def _revive(self, target: Target) -> None:
        """A pair with a dead process is replaced (and the progress says so)."""
        pair = target.pair
        if pair is None or (pair.server.alive() and pair.agent.alive()):
            return
        self.progress(f"{target.key}: a process died (see {self.dir}); starting a new pair")
        stop_pair(self.procs, pair)
        target.pair = self.pair(pair.impl, pair.mode)


def _brief(name: str, r: dict[str, Any]) -> str:
    return brief(name, r).splitlines()[0][:300]


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run like Ctrl-C: through the ``finally`` that kills children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_benchmark(config: Config, progress: Progress = _stderr) -> dict[str, Any]:
    """The whole benchmark; its results as a JSON-ready dict. Children never outlive it."""
    with _terminate_on_sigterm():
        bench = Bench(config, progress)
        try:
            return bench.run()
        finally:
            bench.close()


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.tunnel", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 run, small sizes: under 3 minutes")
    p.add_argument(
        "--family",
        choices=("hol",),
        help="only the head-of-line family (stalled and slow readers), every pairing",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--chart", type=Path, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--runs", type=int)
    p.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="long-lived pairs per pairing for transfers, set-up and round trips; run N "
        "uses pair N mod PAIRS, spreading a pair's own bias over the runs (1)",
    )
    p.add_argument("--single-mib", type=int, help="MiB of a single-tunnel transfer (256)")
    p.add_argument("--multi-mib", type=int, help="MiB per tunnel of the 8-tunnel download (64)")
    p.add_argument("--setup-seconds", type=float, help="seconds per set-up rate run (2)")
    p.add_argument("--rtt-count", type=int, help="round trips per run (2000)")
    p.add_argument("--idle-tunnels", type=int, help="idle tunnels for the RSS figure (1000)")
    p.add_argument("--hol-mib", type=int, help="MiB per download in the head-of-line test (32)")
    p.add_argument("--hol-window", type=float, help="bound on each head-of-line phase, s (5)")
    p.add_argument("--hol-probe", type=float, help="bound on the new-tunnel probe, s (5)")
    p.add_argument(
        "--hol-stall-mib",
        type=int,
        help="MiB the stalled tunnel asks for in the head-of-line test (default 2^20: endless)",
    )
    p.add_argument(
        "--slow-base", type=float, help="s of echo or downloads before the slow reader (3)"
    )
    p.add_argument(
        "--slow-fill",
        type=float,
        help="s of slow reading before the measured phase (default per rate: budget/rate + 3)",
    )
    p.add_argument("--slow-measure", type=float, help="s of the measured phase (5)")
    p.add_argument(
        "--slow-probe", type=float, help="bound on one echo or new tunnel beside it, s (30)"
    )
    p.add_argument(
        "--stall-seconds", type=float, help="s of the 8 downloads beside a stalled reader (14)"
    )
    p.add_argument("--settle", type=float, help="max seconds to wait for a quiet machine (2)")
    p.add_argument("--verbosity", type=int, default=0, help="-v of both programs (0)")
    p.add_argument("--impls", nargs="+", choices=IMPLS)
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--scenarios", nargs="+", choices=SCENARIOS)
    p.add_argument("--no-direct", action="store_true", help="skip the direct TCP reference")
    p.add_argument(
        "--profile",
        default="",
        help="folder: record our server and agent with py-spy during each run (raw stacks)",
    )
    p.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: C frames too (libc, OpenSSL, uvloop, our compiled core)",
    )
    a = p.parse_args(argv)
    config = Config(**QUICK) if a.quick else Config()  # type: ignore[arg-type]
    if a.family == "hol":
        config.scenarios = HOL_QUICK if a.quick else HOL_FAMILY
        config.impls = IMPLS
        config.direct = False
    overrides: dict[str, Any] = {
        "runs": a.runs,
        "single_bytes": a.single_mib and a.single_mib * MIB,
        "multi_bytes": a.multi_mib and a.multi_mib * MIB,
        "setup_seconds": a.setup_seconds,
        "rtt_count": a.rtt_count,
        "idle_tunnels": a.idle_tunnels,
        "hol_bytes": a.hol_mib and a.hol_mib * MIB,
        "hol_window": a.hol_window,
        "hol_probe": a.hol_probe,
        "hol_stall_bytes": a.hol_stall_mib and a.hol_stall_mib * MIB,
        "slow_base": a.slow_base,
        "slow_fill": a.slow_fill,
        "slow_measure": a.slow_measure,
        "slow_probe": a.slow_probe,
        "stall_seconds": a.stall_seconds,
        "settle": a.settle,
        "impls": a.impls and tuple(a.impls),
        "modes": a.modes and tuple(a.modes),
        "scenarios": a.scenarios and tuple(a.scenarios),
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    config.verbosity = a.verbosity
    config.direct = config.direct and not a.no_direct
    config.profile = a.profile
    config.pairs = a.pairs
    config.profile_native = a.profile_native
    ranges = (1 <= config.runs <= 20, 1 <= config.pairs <= 5)
    if not (all(ranges) and config.idle_tunnels >= 1 and config.rtt_count >= 1):
        p.error("a parameter is out of its range")
    return config, a


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    start = time.monotonic()
    _stderr(f"tunnel benchmark: {config.runs} run(s); load average {_loadavg()}")
    try:
        results = run_benchmark(config)
    except KeyboardInterrupt:
        _stderr("interrupted: children killed")
        return 130
    except ChildError as exc:
        _stderr(f"failed: {exc}")
        return 1
    results["elapsed_s"] = round(time.monotonic() - start, 1)
    results["machine"]["loadavg_after"] = _loadavg().split()
    print(render(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        _stderr(f"results written to {args.json}")
    if args.chart is not None:
        from bench._tunnel_chart import chart

        for path in chart(results, args.chart):
            _stderr(f"chart written to {path}")
    return 0


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    sys.exit(main())
