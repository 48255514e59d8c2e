"""gRPC echo benchmark: our HTTP/2 + gRPC engine against grpc.aio, same machine, same run.

    .venv/bin/python -m bench.echo [--quick] [--json out.json]

Each server (``ours``: ``konnectivity_fast.transport.grpc.serve``; ``grpcio``:
``grpc.aio.server`` with a raw-bytes generic handler; both on uvloop, on a Unix socket)
runs in its own process, so its CPU time and RSS come from /proc. One load process (our
client role, identical for both servers; ``--load-procs`` for more) pipelines messages on
several streams for a fixed time. Per server and message size, the median and min-max of
``--runs`` runs of: echoed msgs/s, MB/s, server CPU µs per echoed message, server and load
CPU (% of one core). Then RSS per idle stream: a fresh server, one connection, N bidi
streams each echoed once, the server's RSS growth divided by N. Targets are printed, not
asserted. See bench/README.md for what each figure means.
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
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any

from bench._echo_proc import (
    Child,
    ChildError,
    Children,
    cpu_seconds,
    machine_busy_seconds,
    rss_kib,
)
from bench._echo_report import (
    SERVER_LABELS,
    Cell,
    Idle,
    render,
    summarize,
)
from bench._machine import describe_machine

SERVERS = ("ours", "grpcio")
SIZES = (1024, 32 * 1024)
# Seconds allowed for a server or load process to start and say READY.
START_TIMEOUT = 30.0
# Seconds allowed after t1 for the load processes to drain, check and report.
REPORT_TIMEOUT = 40.0
# Seconds between the last idle stream's echo and the RSS reading (let the server settle).
IDLE_SETTLE = 0.5
# Before a throughput run, wait (up to ``Config.settle`` seconds) for the rest of the
# machine to use less than this much CPU (% of one core), sampled over QUIET_SAMPLE seconds.
QUIET_PCT = 25.0
QUIET_SAMPLE = 0.5
# A run during which the rest of the machine used more than this (% of one core) is done
# again, up to ``Config.retries`` times; the last attempt counts whatever it saw.
BUSY_RETRY_PCT = 30.0


@dataclass
class Config:
    duration: float = 5.0
    warmup: float = 1.0
    runs: int = 3
    sizes: tuple[int, ...] = SIZES
    servers: tuple[str, ...] = SERVERS
    streams: int = 4
    inflight: int = 256 << 10
    load_procs: int = 1
    idle_streams: int = 2000
    grpcio_style: str = "gen"
    ours_style: str = "callback"
    client: str = "lean"
    settle: float = 10.0
    retries: int = 2


Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _sleep_until(t: float) -> None:
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


def _rate(count: int, seconds: float) -> float:
    """Per second; 0 when the window was not sampled (the run then reports an error)."""
    return count / seconds if seconds > 0 else 0.0


class Bench:
    """One benchmark run: a temp dir for sockets and logs, and the children in it."""

    def __init__(self, config: Config, progress: Progress) -> None:
        self.config = config
        self.progress = progress
        self.dir = Path(tempfile.mkdtemp(prefix="kf-echo-"))
        self.children = Children(self.dir)
        self._socks = 0

    def close(self) -> None:
        self.children.kill_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- processes --

    def start_server(self, kind: str) -> tuple[Child, str]:
        self._socks += 1
        path = str(self.dir / f"{kind}-{self._socks}.sock")
        args = [
            "-m",
            "bench._echo_servers",
            kind,
            "--path",
            path,
            "--grpcio-style",
            self.config.grpcio_style,
            "--ours-style",
            self.config.ours_style,
        ]
        server = self.children.start(f"server-{kind}", args)
        server.expect("READY", START_TIMEOUT)
        return server, path

    def start_load(self, mode: str, path: str, *extra: str) -> Child:
        args = ["-m", "bench._echo_load", mode, "--path", path, *extra]
        return self.children.start(f"load-{mode}", args)

    def _collect(self, load: Child, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(load.expect("RESULT", timeout))
        code = self.children.finish(load, timeout=10.0)
        if code != 0:
            raise ChildError(f"{load.name} exited with {code}")
        return result

    # -- measurements --

    def wait_quiet(self) -> str:
        """Wait until the machine is quiet (bounded by ``Config.settle``); a note if not."""
        deadline = time.monotonic() + self.config.settle
        busy = 0.0
        while time.monotonic() < deadline:
            b0, t0 = machine_busy_seconds(), time.monotonic()
            time.sleep(QUIET_SAMPLE)
            busy = 100.0 * (machine_busy_seconds() - b0) / (time.monotonic() - t0)
            if busy < QUIET_PCT:
                return ""
        return f" (machine busy: {busy:.0f} % before the run)" if self.config.settle else ""

    def throughput(self, server: Child, path: str, size: int) -> Cell:
        c = self.config
        loads = [
            self.start_load(
                "throughput",
                path,
                "--size",
                str(size),
                "--streams",
                str(c.streams),
                "--inflight",
                str(c.inflight),
                "--client",
                c.client,
            )
            for _ in range(c.load_procs)
        ]
        for load in loads:
            load.expect("READY", START_TIMEOUT)
        t0 = time.monotonic() + c.warmup
        t1 = t0 + c.duration
        for load in loads:
            load.write_line(f"GO {t0!r} {t1!r}")
        _sleep_until(t0)
        w0, s0, m0 = time.monotonic(), cpu_seconds(server.pid), machine_busy_seconds()
        l0 = [cpu_seconds(load.pid) for load in loads]
        _sleep_until(t1)
        w1, s1, m1 = time.monotonic(), cpu_seconds(server.pid), machine_busy_seconds()
        l1 = [cpu_seconds(load.pid) for load in loads]
        rss = rss_kib(server.pid)
        tallies = [self._collect(load, REPORT_TIMEOUT + c.duration) for load in loads]
        if not server.alive():
            raise ChildError(f"{server.name} died during the run")
        wall = w1 - w0
        return Cell(
            size=size,
            msgs_per_s=sum(_rate(t["window_msgs"], t["window_s"]) for t in tallies),
            bytes_per_s=sum(_rate(t["window_bytes"], t["window_s"]) for t in tallies),
            window_msgs=sum(t["window_msgs"] for t in tallies),
            server_cpu_s=s1 - s0,
            wall_s=wall,
            load_cpu_pct=[100.0 * (b - a) / wall for a, b in zip(l0, l1, strict=True)],
            machine_busy_pct=100.0 * (m1 - m0) / wall,
            server_rss_kib=rss,
            sent_msgs=sum(t["sent_msgs"] for t in tallies),
            recv_msgs=sum(t["recv_msgs"] for t in tallies),
            sent_bytes=sum(t["sent_bytes"] for t in tallies),
            recv_bytes=sum(t["recv_bytes"] for t in tallies),
            mismatches=sum(t["mismatches"] for t in tallies),
            bad_statuses=sum(1 for t in tallies for s in t["statuses"] if s != 0),
            errors=[e for t in tallies for e in t["errors"]][:10],
        )

    def idle(self, kind: str) -> Idle:
        n = self.config.idle_streams
        server, path = self.start_server(kind)
        try:
            load = self.start_load("idle", path, "--streams", str(n))
            load.expect("READY", START_TIMEOUT)
            before = rss_kib(server.pid)
            load.write_line("OPEN")
            opened = int(load.expect("OPENED", START_TIMEOUT + n / 50))
            time.sleep(IDLE_SETTLE)
            after = rss_kib(server.pid)
            load.write_line("CLOSE")
            tally = self._collect(load, START_TIMEOUT + n / 50)
        finally:
            self.children.stop(server)
        return Idle(
            streams=n,
            open_streams=opened,
            rss_before_kib=before,
            rss_after_kib=after,
            echoed=tally["recv_msgs"] - 1,
            mismatches=tally["mismatches"],
            bad_statuses=sum(1 for s in tally["statuses"] if s != 0),
            errors=tally["errors"][:10],
        )

    # -- the whole plan --

    def run(self) -> dict[str, Any]:
        c = self.config
        cells: dict[str, dict[int, list[Cell]]] = {k: {s: [] for s in c.sizes} for k in c.servers}
        idles: dict[str, list[Idle]] = {k: [] for k in c.servers}
        total = c.runs * len(c.sizes) * len(c.servers)
        step = 0
        servers = {kind: self.start_server(kind) for kind in c.servers}
        pids = ", ".join(f"{k} pid {s.pid}" for k, (s, _) in servers.items())
        self.progress(f"servers up: {pids}")
        # Runs are interleaved (run 1 of every cell, then run 2, ...) so that a slow spell of
        # the machine does not fall on one server only.
        for run in range(c.runs):
            for size in c.sizes:
                for kind in c.servers:
                    step += 1
                    server, path = servers[kind]
                    for attempt in range(c.retries + 1):
                        note = self.wait_quiet()
                        cell = self.throughput(server, path, size)
                        cell.attempts = attempt + 1
                        busy = cell.other_cpu_pct > BUSY_RETRY_PCT and attempt < c.retries
                        self.progress(
                            f"[{step:2d}/{total}] {SERVER_LABELS[kind]:8s} {size // 1024:2d} KiB "
                            f"run {run + 1}: {cell.line()}{note}"
                            + (" -> machine busy, again" if busy else "")
                        )
                        if not busy:
                            break
                    cells[kind][size].append(cell)
        for server, _ in servers.values():
            self.children.stop(server)
        for run in range(c.runs):
            for kind in c.servers:
                idle = self.idle(kind)
                idles[kind].append(idle)
                self.progress(f"[idle {run + 1}/{c.runs}] {SERVER_LABELS[kind]:8s} {idle.line()}")
        return summarize(asdict(c), _machine(), cells, idles)


def _machine() -> dict[str, Any]:
    return {**describe_machine(), "uvloop": version("uvloop"), "grpcio": version("grpcio")}


@contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM/SIGHUP end the run like Ctrl-C does: through the ``finally`` that kills
    the children."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def run_benchmark(config: Config, progress: Progress = _stderr) -> dict[str, Any]:
    """Run the whole benchmark; the results as a JSON-ready dict. Children never outlive it."""
    bench = Bench(config, progress)
    try:
        with _terminate_on_sigterm():
            return bench.run()
    finally:
        bench.close()


def parse_args(argv: list[str] | None) -> tuple[Config, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="short cells (2 s, 0.5 s warm-up, settle 3 s): about a minute in all",
    )
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--duration", type=float, help="seconds measured per run (default 5, quick 2)")
    p.add_argument("--warmup", type=float, help="seconds before measuring (default 1, quick 0.5)")
    p.add_argument("--runs", type=int, default=3, help="runs per cell (the median is shown)")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="message sizes")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--streams", type=int, default=4, help="streams per load process")
    p.add_argument(
        "--inflight",
        type=int,
        default=256 << 10,
        help="bytes in flight per stream (at least one message)",
    )
    p.add_argument("--load-procs", type=int, default=1, help="load processes per run")
    p.add_argument("--idle-streams", type=int, default=2000)
    p.add_argument(
        "--grpcio-style",
        choices=["gen", "rw"],
        default="gen",
        help="grpc.aio handler: async generator (gen) or context.read/write (rw)",
    )
    p.add_argument(
        "--ours-style",
        choices=["callback", "task"],
        default="callback",
        help="our handler: callback style, as the proxy uses (callback), or a task "
        "per call awaiting recv() (task)",
    )
    p.add_argument(
        "--settle",
        type=float,
        help="seconds to wait, before each run, for other CPU use on the machine "
        f"to fall below {QUIET_PCT:g} %% of a core (default 10, quick 3)",
    )
    p.add_argument(
        "--retries",
        type=int,
        help="times a run is done again when other processes used more than "
        f"{BUSY_RETRY_PCT:g} %% of a core during it (default 2, quick 0)",
    )
    p.add_argument(
        "--client",
        choices=["lean", "api"],
        default="lean",
        help="how the load process drives its calls (see bench/_echo_load.py)",
    )
    a = p.parse_args(argv)
    config = Config(
        duration=a.duration if a.duration is not None else (2.0 if a.quick else 5.0),
        warmup=a.warmup if a.warmup is not None else (0.5 if a.quick else 1.0),
        runs=a.runs,
        sizes=tuple(a.sizes),
        servers=tuple(a.servers),
        streams=a.streams,
        inflight=a.inflight,
        load_procs=a.load_procs,
        idle_streams=a.idle_streams,
        grpcio_style=a.grpcio_style,
        ours_style=a.ours_style,
        client=a.client,
        settle=a.settle if a.settle is not None else (3.0 if a.quick else 10.0),
        retries=a.retries if a.retries is not None else (0 if a.quick else 2),
    )
    if not (
        0 < config.duration <= 600
        and 0 <= config.warmup <= 60
        and 1 <= config.runs <= 20
        and 1 <= config.streams <= 1000
        and 1 <= config.load_procs <= 8
        and 1 <= config.idle_streams <= 10000
        and 0 <= config.settle <= 600
        and 0 <= config.retries <= 10
        and all(0 < s <= 4 << 20 for s in config.sizes)
    ):
        p.error("a parameter is out of its range")
    return config, a


def main(argv: list[str] | None = None) -> int:
    config, args = parse_args(argv)
    start = time.monotonic()
    _stderr(
        f"echo benchmark: {len(config.servers)} servers x {len(config.sizes)} sizes x "
        f"{config.runs} runs of {config.duration:g} s (+{config.warmup:g} s warm-up), "
        f"then {config.idle_streams} idle streams x {config.runs}"
    )
    try:
        results = run_benchmark(config)
    except KeyboardInterrupt:
        _stderr("interrupted: children killed")
        return 130
    except ChildError as exc:
        _stderr(f"failed: {exc}")
        return 1
    results["elapsed_s"] = round(time.monotonic() - start, 1)
    print(render(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        _stderr(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
