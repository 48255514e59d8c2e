"""The node-to-control-plane benchmark's figures out of its runs, and its table
(``bench/node_to_cp.py``): medians, reverse/forward ratios, whether every byte went
through exactly."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

__all__ = [
    "DIRECTIONS",
    "FORWARD",
    "REVERSE",
    "WAYS",
    "byte_exact",
    "render",
    "summarize_bulk",
    "summarize_rtt",
]

REVERSE = "reverse"
FORWARD = "forward"
WAYS = (REVERSE, FORWARD)
DIRECTIONS = ("down", "up")


def summarize_bulk(by_way: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        way: {
            "mb_s": statistics.median(r["mb_s"] for r in rs),
            "min": min(r["mb_s"] for r in rs),
            "max": max(r["mb_s"] for r in rs),
            "cpu_s_per_gib": _median_or_none(r["cpu_s_per_gib"] for r in rs),
            "runs": rs,
        }
        for way, rs in by_way.items()
    }
    fwd = out[FORWARD]["mb_s"]
    out["ratio"] = round(out[REVERSE]["mb_s"] / fwd, 3) if fwd else None
    return out


def summarize_rtt(by_way: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        way: {
            "p50_us": statistics.median(r["p50_us"] for r in rs),
            "p99_us": statistics.median(r["p99_us"] for r in rs),
            "runs": rs,
        }
        for way, rs in by_way.items()
    }
    for p in ("p50_us", "p99_us"):
        out[f"ratio_{p[:3]}"] = round(out[REVERSE][p] / out[FORWARD][p], 3)
    return out


def _median_or_none(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(statistics.median(kept), 2) if kept else None


def byte_exact(report: dict[str, Any]) -> bool:
    """Every check passed and every unstalled transfer and round trip moved exactly what
    it asked for (a stalled run cut short by its bound is not counted against it)."""
    checks = [v for c in report["check"].values() if isinstance(c, dict) for v in c.values()]
    runs = [r for by_way in report["transfer"].values() for w in WAYS for r in by_way[w]["runs"]]
    runs += [r for w in WAYS for r in report["rtt"][w]["runs"]]
    phases = [report["stall"][d]["runs"] for d in DIRECTIONS if d in report["stall"]]
    runs += [r for p in phases for r in p["alone"]]
    stalled = [r for p in phases for r in p["stalled"]]
    return (
        all(checks)
        and all(r["exact"] for r in runs)
        and all(r["exact"] or "timeout" in r.get("error", "") for r in stalled)
    )


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    mode = "HTTP-CONNECT" if s["mode"] == "http-connect" else "gRPC"
    lines = [
        f"node-to-control-plane (reverse) vs forward, ours, forward through the {mode} "
        f"frontend{', flow.v1 on' if s['flow'] else ''}; medians of {s['runs']} runs",
        f"{'figure':34s} {'reverse':>18s} {'forward':>18s} {'rev/fwd':>8s}",
    ]
    for d, t in report["transfer"].items():
        name = f"{'download' if d == 'down' else 'upload'} {s['bulk_mib']} MiB, MB/s"
        cells = [f"{t[w]['mb_s']:.0f} ({t[w]['min']:.0f}-{t[w]['max']:.0f})" for w in WAYS]
        ratio = f"{t['ratio']:.2f}x" if t["ratio"] is not None else "-"
        lines.append(f"{name:34s} {cells[0]:>18s} {cells[1]:>18s} {ratio:>8s}")
        cpu = [t[w]["cpu_s_per_gib"] for w in WAYS]
        if None not in cpu:
            lines.append(f"{'  server + agent CPU-s/GiB':34s} {cpu[0]:>18.2f} {cpu[1]:>18.2f}")
    r = report["rtt"]
    for p in ("p50", "p99"):
        name = f"1 KiB round trip {p}, us ({s['rtt_count']})"
        lines.append(
            f"{name:34s} {r[REVERSE][p + '_us']:>18.0f} {r[FORWARD][p + '_us']:>18.0f} "
            f"{r['ratio_' + p]:>7.2f}x"
        )
    lines += [
        "",
        f"forward transfers ({s['side_conns']} x {s['side_mib']} MiB at once) beside a "
        f"stalled reverse client, median of {s['stall_runs']} run(s), bound {s['window']:g} s",
        f"{'transfer':10s} {'alone MB/s':>11s} {'stalled MB/s':>13s} {'kept':>7s} "
        f"{'target':>8s}  result",
    ]
    for d in DIRECTIONS:
        if d not in report["stall"]:
            continue
        c = report["stall"][d]
        cut = f" ({c['timed_out']} run(s) hit the bound)" if c["timed_out"] else ""
        lines.append(
            f"{d + 'load':10s} {c['alone_mb_s']:>11.0f} {c['stalled_mb_s']:>13.0f} "
            f"{c['kept_pct']:>6.0f}% {'>= 90%':>8s}  {'met' if c['met'] else 'NOT met'}{cut}"
        )
    new = report["stall"]["new_connection"]
    lines.append(
        f"a new forward connection beside the stall (1 MiB, within {new['bound_s']:g} s): "
        f"{new['opened']} of {new['tried']} opened"
    )
    checks = ", ".join(
        f"{w}: "
        + (
            " ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in c.items())
            if isinstance(c, dict)
            else c
        )
        for w, c in report["check"].items()
    )
    lines += [
        "",
        f"byte-for-byte: {checks}",
        f"every transfer and round trip exact: {'yes' if report['byte_exact'] else 'NO'}",
        f"{report['seconds']:g} s; load average before {report['load_before'][0]:.2f}, "
        f"after {report['load_after'][0]:.2f}; targets reported, not asserted",
    ]
    return "\n".join(lines)
