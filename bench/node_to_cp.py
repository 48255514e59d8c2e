"""Node-to-control-plane tunnels (docs/node-to-control-plane.md) against the usual
direction, ours only (upstream has no reverse direction), same processes, same run.

One of our proxy-servers (frontend on a Unix socket, ``--allowed-destination`` naming the
backend) and one of our proxy-agents (``--feature-gates=NodeToMasterTraffic=true
--apiserver-port-mapping=<local>:127.0.0.1:<backend>``), both on 127.0.0.1, and the Go
backend and load generator of the tunnel benchmark (bench/loadgen). Two ways to the same
backend:

- **reverse**: a TCP client of the agent's local port -> agent -> server -> backend (the
  server dials it);
- **forward**: a client of the server's frontend (HTTP-CONNECT, or gRPC with ``--mode
  grpc``) -> server -> agent -> backend (the agent dials it).

Figures, each the median over ``--runs`` (the two ways alternate within a run):

a. one bulk transfer (256 MiB; quick: 32 MiB), download (the backend sends) and upload
   (the client sends): MB/s and reverse/forward;
b. 1 KiB echo round trips over one open connection (5000; quick: 1000): p50/p99 µs and
   reverse/forward;
c. forward downloads and uploads (4 connections at once) alone, and beside a stalled
   reverse client (connected through the agent's port to a backend that sends without end,
   never reading), over the same agent stream: kept = stalled rate / alone rate. Target
   (the issue's): >= 90 %. Both phases pause as long once their connections are open
   (``stall``), and alternate in order. A stalled run is bounded (``--window``); one that
   does not finish counts as 0.

Before measuring, the orchestrator checks both ways byte for byte itself (a download
against the backend's pattern, an upload acknowledged by the backend, random 1 KiB
echoes); every load generator transfer must also move exactly the bytes asked for. Targets
are reported, never asserted.

    .venv/bin/python -m bench.node_to_cp
    .venv/bin/python -m bench.node_to_cp --quick
    .venv/bin/python -m bench.node_to_cp --json bench/results/node-to-cp.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench._echo_proc import ChildError, cpu_seconds
from bench._machine import describe_machine
from bench._n2cp_report import (
    DIRECTIONS,
    FORWARD,
    REVERSE,
    WAYS,
    byte_exact,
    render,
    summarize_bulk,
    summarize_rtt,
)
from bench._tunnel_procs import (
    LOOPBACK,
    READY_TIMEOUT,
    Proc,
    Procs,
    agent_flags,
    build_loadgen,
    free_ports,
    make_certs,
    server_flags,
    wait_ready,
)

MODES = ("http-connect", "grpc")
MIB = 1 << 20
#: The issue's target for figure c: forward keeps this % of its rate alone.
KEPT_TARGET = 90.0
#: What the stalled reverse client asks the backend for: more than any buffer holds.
STALL_BYTES = 1 << 40
#: Seconds the stalled client's buffers get to fill before the forward transfers start.
STALL_FILL = 1.0
#: Beyond a load generator's own bound (-timeout), seconds to wait for its result and exit.
GRACE = 30.0
#: Bound on one unstalled load generator run (dial + transfer), seconds.
RUN_TIMEOUT = 300.0
#: The backend's bytes (bench/loadgen serveConn): 256 KiB blocks of i % 251.
CHUNK = 256 << 10
PATTERN = bytes(i % 251 for i in range(CHUNK))
#: The orchestrator's own byte-for-byte check: socket timeout and overall bound, seconds.
CHECK_TIMEOUT = 30.0
ECHO_SIZE = 1024
CAPABLE_METRIC = "konnectivity_fast_agent_capable_servers"
LOCAL_CONNECTIONS_METRIC = "konnectivity_fast_agent_local_connections"
#: Bound on a new forward connection's 1 MiB download beside the stalled client, seconds.
PROBE_TIMEOUT = 5.0
#: Bound on waiting for the agent's gauges (negotiated stream, stall gone), seconds.
METRIC_WAIT = 20.0
POLL = 0.05


@dataclass(frozen=True)
class Settings:
    mode: str = "http-connect"
    runs: int = 5
    bulk_mib: int = 256
    upload: bool = True
    rtt_count: int = 5000
    side_conns: int = 4
    side_mib: int = 64
    stall_runs: int = 3
    window: float = 15.0
    check_mib: int = 8
    echo_checks: int = 200
    #: Offer per-tunnel credit (flow.v1) on both sides (docs/flow-control.md).
    flow: bool = False


QUICK = Settings(
    runs=3, bulk_mib=32, rtt_count=1000, side_mib=8, stall_runs=1, window=6.0, check_mib=2
)


@dataclass
class Rig:
    procs: Procs
    loadgen: str
    mode: str
    uds: str
    backend: int  # the backend's port
    local: int  # the agent's mapped port
    server: Proc
    agent: Proc
    agent_health: int


# -- processes ------------------------------------------------------------------------------


def start(procs: Procs, folder: Path, mode: str, verbosity: int, *, flow: bool = False) -> Rig:
    """The backend, our server allowing it, our agent mapping a local port to it; returns
    once the agent's stream negotiated node-to-cp.v1."""
    loadgen = str(build_loadgen())
    certs = make_certs(folder)
    backend_proc = procs.start("backend", [loadgen, "backend"])
    backend = int(backend_proc.expect("READY", READY_TIMEOUT))
    agent_port, health, admin, a_health, a_admin, local = free_ports(6)
    uds = str(folder / f"{mode}.sock")
    python = [sys.executable, "-m"]
    extra = ["--enable-tunnel-flow-control=true"] if flow else []
    server = procs.start(
        f"server-{mode}",
        [
            *python,
            "konnectivity_fast.server",
            *server_flags(mode, uds, certs, agent_port=agent_port, health=health, admin=admin),
            f"--allowed-destination={LOOPBACK}:{backend}",
            *extra,
            f"--v={verbosity}",
        ],
    )
    wait_ready(server, health, "/healthz")
    agent = procs.start(
        "agent",
        [
            *python,
            "konnectivity_fast.agent",
            *agent_flags(certs, agent_port, health=a_health, admin=a_admin),
            "--feature-gates=NodeToMasterTraffic=true",
            f"--apiserver-port-mapping={local}:{LOOPBACK}:{backend}",
            *extra,
            f"--v={verbosity}",
        ],
    )
    wait_ready(agent, a_health, "/readyz")
    wait_ready(server, health, "/readyz")
    rig = Rig(procs, loadgen, mode, uds, backend, local, server, agent, a_health)
    wait_metric(rig, CAPABLE_METRIC, lambda v: v >= 1, "no server stream negotiated node-to-cp")
    return rig


