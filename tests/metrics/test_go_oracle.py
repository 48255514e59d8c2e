"""client_golang as the oracle: the same scenario (metrics, label values, updates) runs
through a tiny Go program built against github.com/prometheus/client_golang (v1.24.1, the
version upstream v0.36.0 builds with; tests/metrics/go_oracle) and through our registry, and
the two expositions must be equal byte for byte.

The Go program is built once into .cache/go-metrics/ (modules and build cache there too) and
rebuilt only when its sources change. Skipped only where there is no Go toolchain.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from konnectivity_fast.metrics import (
    Counter,
    CounterChild,
    CounterVec,
    Gauge,
    GaugeChild,
    GaugeVec,
    Histogram,
    HistogramChild,
    HistogramVec,
    ProcessCollector,
    Registry,
    negotiate_content_type,
)

ROOT = Path(__file__).resolve().parents[2]
SOURCE = Path(__file__).resolve().parent / "go_oracle"
CACHE = ROOT / ".cache" / "go-metrics"
BINARY = CACHE / "go_oracle"
GO = shutil.which("go")

pytestmark = [
    pytest.mark.skipif(GO is None, reason="no Go toolchain (go) on PATH"),
    # The first build downloads client_golang through the Go module proxy and compiles it.
    pytest.mark.timeout(900),
]

Scenario = dict[str, Any]


@pytest.fixture(scope="module")
def oracle() -> Path:
    assert GO is not None
    sources = [SOURCE / name for name in ("main.go", "go.mod", "go.sum")]
    newest = max(path.stat().st_mtime for path in sources)
    if not BINARY.exists() or BINARY.stat().st_mtime < newest:
        CACHE.mkdir(parents=True, exist_ok=True)
        env = dict(
            os.environ,
            GOMODCACHE=str(CACHE / "mod"),
            GOCACHE=str(CACHE / "build"),
            GOFLAGS="-mod=readonly -buildvcs=false -modcacherw",
        )
        partial = BINARY.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(
            [GO, "build", "-o", str(partial), "."],
            cwd=SOURCE,
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
            check=False,
        )
        assert done.returncode == 0, f"go build failed:\n{done.stderr}"
        partial.replace(BINARY)
    return BINARY


def run_go(binary: Path, scenario: Scenario) -> str:
    done = subprocess.run(
        [str(binary)],
        input=json.dumps(scenario),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_ours(scenario: Scenario) -> str:
    registry = Registry()
    metrics: list[Any] = []
    for spec in scenario["metrics"]:
        name, help_text, labels = spec["name"], spec["help"], spec.get("labels") or ()
        buckets = [float(b) for b in spec["buckets"]] if spec.get("buckets") else None
        kind = (spec["type"], spec["vec"])
        if kind == ("counter", False):
            metrics.append(Counter(name, help_text, registry=registry))
        elif kind == ("counter", True):
            metrics.append(CounterVec(name, help_text, labels, registry=registry))
        elif kind == ("gauge", False):
            metrics.append(Gauge(name, help_text, registry=registry))
        elif kind == ("gauge", True):
            metrics.append(GaugeVec(name, help_text, labels, registry=registry))
        elif kind == ("histogram", False):
            metrics.append(Histogram(name, help_text, buckets=buckets, registry=registry))
        else:
            metrics.append(
                HistogramVec(name, help_text, labels, buckets=buckets, registry=registry)
            )
    for op in scenario["ops"]:
        metric = metrics[op["m"]]
        target = metric.labels(*op["l"]) if scenario["metrics"][op["m"]]["vec"] else metric
        apply(target, op["op"], float(op["v"]) if "v" in op else 0.0)
    return registry.expose_text()


def apply(target: CounterChild | GaugeChild | HistogramChild, op: str, value: float) -> None:
    if op == "touch":
        return
    if isinstance(target, HistogramChild):
        target.observe(value)
    elif op == "inc":
        target.inc()
    elif op == "add":
        target.add(value)
    elif isinstance(target, GaugeChild):
        if op == "dec":
            target.dec()
        elif op == "sub":
            target.sub(value)
        else:
            target.set(value)


# --- scenario generation ----------------------------------------------------------------------

LABEL_NAMES = ["a", "zeta", "code", "segment", "packet_type", "b2", "_u", "Z", "service_method"]
LABEL_VALUES = [
    "",
    "x",
    "DIAL_REQ",
    "a\\b",
    'say "hi"',
    "new\nline",
    "é",
    "☃ snow",
    "Z",
    "z",
    "0",
    "10",
    "9",
    "from_agent",
    "to_agent",
    "\\",
    '"',
    "\n",
    "a,b=c}",
]
HELPS = [
    "Plain help.",
    "back\\slash",
    "new\nline",
    'quote " stays',
    "é ☃ unicode",
    "",
    "trailing space ",
    "\\n literal",
]
SPECIAL = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e6,
    999999.0,
    1e-5,
    0.0001,
    1e-4 * 0.99,
    12.5,
    86400.0,
    1e21,
    1e20,
    123456.7,
    1234567.0,
    0.1 + 0.2,
    2.0**53,
    2.0**64,
    5e-324,
    1.7976931348623157e308,
    2.2250738585072014e-308,
    1 / 3,
]


def random_float(rng: random.Random) -> float:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(SPECIAL) * rng.choice((1, -1))
    if kind == 1:
        return rng.random() * 10.0 ** rng.randint(-12, 25) * rng.choice((1, -1))
    if kind == 2:
        return float(rng.randint(-(10 ** rng.randint(0, 16)), 10 ** rng.randint(0, 16)))
    if kind == 3:
        return round(rng.uniform(-1000, 1000), rng.randint(0, 6))
    if kind == 4:
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        return value if math.isfinite(value) else 1.5
    return rng.random()


def random_scenario(rng: random.Random) -> Scenario:
    metrics: list[dict[str, Any]] = []
    ops: list[dict[str, Any]] = []
    for i in range(rng.randint(1, 8)):
        kind = rng.choice(("counter", "gauge", "histogram"))
        vec = rng.random() < 0.7
        labels = rng.sample(LABEL_NAMES, rng.randint(0, 3)) if vec else []
        spec: dict[str, Any] = {
            "type": kind,
            "vec": vec,
            "labels": labels,
            "name": f"{rng.choice(['m', 'a_', 'Z', 'z_total_'])}{i}_{rng.randint(0, 99)}",
            "help": rng.choice(HELPS),
        }
        if kind == "histogram" and rng.random() < 0.8:
            bounds = sorted({abs(random_float(rng)) for _ in range(rng.randint(1, 12))})
            spec["buckets"] = [repr(b) for b in bounds]
        metrics.append(spec)
        if vec and rng.random() < 0.2:
            continue  # a vector never used: it must not show at all
        for _ in range(rng.randint(0, 25)):
            values = [rng.choice(LABEL_VALUES) for _ in labels]
            ops.append(random_op(rng, i, kind, values, spec.get("buckets")))
    return {"metrics": metrics, "ops": ops, "process": False}


def random_op(
    rng: random.Random, index: int, kind: str, labels: list[str], buckets: list[str] | None
) -> dict[str, Any]:
    op: dict[str, Any] = {"m": index, "l": labels}
    value = random_float(rng)
    if kind == "counter":
        op["op"] = rng.choice(("inc", "add", "add", "touch"))
        # integral increments stay small: Go's uint64 part wraps, Python's int does not
        value = abs(value) if not value.is_integer() else float(rng.randint(0, 2**40))
    elif kind == "gauge":
        op["op"] = rng.choice(("inc", "dec", "add", "sub", "set", "set", "touch"))
    else:
        op["op"] = "observe" if rng.random() < 0.95 else "touch"
        if buckets and rng.random() < 0.3:
            value = float(rng.choice(buckets))  # exactly on a bound: le is inclusive
        elif rng.random() < 0.05:
            value = rng.choice((math.nan, math.inf, -math.inf))
    op["v"] = repr(value)
    return op


# --- tests ------------------------------------------------------------------------------------


def test_each_type_and_escaping(oracle: Path) -> None:
    scenario: Scenario = {
        "process": False,
        "metrics": [
            {
                "type": "counter",
                "vec": True,
                "name": "dial_failure_count",
                "help": 'Counts \\ and\nnewlines, "quotes".',
                "labels": ["reason", "code"],
            },
            {"type": "gauge", "vec": False, "name": "http_connections", "help": "G."},
            {"type": "gauge", "vec": True, "name": "pending", "help": "G.", "labels": []},
            {
                "type": "histogram",
                "vec": True,
                "name": "lat_seconds",
                "help": "H.",
                "labels": ["http_status_code"],
                "buckets": [
                    "1e-06",
                    "1e-05",
                    "0.0001",
                    "0.005",
                    "0.025",
                    "0.1",
                    "0.5",
                    "2.5",
                    "12.5",
                ],
            },
            {"type": "histogram", "vec": False, "name": "default_seconds", "help": "H."},
            {"type": "counter", "vec": True, "name": "unused_total", "help": "C.", "labels": ["a"]},
        ],
        "ops": [
            {"m": 0, "l": ["no_agent", 'x"\\\ny'], "op": "inc"},
            {"m": 0, "l": ["backend_close", "1"], "op": "add", "v": "1000000"},
            {"m": 0, "l": ["backend_close", "0"], "op": "add", "v": "0.1"},
            {"m": 1, "l": [], "op": "set", "v": "-3"},
            {"m": 2, "l": [], "op": "touch"},
            {"m": 3, "l": ["404"], "op": "observe", "v": "0.0000005"},
            {"m": 3, "l": ["200"], "op": "observe", "v": "0.005"},
            {"m": 3, "l": ["200"], "op": "observe", "v": "20"},
            {"m": 4, "l": [], "op": "observe", "v": "0.3"},
        ],
    }
    assert run_ours(scenario) == run_go(oracle, scenario)


@pytest.mark.parametrize("seed", range(25))
def test_random_scenarios(oracle: Path, seed: int) -> None:
    scenario = random_scenario(random.Random(seed))
    assert run_ours(scenario) == run_go(oracle, scenario)


def test_number_formatting(oracle: Path) -> None:
    rng = random.Random(7)
    values = [v * s for v in SPECIAL for s in (1, -1)]
    values += [random_float(rng) for _ in range(3000)]
    values += [math.nan, math.inf, -math.inf]
    values += [10.0**e for e in range(-30, 30)] + [1.5 * 10.0**e for e in range(-30, 30)]
    scenario: Scenario = {
        "process": False,
        "metrics": [{"type": "gauge", "vec": True, "name": "g", "help": "x", "labels": ["i"]}],
        "ops": [
            {"m": 0, "l": [f"{i:05d}"], "op": "set", "v": repr(v)} for i, v in enumerate(values)
        ],
    }
    ours, theirs = run_ours(scenario).splitlines(), run_go(oracle, scenario).splitlines()
    assert len(ours) == len(theirs)
    mismatches = [(a, b) for a, b in zip(ours, theirs, strict=True) if a != b]
    assert mismatches == []


@pytest.mark.skipif(not ProcessCollector().collect(), reason="no /proc here")
def test_process_metrics_names_types_and_help(oracle: Path) -> None:
    go = run_go(oracle, {"process": True, "metrics": [], "ops": []})
    registry = Registry()
    registry.register(ProcessCollector())
    ours = registry.expose_text()

    def headers(body: str) -> list[str]:
        return [line for line in body.splitlines() if line.startswith("#")]

    assert headers(ours) == headers(go)

    # values from another process: only those that are the same for both can be compared
    def value(body: str, name: str) -> str:
        return next(line for line in body.splitlines() if line.startswith(name + " "))

    for name in ("process_max_fds", "process_virtual_memory_max_bytes"):
        assert value(ours, name) == value(go, name)


@pytest.mark.parametrize(
    "accept",
    [
        "",
        "text/plain",
        "*/*",
        "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
        "application/openmetrics-text;version=0.0.1;q=0.4,"
        "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
        "text/plain;version=0.0.4;escaping=dots",
        "text/plain;version=0.0.4;escaping=values",
        "text/plain;escaping=bogus",
        "text/plain;version=1.0.0;escaping=allow-utf-8",
        "text/html, text/plain;q=0.9;escaping=dots",
    ],
)
def test_content_type(oracle: Path, accept: str) -> None:
    done = subprocess.run(
        [str(oracle), "-content-type", accept],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert negotiate_content_type(accept) == done.stdout.strip()
