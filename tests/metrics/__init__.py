"""Tests of konnectivity_fast.metrics: the registry's text format, the server's and agent's
metric sets, and (where a Go toolchain exists) client_golang itself as the oracle."""

from __future__ import annotations

from pathlib import Path

from konnectivity_fast.metrics import (
    Counter,
    CounterVec,
    Gauge,
    GaugeVec,
    Histogram,
    HistogramVec,
    ProcessCollector,
    Registry,
    format_value,
)
from konnectivity_fast.metrics._common import EXTENSION_PREFIX

DATA = Path(__file__).resolve().parent.parent / "data" / "metrics"


def golden(name: str) -> list[tuple[bool, list[str]]]:
    """The rows of a golden metric list: (verified, columns)."""
    rows = []
    for line in (DATA / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        verified = not line.startswith("?")
        rows.append((verified, line.lstrip("?").split("\t")))
    return rows


AnyMetric = Counter | Gauge | Histogram | CounterVec | GaugeVec | HistogramVec


def definitions(registry: Registry) -> dict[str, list[str]]:
    """Our registered families in the golden list's columns (all but "shown")."""
    rows = {}
    for collector in registry.collectors():
        if isinstance(collector, ProcessCollector):
            continue
        # Extension families (ours, not upstream's) are registered by the programs when
        # they start (test_extension_metrics.py checks that they stay out of sight).
        if getattr(collector, "name", "").startswith(EXTENSION_PREFIX):
            continue
        assert isinstance(collector, AnyMetric)
        labels = getattr(collector, "labelnames", ())
        buckets = getattr(collector, "buckets", None)
        rows[collector.name] = [
            collector.name,
            collector.type_name,
            ",".join(labels) or "-",
            ",".join(format_value(b) for b in buckets) if buckets else "-",
            collector.help,
        ]
    return rows


def shown(body: bytes) -> set[str]:
    return {line.split()[2] for line in body.decode().splitlines() if line.startswith("# TYPE")}


def check_against_golden(registry: Registry, file: str, at_start: set[str]) -> None:
    rows = golden(file)
    ours = definitions(registry)
    theirs = {cols[0]: cols for _, cols in rows}
    assert sorted(ours) == sorted(theirs)
    for name, (_, type_name, labels, when, buckets, help_text) in theirs.items():
        assert ours[name] == [name, type_name, labels, buckets, help_text], name
        assert (name in at_start) == (when == "at-start"), name
    assert [cols[0] for _, cols in rows] == sorted(theirs), "golden list not sorted by name"
