"""The tunnel benchmark's PNG chart: one panel per figure family, bars per scenario and
frontend mode for ours, upstream and direct TCP (medians, with min-max whiskers).

Invariant: it only reads the results document (``bench.tunnel`` writes it); a figure
missing from it is left out of its panel, never invented. matplotlib is imported here
only, so that the benchmark runs without it when no chart is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: render to a file only
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

SERIES = (("ours", "#1f77b4"), ("upstream", "#ff7f0e"), ("direct", "#7f7f7f"))
MODE_SHORT = {"grpc": "gRPC", "http-connect": "CONNECT"}
# (panel title, y label, log scale, [(group label, scenario, metric)], series shown)
PANELS: list[tuple[str, str, bool, list[tuple[str, str, str]], tuple[str, ...]]] = [
    (
        "Throughput (higher is better)",
        "MB/s",
        True,
        [("down 1x", "down1", "mb_s"), ("up 1x", "up1", "mb_s"), ("down 8x", "down8", "mb_s")],
        ("ours", "upstream", "direct"),
    ),
    (
        "Server + agent CPU per GiB (lower is better)",
        "CPU-s/GiB",
        False,
        [
            ("down 1x", "down1", "cpu_s_per_gib"),
            ("up 1x", "up1", "cpu_s_per_gib"),
            ("down 8x", "down8", "cpu_s_per_gib"),
        ],
        ("ours", "upstream"),
    ),
    (
        "Tunnel set-up rate (higher is better)",
        "tunnels/s",
        True,
        [("1 worker", "setup1", "tunnels_s"), ("16 workers", "setup16", "tunnels_s")],
        ("ours", "upstream", "direct"),
    ),
    (
        "1 KiB round trip (lower is better)",
        "µs",
        True,
        [("p50", "rtt", "p50_us"), ("p99", "rtt", "p99_us")],
        ("ours", "upstream", "direct"),
    ),
    (
        "RSS per idle tunnel (lower is better)",
        "KiB",
        False,
        [
            ("server", "idle", "server_kib_per_tunnel"),
            ("agent", "idle", "agent_kib_per_tunnel"),
        ],
        ("ours", "upstream"),
    ),
    (
        "Head-of-line: 8 downloads beside a stalled reader",
        "% of throughput kept",
        False,
        [
            ("8 MiB stall", "holsmall", "kept_pct"),
            ("endless stall", "hol", "kept_pct"),
            ("endless stall,\n{after:g} s later", "hol", "kept_after_pct"),
        ],
        ("ours", "upstream"),
    ),
]


def _stats(results: dict[str, Any], scenario: str, key: str, metric: str) -> dict[str, float]:
    found: dict[str, float] = (
        results["cells"].get(scenario, {}).get(key, {}).get("metrics", {}).get(metric, {})
    )
    return found


def _panel(
    ax: Axes,
    results: dict[str, Any],
    groups: list[tuple[str, str, str]],
    shown: tuple[str, ...],
) -> None:
    modes = results["config"]["modes"]
    after = results["config"].get("hol_after", 0.0)
    labels = [
        f"{g.format(after=after)}\n{MODE_SHORT.get(m, m)}" for g, _, _ in groups for m in modes
    ]
    width = 0.8 / len(shown)
    for i, (series, color) in enumerate(s for s in SERIES if s[0] in shown):
        xs: list[float] = []
        ys: list[float] = []
        lo: list[float] = []
        hi: list[float] = []
        for j, (_, scenario, metric) in enumerate(g for g in groups for _ in modes):
            mode = modes[j % len(modes)]
            key = "direct" if series == "direct" else f"{series}/{mode}"
            st = _stats(results, scenario, key, metric)
            if not st:
                continue
            xs.append(j + (i - (len(shown) - 1) / 2) * width)
            ys.append(st["median"])
            lo.append(st["median"] - st["min"])
            hi.append(st["max"] - st["median"])
            if metric.startswith("kept"):  # say whether (and when) a new tunnel could open
                prefix = "after_" if metric == "kept_after_pct" else ""
                opened = _stats(results, scenario, key, f"{prefix}new_tunnel_ok").get("min", 0.0)
                ms = _stats(results, scenario, key, f"{prefix}new_tunnel_ms").get("median", 0.0)
                ax.annotate(
                    f"new tunnel {ms:.0f} ms" if opened >= 1 else "new tunnel blocked",
                    (xs[-1], st["max"] + 3),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                )
        if xs:
            ax.bar(xs, ys, width, color=color, label=series, yerr=[lo, hi], capsize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def chart(results: dict[str, Any], path: Path) -> None:
    """Write the chart of ``results`` (the document bench.tunnel produces) to ``path``."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, (title, ylabel, log, groups, shown) in zip(axes.flat, PANELS, strict=True):
        _panel(ax, results, groups, shown)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        elif groups[0][2] == "kept_pct":
            ax.set_ylim(0, max(200.0, ax.get_ylim()[1]))  # room for the rotated labels
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"konnectivity-fast vs upstream v0.36.0 vs direct TCP: {m['date']}, {m['nproc']} CPUs"
        f" ({m['cpu_model']}), load average {' '.join(m['loadavg'])}; median of "
        f"{results['config']['runs']} run(s), whiskers min-max",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