def metric(rig: Rig, name: str) -> float:
    """Sum of the agent's samples of ``name`` on its /metrics (0 when absent)."""
    url = f"http://{LOOPBACK}:{rig.agent_health}/metrics"
    with urllib.request.urlopen(url, timeout=5.0) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rpartition(" ")[2])
    return total


def wait_metric(rig: Rig, name: str, ok: Any, what: str) -> float:
    deadline = time.monotonic() + METRIC_WAIT
    while True:
        value = metric(rig, name)
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"agent: {what} ({name} = {value:g} after {METRIC_WAIT:g} s)")
        time.sleep(POLL)


def run_loadgen(
    rig: Rig,
    way: str,
    command: list[str],
    timeout: float,
    on_ready: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """One load generator run through ``way``; its result, with the CPU seconds that our
    server and agent used between GO and RESULT (``proxy_cpu_s``) and the wall time from
    its start to its result (``wall_s``, dials included). ``on_ready`` runs once its
    connections are open, before GO."""
    t0 = time.monotonic()
    if way == REVERSE:
        reach = ["-mode=direct", f"-target={LOOPBACK}:{rig.local}"]
    else:
        reach = [f"-mode={rig.mode}", f"-uds={rig.uds}", f"-target={LOOPBACK}:{rig.backend}"]
    child = rig.procs.start(
        f"loadgen-{command[0]}-{way}",
        [rig.loadgen, command[0], *reach, *command[1:], f"-timeout={timeout:g}s"],
    )
    pids = (rig.server.pid, rig.agent.pid)
    # A dial that does not complete within -timeout: RESULT (its error) instead of READY.
    head, _, line = child.read_line(timeout + GRACE).partition(" ")
    cpu0 = sum(cpu_seconds(p) for p in pids)
    if head == "READY":
        if on_ready is not None:
            on_ready()
            cpu0 = sum(cpu_seconds(p) for p in pids)
        child.write_line("GO")
        line = child.expect("RESULT", timeout + GRACE)
    elif head != "RESULT":
        raise ChildError(f"{child.name}: expected READY or RESULT, got {head!r}")
    cpu = sum(cpu_seconds(p) for p in pids) - cpu0
    rig.procs.finish(child, GRACE)
    result: dict[str, Any] = json.loads(line)
    result["proxy_cpu_s"] = round(cpu, 3)
    result["wall_s"] = round(time.monotonic() - t0, 3)
    return result


def bulk(  # noqa: PLR0917
    rig: Rig,
    way: str,
    direction: str,
    conns: int,
    mib: int,
    timeout: float = RUN_TIMEOUT,
    on_ready: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """``conns`` transfers of ``mib`` MiB at once: MB/s, and whether the bytes were exact."""
    want = conns * mib * MIB
    command = ["bulk", f"-conns={conns}", f"-bytes={mib * MIB}", f"-dir={direction}"]
    r = run_loadgen(rig, way, command, timeout, on_ready)
    done = "error" not in r and int(r.get("bytes", -1)) == want
    seconds = float(r.get("seconds", 0.0))
    return {
        "mb_s": round(want / seconds / 1e6, 1) if done and seconds > 0 else 0.0,
        "seconds": round(seconds, 3),
        "wall_s": r["wall_s"],
        "bytes": int(r.get("bytes", 0)),
        "expected_bytes": want,
        "exact": done,
        "cpu_s_per_gib": round(r["proxy_cpu_s"] / (want / (1 << 30)), 2) if done else None,
        **({"error": str(r["error"])} if "error" in r else {}),
    }


def rtt(rig: Rig, way: str, count: int) -> dict[str, Any]:
    r = run_loadgen(rig, way, ["rtt", f"-count={count}", f"-size={ECHO_SIZE}"], RUN_TIMEOUT)
    if "error" in r:
        raise RuntimeError(f"rtt {way}: {r['error']}")
    return {
        "p50_us": round(float(r["p50_ms"]) * 1000, 1),
        "p99_us": round(float(r["p99_ms"]) * 1000, 1),
        "count": int(r["count"]),
        "exact": int(r["count"]) == count,
    }


# -- the orchestrator's own byte-for-byte check ----------------------------------------------


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    parts: list[bytes] = []
    got = 0
    # Bounded: each pass takes at least one byte or ends the loop; and by the deadline.
    for _ in range(n):
        if got >= n:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{got} of {n} bytes by the deadline")
        part = sock.recv(min(n - got, 1 << 20))
        if not part:
            raise ConnectionError(f"closed after {got} of {n} bytes")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


@contextlib.contextmanager
def connect(rig: Rig, way: str) -> Iterator[socket.socket]:
    """A connection to the backend through ``way`` (forward: HTTP-CONNECT only)."""
    if way == REVERSE:
        sock = socket.create_connection((LOOPBACK, rig.local), timeout=CHECK_TIMEOUT)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CHECK_TIMEOUT)
        sock.connect(rig.uds)
    try:
        if way == FORWARD:
            target = f"{LOOPBACK}:{rig.backend}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            head = b""
            # The response head is short: bounded by 64 reads and 8 KiB.
            for _ in range(64):
                if b"\r\n\r\n" in head or len(head) > 8192:
                    break
                part = sock.recv(1)  # one byte at a time: nothing of the tunnel is read
                if not part:
                    break
                head += part
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"CONNECT answered {head[:80]!r}")
        yield sock
    finally:
        sock.close()


