"""The registry writes client_golang's text format: exact bytes for each type, escaping,
ordering, number formatting and cumulative buckets. (test_go_oracle.py checks the same
against client_golang itself when Go is installed.)"""

from __future__ import annotations

import math

import pytest

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
    negotiate_content_type,
)


def text(registry: Registry) -> str:
    return registry.expose().decode()


# --- numbers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "0"),
        (-0.0, "0"),
        (1.0, "1"),
        (-1.0, "-1"),
        (3, "3"),
        (3.0, "3"),
        (0.5, "0.5"),
        (0.005, "0.005"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (0.000001, "1e-06"),
        (1.5e-7, "1.5e-07"),
        (12.5, "12.5"),
        (86400, "86400"),
        (999999, "999999"),
        (1e6, "1e+06"),
        (1234567, "1.234567e+06"),
        (123456.7, "123456.7"),
        (-1234567.5, "-1.2345675e+06"),
        (1e21, "1e+21"),
        (2.0**64, "1.8446744073709552e+19"),
        (0.1 + 0.2, "0.30000000000000004"),
        (1 / 3, "0.3333333333333333"),
        (5e-324, "5e-324"),
        (1.7976931348623157e308, "1.7976931348623157e+308"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
        (100.0, "100"),
        (0.01, "0.01"),
        (1.25e5, "125000"),
        (-0.0003, "-0.0003"),
    ],
)
def test_format_value(value: float, expected: str) -> None:
    assert format_value(value) == expected


# --- each type --------------------------------------------------------------------------------


def test_plain_metrics_show_at_zero() -> None:
    reg = Registry()
    Counter("c_total", "A counter.", registry=reg)
    Gauge("g", "A gauge.", registry=reg)
    Histogram("h_seconds", "A histogram.", buckets=(0.1, 1), registry=reg)
    assert text(reg) == (
        "# HELP c_total A counter.\n# TYPE c_total counter\nc_total 0\n"
        "# HELP g A gauge.\n# TYPE g gauge\ng 0\n"
        "# HELP h_seconds A histogram.\n# TYPE h_seconds histogram\n"
        'h_seconds_bucket{le="0.1"} 0\nh_seconds_bucket{le="1"} 0\n'
        'h_seconds_bucket{le="+Inf"} 0\nh_seconds_sum 0\nh_seconds_count 0\n'
    )


def test_vectors_show_nothing_until_first_child() -> None:
    reg = Registry()
    c = CounterVec("c", "C.", ("a",), registry=reg)
    g = GaugeVec("g", "G.", registry=reg)
    h = HistogramVec("h", "H.", ("a",), registry=reg)
    assert text(reg) == ""
    g.labels()  # creating the child shows it, at 0, as Go's WithLabelValues does
    assert text(reg) == "# HELP g G.\n# TYPE g gauge\ng 0\n"
    c.labels("x").inc()
    h.labels("y")
    assert 'c{a="x"} 1\n' in text(reg)
    assert 'h_bucket{a="y",le="+Inf"} 0\nh_sum{a="y"} 0\nh_count{a="y"} 0\n' in text(reg)
    c.clear()
    h.remove("y")
    assert text(reg) == "# HELP g G.\n# TYPE g gauge\ng 0\n"


def test_counter_values() -> None:
    reg = Registry()
    c = Counter("c", "C.", registry=reg)
    c.inc()
    c.add(2)
    c.add(0.5)
    assert c.value == 3.5
    assert text(reg).endswith("c 3.5\n")
    c.add(1e6)
    assert text(reg).endswith("c 1.0000035e+06\n")
    with pytest.raises(ValueError, match="decrease"):
        c.add(-1)


def test_counter_keeps_integral_and_fractional_parts_apart_as_go() -> None:
    # Go sums integral increments in a uint64 and the others in a float64, then adds the two:
    # 1 + (0.1 + 0.2) is not (0.1 + 1) + 0.2.
    c = Counter("c", "C.")
    c.add(0.1)
    c.add(1)
    c.add(0.2)
    assert c.value == 1 + (0.1 + 0.2)
    assert format_value(c.value) == "1.3"


