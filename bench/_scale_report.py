"""The server-at-scale benchmark's tables and medians (``bench/server_scale.py``): ours
against upstream per agent count with issue 14's targets, and the workers comparison with
each worker count's ratio to one worker's."""

from __future__ import annotations

import os
import statistics
from typing import Any

__all__ = [
    "CHURN_TARGET",
    "MEMORY_TARGET",
    "TUNNEL_CPU_TARGET",
    "median_run",
    "report_table",
    "workers_table",
]

#: Targets of the issue: churn RSS within 1.2x of round 2's; connect CPU <= upstream's;
#: memory per agent <= 0.5x upstream's; tunnel CPU <= 0.7x upstream's.
CHURN_TARGET = 1.2
MEMORY_TARGET = 0.5
TUNNEL_CPU_TARGET = 0.7


def ratio(ours: float, upstream: float) -> str:
    return f"{ours / upstream:.2f}x" if upstream else "-"


def _target(ours: float | None, upstream: float | None, target: float | None) -> str:
    if target is None or ours is None or upstream is None:
        return ""
    met = ours is not None and upstream is not None and upstream > 0 and ours / upstream <= target
    return f"<= {target:g}x  {'met' if met else 'NOT met'}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def report_table(results: dict[str, Any]) -> str:
    lines = ["server at scale: ours vs upstream v0.36.0, same run (fake agents: loadgen swarm)"]
    figures = [
        ("kib_per_agent", "KiB per agent", MEMORY_TARGET),
        ("connect_cpu_ms", "connect CPU, ms/agent", 1.0),
        ("storm_s", "storm, s", None),
        ("worst_connect_ms", "slowest connect, ms", 2.0),
        ("tunnels_per_s", "tunnels/s", None),
        ("server_cpu_ms_per_tunnel", "server CPU, ms/tunnel", TUNNEL_CPU_TARGET),
    ]
    for n, by_impl in sorted(results.get("scale", {}).items(), key=lambda kv: int(kv[0])):
        lines += [
            f"\nN = {n} agents",
            f"{'figure':26s} {'ours':>9s} {'upstream':>9s} ours/up  target",
        ]
        for key, label, target in figures:
            o = by_impl.get("ours", {}).get(key)
            u = by_impl.get("upstream", {}).get(key)
            r = ratio(o, u) if o is not None and u else "-"
            lines.append(
                f"{label:26s} {_cell(o):>9s} {_cell(u):>9s} {r:>7s}  {_target(o, u, target)}"
            )
    churn = results.get("churn")
    if churn:
        lines.append(f"\nchurn: {churn['agents']} agents x {churn['rounds']} rounds, RSS held, MiB")
        for impl, c in churn["by_impl"].items():
            last = c["last_over_second"]
            mark = ""
            if last is not None:
                met = "met" if last <= CHURN_TARGET else "NOT met"
                mark = f"  last/2nd {last} (target <= {CHURN_TARGET}: {met})"
            lines.append(f"  {impl:9s} {' '.join(f'{v:g}' for v in c['held_mib'])}{mark}")
    return "\n".join(lines)


#: The workers comparison's figures: (key, label, which way is better: "lower"/"higher").
WORKER_FIGURES = [
    ("storm_s", "storm, s", "lower"),
    ("worst_connect_ms", "slowest connect, ms", "lower"),
    ("p50_connect_ms", "median connect, ms", "lower"),
    ("connect_cpu_ms", "connect CPU, ms/agent", "lower"),
    ("dials_per_s", "connections/s, storm", "higher"),
    ("connect_cpu_ms_per_dial", "connect CPU, ms/conn", "lower"),
    ("kib_per_agent", "KiB per agent", "lower"),
    ("tunnels_per_s", "tunnels/s", "higher"),
    ("server_cpu_ms_per_tunnel", "server CPU, ms/tunnel", "lower"),
    ("storm_busy", "machine busy, storm", None),
    ("storm_others", "  other work, storm", None),
    ("tunnels_busy", "machine busy, tunnels", None),
    ("tunnels_others", "  other work, tunnels", None),
]


def speedup(base: float | None, value: float | None, better: str | None) -> str:
    """How many times better ``value`` is than ``base`` (> 1: better), for a figure where
    ``better`` is "lower" or "higher"."""
    if better is None or not base or not value:
        return "-"
    return f"{(base / value if better == 'lower' else value / base):.2f}x"


def workers_table(results: dict[str, Any]) -> str:
    counts: list[int] = results["workers_compare"]["counts"]
    base = f"ours-{counts[0]}w"
    lines = [
        "proxy-server --workers: our server with "
        + " and ".join(str(c) for c in counts)
        + " worker processes, upstream v0.36.0 for reference, same run "
        + f"(fake agents: loadgen swarm -servers=W; {os.cpu_count()} CPUs shared with it)"
    ]
    repeats = results["workers_compare"].get("repeats", 1)
    if repeats > 1:
        lines.append(f"medians of {repeats} runs each, interleaved")
    for n, by_variant in sorted(
        results["workers_compare"]["by_agents"].items(), key=lambda kv: int(kv[0])
    ):
        names = list(by_variant)
        others = [c for c in counts[1:] if f"ours-{c}w" in by_variant]
        head = f"{'figure':24s}" + "".join(f" {name:>11s}" for name in names)
        head += "".join(f" {f'{c}w/{counts[0]}w':>8s} {'speed-up':>8s}" for c in others)
        lines += [f"\nN = {n} agents", head]
        rows = [("connected", "agents holding all W", None), ("dials", "dials", None)]
        for key, label, better in rows + WORKER_FIGURES:
            cells = [by_variant[name].get(key) for name in names]
            row = f"{label:24s}" + "".join(f" {_cell(c):>11s}" for c in cells)
            b = by_variant.get(base, {}).get(key)
            for c in others:
                v = by_variant[f"ours-{c}w"].get(key)
                plain = f"{v / b:.2f}x" if b and v is not None else "-"
                row += f" {plain:>8s} {speedup(b, v, better):>8s}"
            lines.append(row)
        held = [
            f"{name}: {by_variant[name].get('servers')}"
            for name in names
            if name.startswith("ours-")
        ]
        lines.append("connections per server ID: " + "; ".join(held))
        for key, label, other in (
            ("dials_per_s", "connections/s in the storm", "storm_others"),
            ("tunnels_per_s", "tunnels/s", "tunnels_others"),
        ):
            each = [
                f"  {name:11s} "
                + " ".join(f"{r.get(key, 0):g} ({r.get(other, 0):g})" for r in runs)
                for name in names
                if len(runs := by_variant[name].get("runs", [])) > 1
            ]
            if each:
                lines += [f"each run's {label} (other work on the machine, of its CPUs):", *each]
    return "\n".join(lines)


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's figures over its repeats: the median of each number, the last run's
    other values (its connections per server ID), ``all_workers_held`` only if every run
    held all workers; the runs themselves under ``runs``."""
    out: dict[str, Any] = {}
    for key, last in runs[-1].items():
        values = [r.get(key) for r in runs]
        numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        if len(numbers) == len(values):
            out[key] = statistics.median(numbers)
        elif key == "all_workers_held":
            out[key] = all(values)
        else:
            out[key] = last
    return out | ({"runs": runs} if len(runs) > 1 else {})