def check_way(rig: Rig, way: str, mib: int, echoes: int) -> dict[str, bool]:
    """Download ``mib`` MiB and compare with the backend's pattern; upload as much and get
    the backend's acknowledgement; ``echoes`` random 1 KiB round trips compared."""
    deadline = time.monotonic() + CHECK_TIMEOUT
    n = mib * MIB
    result: dict[str, bool] = {}
    with connect(rig, way) as sock:
        sock.sendall(b"D" + struct.pack(">Q", n))
        data = _recv_exact(sock, n, deadline)
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        ends = sock.recv(1) == b""  # the backend closes after the last byte
        result["download"] = ends and all(
            data[i : i + CHUNK] == PATTERN[: len(data[i : i + CHUNK])] for i in range(0, n, CHUNK)
        )
    with connect(rig, way) as sock:
        sock.sendall(b"U" + struct.pack(">Q", n))
        payload = os.urandom(CHUNK)
        for _ in range(n // CHUNK):
            sock.sendall(payload)
        result["upload"] = _recv_exact(sock, 1, deadline) == b"K"
    with connect(rig, way) as sock:
        sock.sendall(b"E")
        ok = True
        for _ in range(echoes):
            msg = os.urandom(ECHO_SIZE)
            sock.sendall(msg)
            ok = ok and _recv_exact(sock, ECHO_SIZE, deadline) == msg
        result["echo"] = ok
    return result


# -- the stalled reverse client ---------------------------------------------------------------


@contextlib.contextmanager
def stalled_reverse_client(rig: Rig) -> Iterator[socket.socket]:
    """A client of the agent's port asking the backend for 1 TiB and never reading; on
    exit it is reset, and the agent's gauge says the connection is gone."""
    sock = socket.create_connection((LOOPBACK, rig.local), timeout=CHECK_TIMEOUT)
    try:
        sock.sendall(b"D" + struct.pack(">Q", STALL_BYTES))
        wait_metric(rig, LOCAL_CONNECTIONS_METRIC, lambda v: v >= 1, "stalled client not carried")
        time.sleep(STALL_FILL)
        yield sock
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    wait_metric(rig, LOCAL_CONNECTIONS_METRIC, lambda v: v == 0, "stalled client still open")


def _pause() -> None:
    """What the alone runs do where the stalled ones start their client (``stall``)."""
    time.sleep(STALL_FILL)


def _beside_stall(rig: Rig, settings: Settings, direction: str) -> dict[str, Any]:
    """One forward run beside a stalled reverse client, and (downloads) a new forward
    connection tried while the client is still there (``probe``)."""
    with contextlib.ExitStack() as stack:

        def begin() -> object:
            return stack.enter_context(stalled_reverse_client(rig))

        conns, mib = settings.side_conns, settings.side_mib
        r = bulk(rig, FORWARD, direction, conns, mib, settings.window + STALL_FILL, begin)
        if direction == DIRECTIONS[0]:
            p = bulk(rig, FORWARD, "down", 1, 1, PROBE_TIMEOUT)
            r["probe"] = {"ok": p["exact"], "wall_s": p["wall_s"]}
        return r


# -- the measurement ------------------------------------------------------------------------


def run(settings: Settings, folder: Path, verbosity: int = 0) -> dict[str, Any]:
    procs = Procs(folder)
    started = time.monotonic()
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "machine": describe_machine(),
        "load_before": os.getloadavg(),
    }
    with contextlib.ExitStack() as stack:
        stack.callback(procs.kill_all)
        rig = start(procs, folder, settings.mode, verbosity, flow=settings.flow)
        report["check"] = {
            way: check_way(rig, way, settings.check_mib, settings.echo_checks)
            if way == REVERSE or rig.mode == "http-connect"
            else "skipped (gRPC frontend: the load generator's byte counts only)"
            for way in WAYS
        }
        progress(f"byte-for-byte check: {report['check']}")
        directions = DIRECTIONS if settings.upload else DIRECTIONS[:1]
        transfers: dict[str, dict[str, list[dict[str, Any]]]] = {d: {} for d in directions}
        rtts: dict[str, list[dict[str, Any]]] = {}
        for i in range(settings.runs):
            order = WAYS if i % 2 == 0 else WAYS[::-1]
            for d in directions:
                for way in order:
                    r = bulk(rig, way, d, 1, settings.bulk_mib)
                    transfers[d].setdefault(way, []).append(r)
                    progress(f"run {i + 1} {d} {way}: {r['mb_s']} MB/s")
            for way in order:
                r = rtt(rig, way, settings.rtt_count)
                rtts.setdefault(way, []).append(r)
                progress(f"run {i + 1} rtt {way}: p50 {r['p50_us']} us p99 {r['p99_us']} us")
        report["transfer"] = {d: summarize_bulk(by_way) for d, by_way in transfers.items()}
        report["rtt"] = summarize_rtt(rtts)
        report["stall"] = stall(rig, settings, directions)
    report["load_after"] = os.getloadavg()
    report["seconds"] = round(time.monotonic() - started, 1)
    report["byte_exact"] = byte_exact(report)
    return report