def test_gauge_values() -> None:
    reg = Registry()
    g = Gauge("g", "G.", registry=reg)
    g.inc()
    g.inc()
    g.dec()
    g.add(2.5)
    g.sub(0.25)
    assert text(reg).endswith("g 3.25\n")
    g.set(-7)
    assert text(reg).endswith("g -7\n")
    g.set(123456789)
    assert text(reg).endswith("g 1.23456789e+08\n")


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    reg = Registry()
    h = HistogramVec(
        "lat_seconds", "Latency.", ("code",), buckets=(0.000001, 0.005, 1, 86400), registry=reg
    )
    child = h.labels("200")
    values = (0.0000005, 0.000001, 0.003, 0.005, 0.7, 1, 2, 100000, -1)
    for v in values:
        child.observe(v)
    total = 0.0
    for v in values:
        total += v
    assert text(reg) == (
        "# HELP lat_seconds Latency.\n# TYPE lat_seconds histogram\n"
        'lat_seconds_bucket{code="200",le="1e-06"} 3\n'
        'lat_seconds_bucket{code="200",le="0.005"} 5\n'
        'lat_seconds_bucket{code="200",le="1"} 7\n'
        'lat_seconds_bucket{code="200",le="86400"} 8\n'
        'lat_seconds_bucket{code="200",le="+Inf"} 9\n'
        f'lat_seconds_sum{{code="200"}} {format_value(total)}\n'
        'lat_seconds_count{code="200"} 9\n'
    )


def test_histogram_nan_counts_only_in_inf() -> None:
    h = Histogram("h", "H.", buckets=(1,))
    h.observe(math.nan)
    assert h.cumulative_counts() == [0]
    assert h.count == 1
    assert math.isnan(h.sum)


def test_histogram_defaults_and_bucket_checks() -> None:
    assert Histogram("h", "H.").buckets == (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
    assert Histogram("h", "H.", buckets=(1, 2, math.inf)).buckets == (1, 2)
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "H.", buckets=(2, 1))
    with pytest.raises(ValueError, match="reserved"):
        HistogramVec("h", "H.", ("le",))


# --- escaping and ordering --------------------------------------------------------------------


def test_help_escaping() -> None:
    reg = Registry()
    Gauge("g", 'back\\slash, new\nline and "quotes"', registry=reg)
    assert text(reg).startswith('# HELP g back\\\\slash, new\\nline and "quotes"\n')


def test_label_value_escaping() -> None:
    reg = Registry()
    GaugeVec("g", "G.", ("v",), registry=reg).labels('a\\b"c\nd é☃').set(1)
    assert 'g{v="a\\\\b\\"c\\nd é☃"} 1\n' in text(reg)
    assert "é☃".encode() in reg.expose()


def test_label_pairs_sorted_by_name_and_series_by_values() -> None:
    reg = Registry()
    c = CounterVec("c", "C.", ("segment", "code", "packet_type"), registry=reg)
    c.labels("to_agent", "Unavailable", "DATA").inc()
    c.labels("from_agent", "Canceled", "DIAL_RSP").inc()
    c.labels("from_agent", "Canceled", "DATA").inc()
    c.labels("a", "Unknown", "Unknown").inc()
    # pairs by name: code, packet_type, segment; series by (code, packet_type, segment)
    assert text(reg).splitlines()[2:] == [
        'c{code="Canceled",packet_type="DATA",segment="from_agent"} 1',
        'c{code="Canceled",packet_type="DIAL_RSP",segment="from_agent"} 1',
        'c{code="Unavailable",packet_type="DATA",segment="to_agent"} 1',
        'c{code="Unknown",packet_type="Unknown",segment="a"} 1',
    ]


