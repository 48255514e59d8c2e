"""Figures of the tunnel benchmark: per-run metrics derived from the load generator's raw
result and /proc, medians with min-max, ratios ours/upstream and ours/direct against the
project's targets (``TARGETS``, explained in bench/README.md), and the text table.

Invariants: a run with an error never enters a median (it is counted in ``failed``);
targets are reported, never asserted; every ratio is ours (our server with upstream's
agent, or ours with flow.v1) divided by the other, so that "lower is better" metrics
(latency, memory, CPU) meet their target below 1. Each target is judged on the pairings it
is for (``judged_by``): the project's goals on ours, the "any agent" ones on ours and on
our server with upstream's agent, the ones that need flow.v1 on ours with flow.v1.
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
# Slow readers: name -> (beside it: "echo" or "down", its rate in bytes/s (0: it never
# reads), whether the 8 downloads read at Config.slow_other_rate rather than at full speed).
SLOW: dict[str, tuple[str, float, bool]] = {
    "slow1": ("echo", 1e6, False),
    "slow4": ("echo", 4e6, False),
    "slow1x8": ("down", 1e6, False),
    "slow4x8": ("down", 4e6, False),
    "slow1x8r10": ("down", 1e6, True),
    "slow4x8r10": ("down", 4e6, True),
    "stallx8": ("down", 0.0, False),
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
    "slow1": "echo beside a 1 MB/s reader",
    "slow4": "echo beside a 4 MB/s reader",
    "slow1x8": "8 downloads beside a 1 MB/s reader",
    "slow4x8": "8 downloads beside a 4 MB/s reader",
    "slow1x8r10": "8 downloads at 10 MB/s beside a 1 MB/s reader",
    "slow4x8r10": "8 downloads at 10 MB/s beside a 4 MB/s reader",
    "stallx8": "8 downloads beside a stalled reader",
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
    if "flow_credit_granted_bytes" in r:
        # flow.v1 credit exchanged during the run (ours-flow): 0 would mean not negotiated.
        credit = r["flow_credit_granted_bytes"] + r["flow_credit_received_bytes"]
        out["flow_credit_mib"] = credit / (1 << 20)
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
    elif name in SLOW:
        out.update(_derive_slow(name, r))
    return out


def _derive_slow(name: str, r: dict[str, Any]) -> dict[str, float]:
    """The metrics of one slow-reader run (SLOW)."""
    out = {"slow_mb_s": r["slow_bps"] / 1e6}
    if SLOW[name][0] == "echo":
        for fig in ("echo", "setup"):
            for stat in ("p50", "p99", "max"):
                out[f"alone_{fig}_{stat}_ms"] = r[f"alone_{fig}_{stat}_ms"]
                out[f"{fig}_{stat}_ms"] = r[f"{fig}_{stat}_ms"]
        # "Within 10 ms of its unloaded time": the p99 beside the reader less the p99 alone.
        out["echo_added_ms"] = r["echo_p99_ms"] - r["alone_echo_p99_ms"]
        out["setup_failures"] = r["setup_failures"]
        return out
    # Their throughput alone: what they asked for when they read at a set rate (alone,
    # such downloads may already freeze each other: each is a slow reader for the proxy),
    # else what they got before the slow reader began.
    base = r["nominal_bps"] or r["base_bps"]
    out["base_mb_s"] = r["base_bps"] / 1e6
    out["alone_gap_ms"] = r["alone_gap_ms"]
    out["with_mb_s"] = r["with_bps"] / 1e6
    out["kept_pct"] = 100.0 * r["with_bps"] / base if base else 0.0
    out["worst_1s_pct"] = 100.0 * r["worst_1s_bps"] / base if base else 0.0
    out["longest_gap_ms"] = r["longest_gap_ms"]
    return out


def ok(name: str, r: dict[str, Any]) -> bool:
    if name in ("setup1", "setup16"):
        return bool(r.get("failures", 1) == 0 and r.get("tunnels", 0) > 0)
    return "error" not in r


def brief(name: str, r: dict[str, Any]) -> str:
    """One progress line for a run."""
    if not ok(name, r):
        return f"FAILED {str(r.get('error', r))[:200]}"
    line = _brief(name, r)
    if "flow_credit_granted_bytes" in r:
        line += f"; flow.v1 credit {derive(name, r)['flow_credit_mib']:.0f} MiB"
    return line


def _brief(name: str, r: dict[str, Any]) -> str:
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
    if SLOW.get(name, ("",))[0] == "echo":
        failed = f", {r['setup_failures']} FAILED" if r["setup_failures"] else ""
        return (
            f"echo p50/p99/max alone {m['alone_echo_p50_ms']:.1f}/{m['alone_echo_p99_ms']:.1f}/"
            f"{m['alone_echo_max_ms']:.0f} ms, beside the reader {m['echo_p50_ms']:.1f}/"
            f"{m['echo_p99_ms']:.1f}/{m['echo_max_ms']:.0f} ms ({r['echo_count']} echoes"
            f"{', one TIMED OUT' if r['echo_timed_out'] else ''}); new tunnel p50/max alone "
            f"{m['alone_setup_p50_ms']:.0f}/{m['alone_setup_max_ms']:.0f} ms, beside it "
            f"{m['setup_p50_ms']:.0f}/{m['setup_max_ms']:.0f} ms ({r['setup_count']}{failed});"
            f" reader {m['slow_mb_s']:.2f} MB/s ({pair})"
        )
    if name in SLOW:
        return (
            f"8 downloads alone {m['base_mb_s']:.0f} MB/s (longest gap "
            f"{m['alone_gap_ms']:.0f} ms), beside the reader "
            f"{m['with_mb_s']:.0f} MB/s ({m['kept_pct']:.0f} %, worst second "
            f"{m['worst_1s_pct']:.0f} %), longest gap {m['longest_gap_ms']:.0f} ms; reader "
            f"{m['slow_mb_s']:.2f} MB/s ({pair})"
        )
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
# "up_max" ours/upstream <= value; "abs_min" ours >= value; "abs_max" ours <= value;
# "off_min" ours with flow.v1 / ours without >= value (flow control on vs off, same run).
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
    # From Config.hol_stall (1 s) after the stall began: the target with per-tunnel flow
    # control (flow.v1).
    ("hol", "kept_pct", "%", "abs_min", 90.0),
    ("hol", "new_tunnel_ok", "ok", "abs_min", 1.0),
    ("hol", "new_tunnel_ms", "ms", "", 0.0),
    ("hol", "kept_after_pct", "%", "abs_min", 80.0),
    ("hol", "after_new_tunnel_ok", "ok", "abs_min", 1.0),
    # Flow control on costs at most 5 % of the throughput off (credit packets, windows).
    ("down1", "mb_s", "MB/s", "off_min", 0.95),
    ("up1", "mb_s", "MB/s", "off_min", 0.95),
    ("down8", "mb_s", "MB/s", "off_min", 0.95),
]
# Slow readers (bench/README.md): with any agent no worse than upstream (the echo, a new
# tunnel, the longest gap); with ours/ours and flow.v1 the echo's p99 within 10 ms of its
# p99 alone and the 8 downloads >= 90 % of their throughput alone from the first second.
for _name, (_kind, _rate, _) in SLOW.items():
    if _kind == "echo":
        TARGETS += [
            (_name, "alone_echo_p99_ms", "ms", "", 0.0),
            (_name, "echo_p50_ms", "ms", "", 0.0),
            (_name, "echo_p99_ms", "ms", "up_max", 1.0),
            (_name, "echo_max_ms", "ms", "up_max", 1.0),
            (_name, "echo_added_ms", "ms", "abs_max", 10.0),
            (_name, "alone_setup_max_ms", "ms", "", 0.0),
            (_name, "setup_p50_ms", "ms", "", 0.0),
            (_name, "setup_max_ms", "ms", "up_max", 1.0),
        ]
    else:
        TARGETS += [
            (_name, "base_mb_s", "MB/s", "", 0.0),
            (_name, "alone_gap_ms", "ms", "", 0.0),
            (_name, "kept_pct", "%", "abs_min", 90.0),
            (_name, "worst_1s_pct", "%", "", 0.0),
            (_name, "longest_gap_ms", "ms", "up_max", 1.0),
        ]
# Targets that our server meets with any agent: without flow.v1, judged on ours/ours and on
# our server with upstream's agent.
ANY_AGENT = {(n, m) for n, m, _, kind, _ in TARGETS if n in SLOW and kind == "up_max"}
# Targets that need per-tunnel flow control (flow.v1): judged on ours/ours with it
# ("ours-flow"); ours without it is judged by the "any agent" targets. The echo within
# 10 ms of its time alone, the 8 downloads >= 90 % kept (the endless stall included), the
# endless stall's first seconds.
WITH_FLOW = {
    *((n, "echo_added_ms") for n, (kind, _, _) in SLOW.items() if kind == "echo"),
    *((n, "kept_pct") for n, (kind, _, _) in SLOW.items() if kind == "down"),
    ("hol", "kept_pct"),
}
# The pairings of a row, with the row keys of their medians and of their ratio to upstream.
MIXED = "ours-upstream-agent"
FLOW = "ours-flow"
VALUE_KEYS = {"ours": "ours", MIXED: "ours_upstream_agent", FLOW: "ours_flow"}
RATIO_KEYS = {"ours": "ours_upstream", MIXED: "mixed_upstream", FLOW: "flow_upstream"}
# Throughput must also reach this share of direct loopback TCP.
DIRECT_SHARE = 0.25


def _median(cells: dict[str, dict[str, Any]], name: str, key: str, metric: str) -> float | None:
    stats = cells.get(name, {}).get(key, {}).get("metrics", {}).get(metric)
    return None if stats is None else float(stats["median"])


def judged_by(name: str, metric: str, kind: str) -> tuple[str, ...]:
    """The pairings a target is judged on."""
    if kind == "off_min" or (name, metric) in WITH_FLOW:
        return (FLOW,)
    if (name, metric) in ANY_AGENT:
        return ("ours", MIXED)
    return ("ours",)


def _met(
    kind: str,
    value: float,
    v: float | None,
    r_up: float | None,
    r_direct: float | None,
    *,
    r_off: float | None = None,
) -> tuple[bool | None, str]:
    """Whether one pairing's median ``v`` (ratio ``r_up`` to upstream's, ``r_off`` to ours
    without flow.v1) meets a target."""
    if kind == "off_min":
        return (None if r_off is None else r_off >= value), f">= {value:.0%} of flow.v1 off"
    if kind == "up_min" and r_up is not None:
        target = f">= {value:g}x upstream"
        if r_direct is None:
            return r_up >= value, target
        target += f", >= {DIRECT_SHARE:.0%} direct"
        return r_up >= value and r_direct >= DIRECT_SHARE, target
    if kind == "up_max" and r_up is not None:
        return r_up <= value + 1e-9, f"<= {value:.2g}x upstream"
    if kind == "abs_min":  # the target is said even where its pairing did not run
        return (None if v is None else v >= value), f">= {value:g}"
    if kind == "abs_max":
        return (None if v is None else v <= value), f"<= {value:g}"
    return None, ""


def target_rows(cells: dict[str, dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, metric, unit, kind, value in TARGETS:
        judges = judged_by(name, metric, kind)
        for mode in config["modes"]:
            up = _median(cells, name, f"upstream/{mode}", metric)
            direct = _median(cells, name, "direct", metric)
            values = {i: _median(cells, name, f"{i}/{mode}", metric) for i in VALUE_KEYS}
            if up is None and all(v is None for v in values.values()):
                continue
            if kind == "off_min" and (values[FLOW] is None or values["ours"] is None):
                continue  # flow control on vs off needs both in the run
            row: dict[str, Any] = {
                "scenario": name,
                "metric": metric,
                "unit": unit,
                "mode": mode,
                "kind": kind,
                "direct": direct,
                "upstream": up,
            }
            met_by: dict[str, bool] = {}
            target = ""
            ours = values["ours"]
            for impl, v in values.items():
                r_up = v / up if v is not None and up else None
                r_direct = v / direct if v is not None and direct else None
                row[VALUE_KEYS[impl]], row[RATIO_KEYS[impl]] = v, r_up
                if impl == "ours":
                    row["ours_direct"] = r_direct
                if impl == FLOW:
                    row["flow_ours"] = v / ours if v is not None and ours else None
                if impl in judges:
                    met, text = _met(
                        kind,
                        value,
                        v,
                        r_up,
                        r_direct if metric == "mb_s" else None,
                        r_off=row.get("flow_ours"),
                    )
                    target = target or text
                    if met is not None:
                        met_by[impl] = met
            if target and (name, metric) in ANY_AGENT:
                target += ", any agent"
            elif target and judges == (FLOW,) and kind != "off_min":
                target += ", with flow.v1"
            row["target"] = target
            row["met_by"] = met_by
            row["met"] = all(met_by.values()) if met_by else None
            rows.append(row)
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


def _met_text(row: dict[str, Any], not_met: str) -> str:
    met_by = row.get("met_by", {})
    if row["met"] is None:
        return ""
    if row["met"]:
        return "met"
    if len(met_by) > 1 and not all(not m for m in met_by.values()):
        return f"{not_met} ({', '.join(i for i, m in met_by.items() if not m)})"
    return not_met


def _lines(results: dict[str, Any], not_met: str) -> tuple[list[str], list[list[str]]]:
    """The header and the lines of the target table. The direct columns only when a row
    has direct TCP, the upstream columns only when a row has upstream, the mixed and
    flow.v1 pairings' columns only when a row has them."""
    cells = results["cells"]
    rows = results["rows"]
    direct = any(r["direct"] is not None for r in rows)
    up = any(r["upstream"] is not None for r in rows)
    mixed = any(r.get("ours_upstream_agent") is not None for r in rows)
    flow = any(r.get("ours_flow") is not None for r in rows)
    header = ["figure", "mode"] + (["direct"] if direct else []) + (["upstream"] if up else [])
    header += ["ours srv + up agent", "srv+up agent/up"] if mixed and up else []
    header += ["ours srv + up agent"] if mixed and not up else []
    header += ["ours"] + (["ours/up"] if up else []) + (["ours/direct"] if direct else [])
    header += (["ours, flow.v1"] + (["flow/up"] if up else []) + ["flow/ours"]) if flow else []
    header += ["target", ""]
    lines = []
    for row in rows:
        name, metric, mode = row["scenario"], row["metric"], row["mode"]
        figure = f"{TITLES[name]}: {metric} [{row['unit']}]"
        if row.get("kind") == "off_min":
            figure = f"{TITLES[name]}, flow.v1 on vs off: {metric} [{row['unit']}]"
        line = [figure, mode]
        if direct:
            line.append(_fmt(cells, name, "direct", metric) if row["direct"] is not None else "")
        if up:
            line.append(_fmt(cells, name, f"upstream/{mode}", metric))
        if mixed:
            line.append(_fmt(cells, name, f"{MIXED}/{mode}", metric))
            line += [_ratio(row.get("mixed_upstream"))] if up else []
        line.append(_fmt(cells, name, f"ours/{mode}", metric))
        line += [_ratio(row["ours_upstream"])] if up else []
        if direct:
            line.append(_ratio(row["ours_direct"]))
        if flow:
            line.append(_fmt(cells, name, f"{FLOW}/{mode}", metric))
            line += [_ratio(row.get("flow_upstream"))] if up else []
            line.append(_ratio(row.get("flow_ours")))
        lines.append([*line, row["target"], _met_text(row, not_met)])
    return header, lines


def render(results: dict[str, Any]) -> str:
    cells = results["cells"]
    header, lines = _lines(results, "NOT met")
    m = results["machine"]
    c = results["config"]
    head = (
        f"Tunnel benchmark, {m['date']}: {m['nproc']} CPUs ({m['cpu_model']}), Linux "
        f"{m['kernel']}, Python {m['python']}; load average before {' '.join(m['loadavg'])}"
        f", after {' '.join(m.get('loadavg_after', []))}. Median (min-max) of "
        f"{c['runs']} run(s)"
        + (f" over {c['pairs']} pairs of each pairing" if c.get("pairs", 1) > 1 else "")
        + f". Commit {m.get('commit', '?')}"
        + (f" + uncommitted {', '.join(m['dirty'])}" if m.get("dirty") else "")
        + "."
    )
    out = head + "\n\n" + _table(header, lines)
    load = _load_table(cells)
    return out + ("\n\n" + load if load else "")


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
    header, lines = _lines(results, "**not met**")
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