def stall(rig: Rig, settings: Settings, directions: Sequence[str]) -> dict[str, Any]:
    """Figure c: forward transfers alone, and beside a stalled reverse client. The
    stalled client connects once the forward connections are open (the load generator's
    READY), before they move a byte, and gets STALL_FILL to fill its buffers; the alone
    runs wait as long at the same point, since connections idle that long restart slower
    (TCP's slow start after idle): 93 % of an unpaused run's upload rate on the gRPC
    frontend, measured. The two phases alternate in order from run to run. With the
    client still there, a new forward connection (1 MiB download, dial included) is tried
    too, bounded by ``PROBE_TIMEOUT``."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        d: {"alone": [], "stalled": []} for d in directions
    }
    probes: list[dict[str, Any]] = []
    for i in range(settings.stall_runs):
        phases = ("alone", "stalled") if i % 2 == 0 else ("stalled", "alone")
        for phase in phases:
            for d in directions:
                if phase == "alone":
                    r = bulk(
                        rig, FORWARD, d, settings.side_conns, settings.side_mib, on_ready=_pause
                    )
                    runs[d]["alone"].append(r)
                    progress(f"stall run {i + 1} forward {d} alone: {r['mb_s']} MB/s")
                    continue
                r = _beside_stall(rig, settings, d)
                runs[d]["stalled"].append(r)
                note = f" ({r['error']})" if "error" in r else ""
                progress(f"stall run {i + 1} forward {d} stalled: {r['mb_s']} MB/s{note}")
                if d == directions[0]:
                    probes.append(r.pop("probe"))
                    progress(f"stall run {i + 1} new forward connection: {probes[-1]}")
    out: dict[str, Any] = {}
    for d, by_phase in runs.items():
        alone = statistics.median(r["mb_s"] for r in by_phase["alone"])
        stalled = statistics.median(r["mb_s"] for r in by_phase["stalled"])
        kept = round(stalled / alone * 100, 1) if alone else 0.0
        out[d] = {
            "alone_mb_s": alone,
            "stalled_mb_s": stalled,
            "kept_pct": kept,
            "target_pct": KEPT_TARGET,
            "met": kept >= KEPT_TARGET,
            "timed_out": sum("error" in r for r in by_phase["stalled"]),
            "runs": by_phase,
        }
    out["new_connection"] = {
        "opened": sum(p["ok"] for p in probes),
        "tried": len(probes),
        "bound_s": PROBE_TIMEOUT,
        "runs": probes,
    }
    return out


# -- report ---------------------------------------------------------------------------------


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few runs (~1 min)")
    parser.add_argument("--mode", choices=MODES, help="the forward way's frontend")
    parser.add_argument("--runs", type=int, help="runs of figures a and b")
    parser.add_argument("--bulk-mib", type=int, help="MiB of one bulk transfer (a)")
    parser.add_argument("--no-upload", action="store_true", help="downloads only")
    parser.add_argument("--rtt-count", type=int, help="1 KiB round trips per run (b)")
    parser.add_argument("--side-conns", type=int, help="forward transfers at once (c)")
    parser.add_argument("--side-mib", type=int, help="MiB of each of them (c)")
    parser.add_argument("--stall-runs", type=int, help="runs of figure c")
    parser.add_argument("--window", type=float, help="bound on a stalled run, s (c)")
    parser.add_argument("--check-mib", type=int, help="MiB of the byte-for-byte check")
    parser.add_argument("--echo-checks", type=int, help="1 KiB echoes of that check")
    parser.add_argument(
        "--flow", action="store_true", default=None, help="both sides offer flow.v1"
    )
    parser.add_argument("--verbosity", type=int, default=0, help="--v of server and agent")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else Settings()
    given = {
        k: v for k, v in vars(args).items() if v is not None and k in Settings.__dataclass_fields__
    }
    settings = Settings(**{**asdict(base), **given, "upload": base.upload and not args.no_upload})
    with tempfile.TemporaryDirectory(prefix="kf-n2cp-") as tmp:
        report = run(settings, Path(tmp), args.verbosity)
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["byte_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