def test_families_sorted_by_name_whatever_the_registration_order() -> None:
    reg = Registry()
    for name in ("b_total", "a_b", "a", "B", "_x"):
        Counter(name, "x", registry=reg)
    assert [line.split()[2] for line in text(reg).splitlines() if line.startswith("# TYPE")] == [
        "B",
        "_x",
        "a",
        "a_b",
        "b_total",
    ]


def test_no_suffix_is_added() -> None:
    reg = Registry()
    CounterVec("dial_failure_count", "x", ("reason",), registry=reg).labels("no_agent").inc()
    body = text(reg)
    assert 'dial_failure_count{reason="no_agent"} 1\n' in body
    assert "_total" not in body
    assert "_created" not in body


# --- checks -----------------------------------------------------------------------------------


def test_registration_and_label_checks() -> None:
    reg = Registry()
    Gauge("g", "G.", registry=reg)
    with pytest.raises(ValueError, match="already registered"):
        Counter("g", "again", registry=reg)
    with pytest.raises(ValueError, match="invalid metric name"):
        Gauge("1g", "G.")
    with pytest.raises(ValueError, match="invalid label name"):
        GaugeVec("g", "G.", ("__reserved",))
    with pytest.raises(ValueError, match="duplicate"):
        GaugeVec("g", "G.", ("a", "a"))
    vec = GaugeVec("g2", "G.", ("a", "b"), registry=reg)
    with pytest.raises(ValueError, match="expected 2 label values"):
        vec.labels("x")
    with pytest.raises(TypeError, match="must be str"):
        vec.labels("x", 1)  # type: ignore[arg-type]
    assert vec.labels("x", "y") is vec.labels("x", "y")
    reg.unregister(vec)
    GaugeVec("g2", "G.", registry=reg)


# --- content type -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "scheme"),
    [
        (None, "underscores"),
        ("", "underscores"),
        ("text/plain", "underscores"),
        ("*/*", "underscores"),
        ("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "underscores"),
        (
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
            "application/openmetrics-text;version=0.0.1;q=0.4,"
            "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
            "text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
            "allow-utf-8",
        ),
        ("text/plain;version=0.0.4;escaping=dots", "dots"),
        ("text/plain;escaping=bogus", "underscores"),
    ],
)
def test_negotiate_content_type(accept: str | None, scheme: str) -> None:
    assert negotiate_content_type(accept) == (
        "text/plain; version=0.0.4; charset=utf-8; escaping=" + scheme
    )
    assert negotiate_content_type(None) == Registry.CONTENT_TYPE


# --- process collector ------------------------------------------------------------------------

PROCESS_FAMILIES = {
    "process_cpu_seconds_total": "counter",
    "process_max_fds": "gauge",
    "process_network_receive_bytes_total": "counter",
    "process_network_transmit_bytes_total": "counter",
    "process_open_fds": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_virtual_memory_max_bytes": "gauge",
}


@pytest.mark.skipif(not ProcessCollector().collect(), reason="no /proc here")
def test_process_collector() -> None:
    reg = Registry()
    reg.register(ProcessCollector())
    body = text(reg)
    types = dict(line.split()[2:4] for line in body.splitlines() if line.startswith("# TYPE"))
    assert types == PROCESS_FAMILIES
    values = {
        line.split()[0]: float(line.split()[1])
        for line in body.splitlines()
        if not line.startswith("#")
    }
    import resource
    import time

    assert 0 < values["process_start_time_seconds"] <= time.time() + 1
    assert values["process_resident_memory_bytes"] > 1 << 20
    assert values["process_virtual_memory_bytes"] >= values["process_resident_memory_bytes"]
    assert values["process_open_fds"] >= 3
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert values["process_max_fds"] == (2.0**64 if soft == resource.RLIM_INFINITY else soft)
    assert values["process_cpu_seconds_total"] >= 0


def test_process_collector_without_proc() -> None:
    blocks = ProcessCollector(proc="/nonexistent").collect()
    assert {name for name, _ in blocks} <= {"process_max_fds", "process_virtual_memory_max_bytes"}
