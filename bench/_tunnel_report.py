"""Figures of the tunnel benchmark: per-run metrics derived from the load generator's raw
result and /proc, medians with min-max, ratios ours/upstream and ours/direct against the
issue's targets, and the text table.

Invariants: a run with an error never enters a median (it is counted in ``failed``);
targets are reported, never asserted; every ratio is ours divided by the other, so that
"lower is better" metrics (latency, memory, CPU) meet their target below 1.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

GIB = float(1 << 30)
# name -> (tunnels, bytes per tunnel, direction) from the Config.
BULK: dict[str, Callable[[Any], tuple[int, int, str]]] = {
    "down1": lambda c: (1, c.single_bytes, "down"),
    "up1": lambda c: (1, c.single_bytes, "up"),
    "down8": lambda c: (c.multi_conns, c.multi_bytes, "down"),
}
TITLES = {
    "down1": "download, 1 tunnel",
    "up1": "upload, 1 tunnel",
    "down8": "download, 8 tunnels",
    "setup1": "set-up, 1 worker",
    "setup16": "set-up, 16 workers",
    "rtt": "1 KiB round trip",
    "idle": "idle tunnels",
    "holsmall": "head-of-line, 8 MiB stall",
    "hol": "head-of-line, endless stall",
}


def _pct(cpu_s: float, wall_s: float) -> float:
    return 100.0 * cpu_s / wall_s if wall_s > 0 else 0.0


def derive(name: str, r: dict[str, Any]) -> dict[str, float]:
    """The metrics of one successful run."""
    out: dict[str, float] = {}
    wall = float(r.get("wall_s", 0.0))
    for proc in ("server", "agent", "loadgen", "backend"):
        if f"{proc}_cpu_s" in r:
            out[f"{proc}_cpu_pct"] = _pct(r[f"{proc}_cpu_s"], wall)
    if r.get("server_cpu_s", 0) + r.get("agent_cpu_s", 0) > 0:
        out["pair_sys_pct"] = _pct(
            r["server_sys_s"] + r["agent_sys_s"], r["server_cpu_s"] + r["agent_cpu_s"]
        )
    if "other_cpu_pct" in r:
        out["other_cpu_pct"] = r["other_cpu_pct"]
    pair_cpu = r.get("server_cpu_s", 0.0) + r.get("agent_cpu_s", 0.0)
    if name in BULK:
        out["mb_s"] = r["bytes"] / r["seconds"] / 1e6
        if "server_cpu_s" in r:
            out["cpu_s_per_gib"] = pair_cpu / (r["bytes"] / GIB)
    elif name in ("setup1", "setup16"):
        out["tunnels_s"] = r["tunnels"] / r["seconds"]
        out["p50_ms"] = r["p50_ms"]
        out["p99_ms"] = r["p99_ms"]
        if "server_cpu_s" in r and r["tunnels"]:
            out["cpu_ms_per_tunnel"] = 1e3 * pair_cpu / r["tunnels"]
    elif name == "rtt":
        out["p50_us"] = 1e3 * r["p50_ms"]
        out["p99_us"] = 1e3 * r["p99_ms"]
        if "server_cpu_s" in r:
            out["cpu_us_per_rt"] = 1e6 * pair_cpu / r["count"]
    elif name == "idle":
        before, after, n = r["rss_before_kib"], r["rss_after_kib"], r["tunnels"]
        for proc in ("server", "agent"):
            out[f"{proc}_idle_mib"] = before[proc] / 1024
            out[f"{proc}_loaded_mib"] = after[proc] / 1024
            out[f"{proc}_kib_per_tunnel"] = (after[proc] - before[proc]) / n
        out["kib_per_tunnel"] = out["server_kib_per_tunnel"] + out["agent_kib_per_tunnel"]
    elif name in ("hol", "holsmall"):
        out["base_mb_s"] = r["base_bps"] / 1e6
        out["stalled_mb_s"] = r["stalled_bps"] / 1e6
        out["kept_pct"] = 100.0 * r["stalled_bps"] / r["base_bps"] if r["base_bps"] else 0.0
        out["new_tunnel_ok"] = 1.0 if r["new_tunnel_ok"] else 0.0
        out["new_tunnel_ms"] = r["new_tunnel_ms"]
        if "after_bps" in r:  # measured again once the proxy could have given up on it
            out["after_mb_s"] = r["after_bps"] / 1e6
            out["kept_after_pct"] = 100.0 * r["after_bps"] / r["base_bps"] if r["base_bps"] else 0.0
            out["after_new_tunnel_ok"] = 1.0 if r["after_new_tunnel_ok"] else 0.0
            out["after_new_tunnel_ms"] = r["after_new_tunnel_ms"]
    return out


def ok(name: str, r: dict[str, Any]) -> bool:
    if name in ("setup1", "setup16"):
        return bool(r.get("failures", 1) == 0 and r.get("tunnels", 0) > 0)
    return "error" not in r


def brief(name: str, r: dict[str, Any]) -> str:
    """One progress line for a run."""
    if not ok(name, r):
        return f"FAILED {str(r.get('error', r))[:200]}"
    m = derive(name, r)
    load = f"load {m.get('loadgen_cpu_pct', 0):.0f} % backend {m.get('backend_cpu_pct', 0):.0f} %"
    pair = f"server {m.get('server_cpu_pct', 0):.0f} % agent {m.get('agent_cpu_pct', 0):.0f} %"
    other = f"others {m.get('other_cpu_pct', 0):.0f} %"
    if name in BULK:
        cpu = f", {m['cpu_s_per_gib']:.2f} CPU-s/GiB" if "cpu_s_per_gib" in m else ""
        return f"{m['mb_s']:8.0f} MB/s{cpu} ({pair}, {load}, {other})"
    if name in ("setup1", "setup16"):
        return (
            f"{m['tunnels_s']:7.0f} tunnels/s p50 {m['p50_ms']:.2f} ms p99 {m['p99_ms']:.2f} ms"
            f" ({pair}, {load}, {other})"
        )
    if name == "rtt":
        return f"p50 {m['p50_us']:.0f} µs p99 {m['p99_us']:.0f} µs ({pair}, {load}, {other})"
    if name == "idle":
        return (
            f"{m['server_idle_mib']:.1f}/{m['agent_idle_mib']:.1f} MiB idle, +{r['tunnels']} "
            f"tunnels: server {m['server_kib_per_tunnel']:.1f} + agent "
            f"{m['agent_kib_per_tunnel']:.1f} KiB/tunnel"
        )
    line = (
        f"8 downloads {m['base_mb_s']:.0f} MB/s, with a stalled reader {m['stalled_mb_s']:.0f}"
        f" MB/s ({m['kept_pct']:.0f} %), new tunnel {'ok' if m['new_tunnel_ok'] else 'FAILED'}"
        f" in {r['new_tunnel_ms']:.0f} ms"
    )
    if "after_mb_s" in m:
        line += (
            f"; {r['after_s']:g} s after the stall {m['after_mb_s']:.0f} MB/s"
            f" ({m['kept_after_pct']:.0f} %), new tunnel"
            f" {'ok' if m['after_new_tunnel_ok'] else 'FAILED'}"
        )
    return line


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(
    config: dict[str, Any],
    machine: dict[str, Any],
    runs: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, Any]:
    """The JSON document: config, machine, raw runs, medians and the target rows."""
    cells: dict[str, dict[str, Any]] = {}
    for name, by_target in runs.items():
        for key, results in by_target.items():
            good = [derive(name, r) for r in results if ok(name, r)]
            metrics = sorted({m for g in good for m in g})
            cells.setdefault(name, {})[key] = {
                "runs": results,
                "failed": len(results) - len(good),
                "metrics": {m: _stats([g[m] for g in good if m in g]) for m in metrics},
            }
    rows = target_rows(cells, config)
    return {
        "machine": machine,
        "config": config,
        "cells": cells,
        "rows": rows,
        "ok": all(c["failed"] == 0 for t in cells.values() for c in t.values()),
    }


# (scenario, metric, unit, target kind, target value): "up_min" ours/upstream >= value;
# "up_max" ours/upstream <= value; "abs_min" ours >= value.
TARGETS: list[tuple[str, str, str, str, float]] = [
    ("down1", "mb_s", "MB/s", "up_min", 3.0),
    ("up1", "mb_s", "MB/s", "up_min", 3.0),
    ("down8", "mb_s", "MB/s", "up_min", 3.0),
    ("down1", "cpu_s_per_gib", "CPU-s/GiB", "up_max", 1 / 3),
    ("up1", "cpu_s_per_gib", "CPU-s/GiB", "up_max", 1 / 3),
    ("down8", "cpu_s_per_gib", "CPU-s/GiB", "up_max", 1 / 3),
    ("setup1", "tunnels_s", "tunnels/s", "up_min", 1.5),
    ("setup1", "p50_ms", "ms", "", 0.0),
    ("setup1", "p99_ms", "ms", "", 0.0),
    ("setup16", "tunnels_s", "tunnels/s", "up_min", 1.5),
    ("setup16", "p50_ms", "ms", "", 0.0),
    ("setup16", "p99_ms", "ms", "", 0.0),
    ("rtt", "p50_us", "µs", "", 0.0),
    ("rtt", "p99_us", "µs", "up_max", 1.0),
    ("idle", "server_idle_mib", "MiB", "", 0.0),
    ("idle", "agent_idle_mib", "MiB", "", 0.0),
    ("idle", "server_kib_per_tunnel", "KiB", "", 0.0),
    ("idle", "agent_kib_per_tunnel", "KiB", "", 0.0),
    ("idle", "kib_per_tunnel", "KiB", "up_max", 0.5),
    ("holsmall", "base_mb_s", "MB/s", "", 0.0),
    ("holsmall", "kept_pct", "%", "abs_min", 80.0),
    ("holsmall", "new_tunnel_ok", "ok", "abs_min", 1.0),
    ("hol", "base_mb_s", "MB/s", "", 0.0),
    ("hol", "kept_pct", "%", "abs_min", 80.0),
    ("hol", "new_tunnel_ok", "ok", "abs_min", 1.0),
    ("hol", "new_tunnel_ms", "ms", "", 0.0),
    ("hol", "kept_after_pct", "%", "abs_min", 80.0),
    ("hol", "after_new_tunnel_ok", "ok", "abs_min", 1.0),
]
# Throughput must also reach this share of direct loopback TCP.
DIRECT_SHARE = 0.25


def _median(cells: dict[str, dict[str, Any]], name: str, key: str, metric: str) -> float | None:
    stats = cells.get(name, {}).get(key, {}).get("metrics", {}).get(metric)
    return None if stats is None else float(stats["median"])


def target_rows(cells: dict[str, dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, metric, unit, kind, value in TARGETS:
        for mode in config["modes"]:
            ours = _median(cells, name, f"ours/{mode}", metric)
            up = _median(cells, name, f"upstream/{mode}", metric)
            direct = _median(cells, name, "direct", metric)
            if ours is None and up is None:
                continue
            r_up = ours / up if ours is not None and up else None
            r_direct = ours / direct if ours is not None and direct else None
            met: bool | None = None
            target = ""
            if kind == "up_min" and r_up is not None:
                met, target = r_up >= value, f">= {value:g}x upstream"
                if metric == "mb_s" and r_direct is not None:
                    met = met and r_direct >= DIRECT_SHARE
                    target += f", >= {DIRECT_SHARE:.0%} direct"
            elif kind == "up_max" and r_up is not None:
                met, target = r_up <= value + 1e-9, f"<= {value:.2g}x upstream"
            elif kind == "abs_min" and ours is not None:
                met, target = ours >= value, f">= {value:g}"
            rows.append(
                {
                    "scenario": name,
                    "metric": metric,
                    "unit": unit,
                    "mode": mode,
                    "direct": direct,
                    "upstream": up,
                    "ours": ours,
                    "ours_upstream": r_up,
                    "ours_direct": r_direct,
                    "target": target,
                    "met": met,
                }
            )
    return rows


def _fmt(cells: dict[str, dict[str, Any]], name: str, key: str, metric: str) -> str:
    stats = cells.get(name, {}).get(key, {}).get("metrics", {}).get(metric)
    if stats is None:
        failed = cells.get(name, {}).get(key, {}).get("failed")
        return "FAILED" if failed else "-"
    if metric.endswith("new_tunnel_ok"):
        n = len(cells[name][key]["runs"])
        yes = (
            round(stats["median"] * n)
            if n == 1
            else sum(1 for r in cells[name][key]["runs"] if r.get(metric))
        )
        return f"{yes}/{n} yes"
    m, lo, hi = stats["median"], stats["min"], stats["max"]
    digits = 0 if max(abs(m), abs(hi)) >= 100 else (1 if abs(m) >= 10 else 2)
    if lo == hi:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    ]
    return "\n".join(out)


def render(results: dict[str, Any]) -> str:
    cells = results["cells"]
    lines = []
    for row in results["rows"]:
        name, metric, mode = row["scenario"], row["metric"], row["mode"]
        met = "" if row["met"] is None else ("met" if row["met"] else "NOT met")
        lines.append(
            [
                f"{TITLES[name]}: {metric} [{row['unit']}]",
                mode,
                _fmt(cells, name, "direct", metric) if row["direct"] is not None else "",
                _fmt(cells, name, f"upstream/{mode}", metric),
                _fmt(cells, name, f"ours/{mode}", metric),
                _ratio(row["ours_upstream"]),
                _ratio(row["ours_direct"]),
                row["target"],
                met,
            ]
        )
    header = [
        "figure",
        "mode",
        "direct",
        "upstream",
        "ours",
        "ours/up",
        "ours/direct",
        "target",
        "",
    ]
    m = results["machine"]
    c = results["config"]
    head = (
        f"Tunnel benchmark, {m['date']}: {m['nproc']} CPUs ({m['cpu_model']}), Linux "
        f"{m['kernel']}, Python {m['python']}; load average before {' '.join(m['loadavg'])}"
        f", after {' '.join(m.get('loadavg_after', []))}. Median (min-max) of "
        f"{c['runs']} run(s). Commit {m.get('commit', '?')}"
        + (f" + uncommitted {', '.join(m['dirty'])}" if m.get("dirty") else "")
        + "."
    )
    return head + "\n\n" + _table(header, lines) + "\n\n" + _load_table(cells)


def _load_table(cells: dict[str, dict[str, Any]]) -> str:
    """CPU of every process during the bulk transfers (% of one core): the load
    generator and backend must not be the bottleneck."""
    lines = []
    for name in ("down1", "up1", "down8"):
        for key, cell in cells.get(name, {}).items():
            mets = cell["metrics"]
            lines.append(
                [
                    TITLES[name],
                    key,
                    *(
                        f"{mets[p]['median']:.0f}" if p in mets else "-"
                        for p in (
                            "server_cpu_pct",
                            "agent_cpu_pct",
                            "loadgen_cpu_pct",
                            "backend_cpu_pct",
                            "other_cpu_pct",
                            "pair_sys_pct",
                        )
                    ),
                ]
            )
    if not lines:
        return ""
    header = [
        "bulk transfer",
        "target",
        "server %",
        "agent %",
        "loadgen %",
        "backend %",
        "others %",
        "kernel % of server+agent",
    ]
    return "CPU during the transfers (% of one core, medians)\n" + _table(header, lines)


def markdown(results: dict[str, Any]) -> str:
    """The target rows as a Markdown table (for bench/README.md)."""
    cells = results["cells"]
    out = [
        "| figure | mode | direct | upstream | ours | ours/up | ours/direct | target | |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        name, metric, mode = row["scenario"], row["metric"], row["mode"]
        met = "" if row["met"] is None else ("met" if row["met"] else "**not met**")
        direct = _fmt(cells, name, "direct", metric) if row["direct"] is not None else ""
        out.append(
            f"| {TITLES[name]}: {metric} [{row['unit']}] | {mode} | {direct} | "
            f"{_fmt(cells, name, f'upstream/{mode}', metric)} | "
            f"{_fmt(cells, name, f'ours/{mode}', metric)} | {_ratio(row['ours_upstream'])} | "
            f"{_ratio(row['ours_direct'])} | {row['target']} | {met} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
