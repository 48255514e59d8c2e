"""The tunnel benchmark's PNG charts: one panel per figure family, bars per scenario and
frontend mode for ours, upstream and direct TCP (medians, with min-max whiskers), and ours
with flow.v1 where it ran; and for the head-of-line family (slow readers) a second chart,
with the time series of the 8 downloads of one run for each pairing.

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

from bench._tunnel_report import SLOW, TITLES

MIXED = "ours-upstream-agent"
FLOW = "ours-flow"
SERIES = (
    ("ours", "#1f77b4"),
    (FLOW, "#9467bd"),
    (MIXED, "#2ca02c"),
    ("upstream", "#ff7f0e"),
    ("direct", "#7f7f7f"),
)
LABELS = {MIXED: "our server + upstream's agent", FLOW: "ours, flow.v1"}
MODE_SHORT = {"grpc": "gRPC", "http-connect": "CONNECT"}
# (panel title, y label, log scale, [(group label, scenario, metric)], series shown)
PANELS: list[tuple[str, str, bool, list[tuple[str, str, str]], tuple[str, ...]]] = [
    (
        "Throughput (higher is better)",
        "MB/s",
        True,
        [("down 1x", "down1", "mb_s"), ("up 1x", "up1", "mb_s"), ("down 8x", "down8", "mb_s")],
        ("ours", FLOW, "upstream", "direct"),
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
        ("ours", FLOW, "upstream"),
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
        ("ours", FLOW, MIXED, "upstream"),
    ),
]
# The head-of-line family's bar panels, as PANELS.
HOL_PANELS: list[tuple[str, str, bool, list[tuple[str, str, str]], tuple[str, ...]]] = [
    (
        "1 KiB echo beside a slow reader (lower is better)",
        "ms",
        True,
        [
            ("1 MB/s\np99", "slow1", "echo_p99_ms"),
            ("1 MB/s\nmax", "slow1", "echo_max_ms"),
            ("4 MB/s\np99", "slow4", "echo_p99_ms"),
            ("4 MB/s\nmax", "slow4", "echo_max_ms"),
        ],
        ("ours", FLOW, MIXED, "upstream"),
    ),
    (
        "Longest new-tunnel set-up beside a slow reader (lower is better)",
        "ms",
        True,
        [
            ("alone", "slow4", "alone_setup_max_ms"),
            ("1 MB/s", "slow1", "setup_max_ms"),
            ("4 MB/s", "slow4", "setup_max_ms"),
        ],
        ("ours", FLOW, MIXED, "upstream"),
    ),
    (
        "8 downloads beside a slow reader: % of their rate alone, from 1 s",
        "% kept",
        False,
        [
            ("1", "slow1x8", "kept_pct"),
            ("4", "slow4x8", "kept_pct"),
            ("1,\nr10", "slow1x8r10", "kept_pct"),
            ("4,\nr10", "slow4x8r10", "kept_pct"),
            ("0", "stallx8", "kept_pct"),
        ],
        ("ours", FLOW, MIXED, "upstream"),
    ),
    (
        "8 downloads: longest time one got nothing (lower is better)",
        "ms",
        True,
        [
            ("1", "slow1x8", "longest_gap_ms"),
            ("4", "slow4x8", "longest_gap_ms"),
            ("1,\nr10", "slow1x8r10", "longest_gap_ms"),
            ("4,\nr10", "slow4x8r10", "longest_gap_ms"),
            ("0", "stallx8", "longest_gap_ms"),
        ],
        ("ours", FLOW, MIXED, "upstream"),
    ),
]
# The time series shown: the first of these scenarios in the results.
SERIES_SCENARIOS = ("slow4x8r10", "slow1x8r10", "slow4x8", "slow1x8", "stallx8")
CLASSIC = {scenario for panel in PANELS for _, scenario, _ in panel[3]} - {"holsmall", "hol"}


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
    values: bool = False,
) -> None:
    """Bars of ``groups`` x modes for the series ``shown``, left out where no figure is;
    with ``values``, each bar's median written above it."""
    modes = results["config"]["modes"]
    after = results["config"].get("hol_after", 0.0)

    def key(series: str, mode: str) -> str:
        return "direct" if series == "direct" else f"{series}/{mode}"

    # The groups and series with at least one figure in this panel, each with its slot.
    groups = [
        g
        for g in groups
        if any(_stats(results, g[1], key(s, m), g[2]) for s in shown for m in modes)
    ]
    shown = tuple(
        s
        for s in shown
        if any(_stats(results, sc, key(s, m), me) for _, sc, me in groups for m in modes)
    )
    labels = [
        f"{g.format(after=after)}\n{MODE_SHORT.get(m, m)}" for g, _, _ in groups for m in modes
    ]
    if not groups:
        ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
    width = 0.8 / max(len(shown), 1)
    for i, (series, color) in enumerate(s for s in SERIES if s[0] in shown):
        xs: list[float] = []
        ys: list[float] = []
        lo: list[float] = []
        hi: list[float] = []
        for j, (_, scenario, metric) in enumerate(g for g in groups for _ in modes):
            mode = modes[j % len(modes)]
            st = _stats(results, scenario, key(series, mode), metric)
            if not st:
                continue
            xs.append(j + (i - (len(shown) - 1) / 2) * width)
            ys.append(st["median"])
            lo.append(st["median"] - st["min"])
            hi.append(st["max"] - st["median"])
            if values:
                ax.annotate(
                    f"{st['median']:.0f}",
                    (xs[-1], st["max"]),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=6,
                )
            if scenario in ("holsmall", "hol") and metric.startswith("kept"):
                # say whether (and when) a new tunnel could open
                prefix = "after_" if metric == "kept_after_pct" else ""
                k = key(series, mode)
                opened = _stats(results, scenario, k, f"{prefix}new_tunnel_ok").get("min", 0.0)
                ms = _stats(results, scenario, k, f"{prefix}new_tunnel_ms").get("median", 0.0)
                ax.annotate(
                    f"new tunnel {ms:.0f} ms" if opened >= 1 else "new tunnel blocked",
                    (xs[-1], st["max"] + 3),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                )
        if xs:
            label = LABELS.get(series, series)
            ax.bar(xs, ys, width, color=color, label=label, yerr=[lo, hi], capsize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8 if len(labels) <= 8 else 7)
    ax.grid(axis="y", alpha=0.3)


