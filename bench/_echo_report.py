"""Results of the echo benchmark: per-run records, the summary (JSON) and the text table.

The summary's shape is fixed by ``REQUIRED_KEYS`` (``missing_keys`` checks a summary
against it; the smoke test uses that). Targets are the project's goals (bench/README.md);
they are reported next to the ratios, never asserted.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

SERVER_LABELS = {"ours": "ours", "grpcio": "grpc.aio"}
# ours / grpc.aio echoed msgs/s wanted, per message size.
TARGET_SPEEDUP = {1024: 30.0, 32 * 1024: 4.0}
# Server RSS per idle stream wanted, KiB.
TARGET_IDLE_KIB = 2.0


@dataclass
class Cell:
    """One throughput run: one server, one message size, one load-process set."""

    size: int
    msgs_per_s: float
    bytes_per_s: float
    window_msgs: int
    server_cpu_s: float
    wall_s: float
    load_cpu_pct: list[float]
    machine_busy_pct: float
    server_rss_kib: int
    sent_msgs: int
    recv_msgs: int
    sent_bytes: int
    recv_bytes: int
    mismatches: int
    bad_statuses: int
    errors: list[str] = field(default_factory=list)
    attempts: int = 1

    @property
    def server_us_per_msg(self) -> float:
        return 1e6 * self.server_cpu_s / self.window_msgs if self.window_msgs else float("nan")

    @property
    def server_cpu_pct(self) -> float:
        return 100.0 * self.server_cpu_s / self.wall_s

    @property
    def ok(self) -> bool:
        return (
            self.window_msgs > 0
            and self.mismatches == 0
            and self.bad_statuses == 0
            and not self.errors
            and self.recv_msgs == self.sent_msgs
            and self.recv_bytes == self.sent_bytes
        )

    @property
    def other_cpu_pct(self) -> float:
        """CPU used on the machine by neither the server nor the load processes."""
        own = self.server_cpu_s / self.wall_s * 100 + sum(self.load_cpu_pct)
        return max(0.0, self.machine_busy_pct - own)

    def metrics(self) -> dict[str, float]:
        return {
            "msgs_per_s": self.msgs_per_s,
            "mb_per_s": self.bytes_per_s / 1e6,
            "server_us_per_msg": self.server_us_per_msg,
            "server_cpu_pct": self.server_cpu_pct,
            "load_cpu_pct": max(self.load_cpu_pct),
            "server_rss_mib": self.server_rss_kib / 1024,
            "other_cpu_pct": self.other_cpu_pct,
        }

    def line(self) -> str:
        m = self.metrics()
        return (
            f"{m['msgs_per_s']:9.0f} msgs/s {m['mb_per_s']:7.1f} MB/s, server "
            f"{m['server_us_per_msg']:6.1f} µs/msg ({m['server_cpu_pct']:3.0f} % CPU), "
            f"load {m['load_cpu_pct']:3.0f} %, others {m['other_cpu_pct']:3.0f} %"
            f"{'' if self.ok else '  CHECK FAILED'}"
        )


@dataclass
class Idle:
    """One idle-stream run: a fresh server, N streams each echoed once, RSS before/after."""

    streams: int
    open_streams: int
    rss_before_kib: int
    rss_after_kib: int
    echoed: int
    mismatches: int
    bad_statuses: int
    errors: list[str] = field(default_factory=list)

    @property
    def kib_per_stream(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.streams

    @property
    def ok(self) -> bool:
        return (
            self.echoed == self.streams
            and self.open_streams >= self.streams
            and self.mismatches == 0
            and self.bad_statuses == 0
            and not self.errors
        )

    def line(self) -> str:
        return (
            f"{self.kib_per_stream:6.2f} KiB/stream (RSS {self.rss_before_kib / 1024:.1f}"
            f" -> {self.rss_after_kib / 1024:.1f} MiB){'' if self.ok else '  CHECK FAILED'}"
        )


METRICS = (
    "msgs_per_s",
    "mb_per_s",
    "server_us_per_msg",
    "server_cpu_pct",
    "load_cpu_pct",
    "server_rss_mib",
    "other_cpu_pct",
)
STAT_KEYS = ("median", "min", "max", "runs")
REQUIRED_KEYS: dict[str, Any] = {
    "machine": ("date", "nproc", "cpu_model", "kernel", "python", "uvloop", "grpcio"),
    "config": (
        "duration",
        "warmup",
        "runs",
        "sizes",
        "servers",
        "streams",
        "inflight",
        "load_procs",
        "idle_streams",
        "grpcio_style",
        "ours_style",
        "client",
        "settle",
        "retries",
    ),
    "servers.<server>.sizes.<size>": (*METRICS, "ok", "runs"),
    "servers.<server>.idle": ("kib_per_stream", "ok", "runs"),
    "ratios.<size>": ("msgs_per_s", "server_us_per_msg", "target_msgs_per_s", "meets_target"),
    "ratios.idle": (
        "ours_kib_per_stream",
        "grpcio_kib_per_stream",
        "target_kib_per_stream",
        "meets_target",
    ),
    "ok": (),
}


def _stat(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": values,
    }


def summarize(
    config: dict[str, Any],
    machine: dict[str, Any],
    cells: dict[str, dict[int, list[Cell]]],
    idles: dict[str, list[Idle]],
) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for kind, by_size in cells.items():
        sizes: dict[str, Any] = {}
        for size, runs in by_size.items():
            entry: dict[str, Any] = {
                name: _stat([r.metrics()[name] for r in runs]) for name in METRICS
            }
            entry["ok"] = all(r.ok for r in runs)
            entry["runs"] = [{**asdict(r), **r.metrics(), "ok": r.ok} for r in runs]
            sizes[str(size)] = entry
        idle_runs = idles[kind]
        servers[kind] = {
            "label": SERVER_LABELS[kind],
            "sizes": sizes,
            "idle": {
                "kib_per_stream": _stat([i.kib_per_stream for i in idle_runs]),
                "ok": all(i.ok for i in idle_runs),
                "runs": [
                    {**asdict(i), "kib_per_stream": i.kib_per_stream, "ok": i.ok} for i in idle_runs
                ],
            },
        }
    ratios: dict[str, Any] = {}
    if "ours" in servers and "grpcio" in servers:
        ours, theirs = servers["ours"], servers["grpcio"]
        for size_key in ours["sizes"]:
            a, b = ours["sizes"][size_key], theirs["sizes"][size_key]
            speedup = a["msgs_per_s"]["median"] / b["msgs_per_s"]["median"]
            target = TARGET_SPEEDUP.get(int(size_key))
            ratios[size_key] = {
                "msgs_per_s": speedup,
                "server_us_per_msg": (
                    a["server_us_per_msg"]["median"] / b["server_us_per_msg"]["median"]
                ),
                "target_msgs_per_s": target,
                "meets_target": None if target is None else speedup >= target,
            }
        ours_kib = ours["idle"]["kib_per_stream"]["median"]
        ratios["idle"] = {
            "ours_kib_per_stream": ours_kib,
            "grpcio_kib_per_stream": theirs["idle"]["kib_per_stream"]["median"],
            "target_kib_per_stream": TARGET_IDLE_KIB,
            "meets_target": ours_kib <= TARGET_IDLE_KIB,
        }
    ok = all(
        s["idle"]["ok"] and all(c["ok"] for c in s["sizes"].values()) for s in servers.values()
    )
    return {"machine": machine, "config": config, "servers": servers, "ratios": ratios, "ok": ok}


def missing_keys(results: dict[str, Any]) -> list[str]:
    """Keys of ``REQUIRED_KEYS`` absent from ``results`` (an empty list when complete)."""
    missing: list[str] = []

    def expand(node: Any, parts: list[str], where: str) -> list[tuple[str, Any]]:
        if not parts:
            return [(where, node)]
        head, *tail = parts
        if not isinstance(node, dict):
            missing.append(f"{where} (not an object)")
            return []
        if head.startswith("<"):
            keys = [k for k in node if not (head == "<size>" and k == "idle")]
            if not keys:
                missing.append(f"{where}.{head}")
            return [x for k in keys for x in expand(node[k], tail, f"{where}.{k}")]
        if head not in node:
            missing.append(f"{where}.{head}".lstrip("."))
            return []
        return expand(node[head], tail, f"{where}.{head}".lstrip("."))

    for path, keys in REQUIRED_KEYS.items():
        for where, node in expand(results, path.split("."), ""):
            missing += [f"{where}.{k}" for k in keys if not isinstance(node, dict) or k not in node]
            if path.startswith("servers.") and "runs" in keys and isinstance(node, dict):
                missing += [
                    f"{where}.{m}.{s}"
                    for m in METRICS
                    if m in node
                    for s in STAT_KEYS
                    if s not in node[m]
                ]
    return missing


def _n(x: float) -> str:
    """A rate, compact: 274k, 17.2k, 3506."""
    if x >= 100_000:
        return f"{x / 1000:.0f}k"
    if x >= 10_000:
        return f"{x / 1000:.1f}k"
    return f"{x:.0f}"


def _spread(s: dict[str, Any], fmt: str = ".1f", num: Any = None) -> str:
    f = num or (lambda x: f"{x:{fmt}}")
    if s["min"] == s["max"]:
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, others right."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        return "  ".join(cells).rstrip()

    return [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("met" if ok else "NOT met")


def render(results: dict[str, Any]) -> str:
    m, c = results["machine"], results["config"]
    servers = results["servers"]
    out = [
        "",
        f"gRPC echo, {m['date']}: {m['cpu_model']}, {m['nproc']} CPUs, Linux {m['kernel']}, "
        f"Python {m['python']}, uvloop {m['uvloop']}, grpcio {m['grpcio']}",
        f"load: {c['load_procs']} process(es) x {c['streams']} streams x "
        f"{c['inflight'] // 1024} KiB in flight ({c['client']} client); {c['runs']} runs x "
        f"{c['duration']:g} s per cell; median (min-max)",
        "",
    ]
    rows = []
    for size in c["sizes"]:
        for s in servers.values():
            e = s["sizes"][str(size)]
            rows.append(
                [
                    s["label"],
                    f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B",
                    _spread(e["msgs_per_s"], num=_n),
                    f"{e['mb_per_s']['median']:.0f}",
                    _spread(e["server_us_per_msg"]),
                    f"{e['server_cpu_pct']['median']:.0f} %",
                    f"{e['load_cpu_pct']['median']:.0f} %",
                    f"{e['other_cpu_pct']['max']:.0f} %",
                    f"{e['server_rss_mib']['median']:.0f}",
                    "ok" if e["ok"] else "FAILED",
                ]
            )
    out += table(
        [
            "server",
            "size",
            "msgs/s",
            "MB/s",
            "srv µs/msg",
            "srv CPU",
            "load CPU",
            "others max",
            "RSS MiB",
            "check",
        ],
        rows,
    )
    out += [
        "",
        f"RSS per idle stream: {c['idle_streams']} bidi streams on one connection, "
        "each echoed once, server RSS growth / streams",
    ]
    rows = []
    for s in servers.values():
        i = s["idle"]
        first = i["runs"][0]
        rows.append(
            [
                s["label"],
                _spread(i["kib_per_stream"], ".2f"),
                f"{first['rss_before_kib'] / 1024:.1f} -> {first['rss_after_kib'] / 1024:.1f}",
                "ok" if i["ok"] else "FAILED",
            ]
        )
    out += table(["server", "KiB/stream", "RSS MiB (run 1)", "check"], rows)
    r = results["ratios"]
    if r:
        out += ["", "ours / grpc.aio (medians); targets are reported, not asserted"]
        rows = []
        for size in c["sizes"]:
            x = r[str(size)]
            tgt = x["target_msgs_per_s"]
            rows.append(
                [
                    f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B",
                    f"{x['msgs_per_s']:.1f}x",
                    f">= {tgt:g}x" if tgt else "-",
                    _verdict(x["meets_target"]),
                    f"{x['server_us_per_msg']:.3f} ({1 / x['server_us_per_msg']:.0f}x less)",
                ]
            )
        out += table(["size", "msgs/s", "target", "", "srv CPU per msg"], rows)
        x = r["idle"]
        out.append(
            f"RSS per idle stream: ours {x['ours_kib_per_stream']:.2f} KiB, grpc.aio "
            f"{x['grpcio_kib_per_stream']:.2f} KiB; target <= "
            f"{x['target_kib_per_stream']:g} KiB: {_verdict(x['meets_target'])}"
        )
    if not results["ok"]:
        out += ["", "CORRECTNESS CHECK FAILED: see the runs in the JSON (mismatches, statuses)"]
    if "elapsed_s" in results:
        out.append(f"(total {results['elapsed_s']:.0f} s)")
    return "\n".join(out)