def chart(results: dict[str, Any], path: Path) -> list[Path]:
    """Write the charts of ``results`` (the document bench.tunnel produces): the main one
    to ``path`` when it has a figure of it, the slow readers' to ``path`` when it has no
    such figure, else next to it (``<stem>-slow.png``). The paths written."""
    names = set(results["cells"])
    written = []
    if names & CLASSIC or not names & set(SLOW):
        _chart_main(results, path)
        written.append(path)
    if names & set(SLOW):
        hol = path.with_name(f"{path.stem}-slow{path.suffix}") if written else path
        _chart_hol(results, hol)
        written.append(hol)
    return written


def _title(results: dict[str, Any], what: str) -> str:
    m = results["machine"]
    return (
        f"{what}: {m['date']}, {m['nproc']} CPUs ({m['cpu_model']}), load average "
        f"{' '.join(m['loadavg'])}; median of {results['config']['runs']} run(s), whiskers min-max"
    )


def _bars(ax: Axes, results: dict[str, Any], panel: tuple[Any, ...]) -> None:
    title, ylabel, log, groups, shown = panel
    _panel(ax, results, groups, shown, values=panel in HOL_PANELS)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    elif groups[0][1] == "holsmall":
        ax.set_ylim(0, max(200.0, ax.get_ylim()[1]))  # room for the rotated labels
    if SLOW.get(groups[0][1], ("",))[0] == "down":
        # the downloads' panels: short labels, said here
        ax.set_xlabel("slow reader's MB/s (r10: the 8 read at 10 MB/s each)", fontsize=8)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, framealpha=0.6)


def _chart_main(results: dict[str, Any], path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    for ax, panel in zip(axes.flat, PANELS, strict=True):
        _bars(ax, results, panel)
    fig.suptitle(
        _title(results, "konnectivity-fast vs upstream v0.36.0 vs direct TCP"), fontsize=11
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _chart_hol(results: dict[str, Any], path: Path) -> None:
    """Bars of the slow-reader figures, then one panel per pairing and mode: the 8
    downloads' throughput per 100 ms over one run (the first) of one scenario."""
    modes = results["config"]["modes"]
    cells = results["cells"]
    scenario = next((s for s in SERIES_SCENARIOS if s in cells), None)
    impls = [s for s, _ in SERIES if any(f"{s}/{m}" in cells.get(scenario, {}) for m in modes)]
    rows = 2 + (len(modes) if scenario and impls else 0)
    fig = plt.figure(figsize=(20, 4.5 * rows))
    grid = fig.add_gridspec(rows, 12)
    for i, panel in enumerate(HOL_PANELS):  # two bar panels a row
        _bars(fig.add_subplot(grid[i // 2, 6 * (i % 2) : 6 * (i % 2) + 6]), results, panel)
    if scenario and impls:
        width = 12 // len(impls)
        first = None
        for r, mode in enumerate(modes):
            for i, impl in enumerate(impls):
                ax = fig.add_subplot(grid[r + 2, i * width : (i + 1) * width], sharey=first)
                first = first or ax
                _timeline(ax, cells[scenario].get(f"{impl}/{mode}"))
                ax.set_title(
                    f"{TITLES[scenario]}: {LABELS.get(impl, impl)}, {MODE_SHORT.get(mode, mode)}",
                    fontsize=9,
                )
    fig.suptitle(
        _title(results, "Slow readers: konnectivity-fast vs upstream v0.36.0"), fontsize=11
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _timeline(ax: Axes, cell: dict[str, Any] | None) -> None:
    """Each download's MB/s per 100 ms (thin lines), the slow reader's (dashed), and a
    vertical line where the slow reader began."""
    ax.set_xlabel("s")
    ax.set_ylabel("MB/s (per 100 ms)")
    ax.grid(alpha=0.3)
    run = next((r for r in (cell or {}).get("runs", []) if "series" in r), None)
    if run is None:
        ax.text(0.5, 0.5, "no run", ha="center", va="center", transform=ax.transAxes)
        return
    series = run["series"]
    t = [int(x) / 1e3 for x in series["t_ms"].split()]
    dt = [b - a for a, b in zip([0.0, *t], t, strict=False)]

    def rate(kib: str) -> list[float]:
        return [
            int(k) * 1024 / 1e6 / d if d > 0 else 0.0 for k, d in zip(kib.split(), dt, strict=True)
        ]

    for i, kib in enumerate(series["kib"]):
        ax.plot(t, rate(kib), linewidth=0.8, label="8 downloads" if i == 0 else None)
    ax.plot(t, rate(series["slow_kib"]), "k--", linewidth=1.0, label="slow reader")
    ax.axvline(run["slow_start_ms"] / 1e3, color="k", linewidth=0.8)
    ax.legend(fontsize=7, loc="upper right")
