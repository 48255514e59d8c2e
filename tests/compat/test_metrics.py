"""Metric families of upstream's proxy-server and proxy-agent v0.36.0 against our golden
lists (tests/data/metrics/), and our proxy-server's and proxy-agent's scrapes against
upstream's.

One scenario runs with each pair of programs (upstream's server and agent; our server with
upstream's agent; upstream's server with our agent), with goclient (the konnectivity-client
library) as the client and a TCP echo backend:
  1. the server alone: first scrape ("at-start" families);
  2. the agent connects over mTLS: scrapes of both;
  3. goclient dials the echo backend twice over the Unix-socket gRPC frontend and round
     trips bytes, then dials a closed port (a dial failure): scrapes of both once every
     tunnel is closed.
Families that no scenario can show here (leases need a Kubernetes API) are checked against
upstream's source: the Go definitions of every family (name, type, labels, buckets, HELP).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.net import Certs
from tests.support.upstream import (
    LOOPBACK,
    Family,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    free_ports,
    run_goclient,
    scrape,
    server_args,
    server_command,
    server_ports,
    wait_for,
    wait_until,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "metrics"
SERVER_PREFIX = "konnectivity_network_proxy_server_"
AGENT_PREFIX = "konnectivity_network_proxy_agent_"
# The scenario's tunnels: goclient's successful connections, and its one failed dial.
ECHO_CONNECTIONS = 2
ECHO_ROUNDS = 3
ECHO_SIZE = 5000
# client_golang's DefBuckets, for a histogram defined without Buckets.
DEF_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries


@dataclass(frozen=True)
class GoldenRow:
    verified: bool
    name: str
    type: str
    labels: tuple[str, ...]
    shown: str
    buckets: tuple[str, ...]
    help: str


def read_golden(program: str) -> dict[str, GoldenRow]:
    rows = {}
    for line in (DATA / f"{program}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, kind, labels, shown, buckets, help_text = line.lstrip("?").split("\t")
        rows[name] = GoldenRow(
            not line.startswith("?"),
            name,
            kind,
            () if labels == "-" else tuple(labels.split(",")),
            shown,
            () if buckets == "-" else tuple(buckets.split(",")),
            help_text,
        )
    return rows


# -- the scenario ----------------------------------------------------------------------


@dataclass
class Scrapes:
    server_start: dict[str, Family]
    server_connected: dict[str, Family]
    agent_connected: dict[str, Family]
    server_after: dict[str, Family]
    agent_after: dict[str, Family]


def konnectivity(families: dict[str, Family], prefix: str) -> dict[str, Family]:
    return {name: f for name, f in families.items() if name.startswith(prefix)}


def value(families: dict[str, Family], family: str, sample: str) -> float | None:
    found = families.get(family)
    return found.samples.get(sample) if found else None


def run_scenario(
    server_argv: list[str],
    agent_argv: list[str],
    *,
    upstream: Upstream,
    certs: Certs,
    procs: Processes,
    sock_dir: str,
) -> Scrapes:
    ports = server_ports()
    uds = os.path.join(sock_dir, "konnectivity.sock")
    server = procs.start("server", [*server_argv, *server_args(uds, certs, ports)])
    wait_for(server, ports.health, "/healthz", what="proxy-server")
    server_start = scrape(ports.health)

    aports = agent_ports()
    agent = procs.start("agent", [*agent_argv, *agent_args(certs, ports.agent, aports)])
    wait_for(agent, aports.health, "/readyz", what="proxy-agent")
    wait_for(server, ports.health, "/readyz", what="proxy-server")
    server_connected = scrape(ports.health)
    agent_connected = scrape(aports.health)

    with echo_server() as echo_port:
        code, result = run_goclient(
            upstream,
            f"-uds={uds}",
            f"-target={LOOPBACK}:{echo_port}",
            f"-connections={ECHO_CONNECTIONS}",
            f"-rounds={ECHO_ROUNDS}",
            f"-size={ECHO_SIZE}",
        )
        assert code == 0 and result["ok"], result
    (closed_port,) = free_ports(1)
    code, result = run_goclient(upstream, f"-uds={uds}", f"-target={LOOPBACK}:{closed_port}")
    assert code == 1 and not result["connections"][0]["dialed"], result

    # Every tunnel's end is counted once the server relays its CLOSE_RSP (and the failed
    # dial's DIAL_RSP): wait for those counts rather than for time.
    family = SERVER_PREFIX + "stream_packets_total"
    closed = family + '{packet_type="CLOSE_RSP",segment="to_client"}'
    dialed = family + '{packet_type="DIAL_RSP",segment="to_client"}'
    wait_until(
        lambda: (
            value(scrape(ports.health), family, closed) == ECHO_CONNECTIONS
            and value(scrape(ports.health), family, dialed) == ECHO_CONNECTIONS + 1
        ),
        "the server to count every tunnel's close",
    )
    return Scrapes(
        server_start,
        server_connected,
        agent_connected,
        scrape(ports.health),
        scrape(aports.health),
    )


@pytest.fixture(scope="module")
def upstream_scrapes(
    upstream: Upstream, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Scrapes:
    return scenario("upstream", "upstream", upstream, certs, tmp_path_factory)


@pytest.fixture(scope="module")
def our_scrapes(
    upstream: Upstream, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Scrapes:
    """Our server, upstream's agent."""
    return scenario("ours", "upstream", upstream, certs, tmp_path_factory)


@pytest.fixture(scope="module")
def our_agent_scrapes(
    upstream: Upstream, certs: Certs, tmp_path_factory: pytest.TempPathFactory
) -> Scrapes:
    """Upstream's server, our agent."""
    return scenario("upstream", "ours", upstream, certs, tmp_path_factory)


def scenario(
    server: str,
    agent: str,
    upstream: Upstream,
    certs: Certs,
    factory: pytest.TempPathFactory,
) -> Scrapes:
    procs = Processes(factory.mktemp("scenario"))
    try:
        with tempfile.TemporaryDirectory(prefix="kf-") as sock_dir:
            return run_scenario(
                server_command(server, upstream),
                agent_command(agent, upstream),
                upstream=upstream,
                certs=certs,
                procs=procs,
                sock_dir=sock_dir,
            )
    except BaseException:
        print(procs.report())
        raise
    finally:
        procs.stop_all()


# -- upstream against the golden lists -----------------------------------------------------


def check_family(family: Family, row: GoldenRow) -> None:
    assert row.verified, f"{family.name}: upstream shows it, drop the '?' mark"
    assert (family.type, family.help) == (row.type, row.help), family.name
    # Label names show on samples only: every sample carries exactly the golden ones.
    assert family.labels == set(row.labels), family.name
    if row.type == "histogram":
        assert tuple(b for b in family.buckets if b != "+Inf") == row.buckets, family.name


@pytest.mark.parametrize(
    ("program", "prefix"), [("proxy-server", SERVER_PREFIX), ("proxy-agent", AGENT_PREFIX)]
)
def test_upstream_families_are_golden(upstream_scrapes: Scrapes, program: str, prefix: str) -> None:
    golden = read_golden(program)
    scrapes = (
        [
            upstream_scrapes.server_start,
            upstream_scrapes.server_connected,
            upstream_scrapes.server_after,
        ]
        if program == "proxy-server"
        else [upstream_scrapes.agent_connected, upstream_scrapes.agent_after]
    )
    for families in scrapes:
        for name, family in konnectivity(families, prefix).items():
            assert name in golden, f"upstream exposes {name}, the golden list lacks it"
            check_family(family, golden[name])


def test_upstream_server_at_start(upstream_scrapes: Scrapes) -> None:
    golden = read_golden("proxy-server")
    at_start = {name for name, row in golden.items() if row.shown == "at-start"}
    assert set(konnectivity(upstream_scrapes.server_start, SERVER_PREFIX)) == at_start


def test_upstream_agent_at_start(upstream_scrapes: Scrapes) -> None:
    """Upstream's agent is scraped once connected (it sets these on connecting)."""
    golden = read_golden("proxy-agent")
    at_start = {name for name, row in golden.items() if row.shown == "at-start"}
    assert set(konnectivity(upstream_scrapes.agent_connected, AGENT_PREFIX)) == at_start


# What the scenario makes upstream show: pinned, so that a change in either is noticed.
SERVER_EXERCISED = {
    "culled_leases_count", "dial_duration_seconds", "dial_failure_count",
    "established_connections", "frontend_write_duration_seconds", "grpc_connections",
    "http_connections", "pending_backend_dials", "ready_backend_connections",
    "ready_backends", "stream_errors_total", "stream_packets_total",
}  # fmt: skip
AGENT_EXERCISED = {
    "dial_duration_seconds", "endpoint_dial_failure_total", "known_server_count",
    "open_endpoint_connections", "open_server_connections", "stream_packets_total",
}  # fmt: skip


def test_upstream_scenario_coverage(upstream_scrapes: Scrapes) -> None:
    server = konnectivity(upstream_scrapes.server_after, SERVER_PREFIX)
    agent = konnectivity(upstream_scrapes.agent_after, AGENT_PREFIX)
    assert {n.removeprefix(SERVER_PREFIX) for n in server} == SERVER_EXERCISED
    assert {n.removeprefix(AGENT_PREFIX) for n in agent} == AGENT_EXERCISED


@pytest.mark.parametrize("phase", ["server_connected", "server_after"])
def test_upstream_values(upstream_scrapes: Scrapes, phase: str) -> None:
    """The control for the comparison of values below: the scenario did what it says."""
    assert wrong_values(getattr(upstream_scrapes, phase), EXPECTED_VALUES[phase]) == {}


@pytest.mark.parametrize("phase", ["agent_connected", "agent_after"])
def test_upstream_agent_values(upstream_scrapes: Scrapes, phase: str) -> None:
    families = getattr(upstream_scrapes, phase)
    assert wrong_values(families, EXPECTED_AGENT_VALUES[phase], AGENT_PREFIX) == {}


AGENT_CONNECTED = [
    ("open_server_connections", "open_server_connections", 1),
    ("known_server_count", "known_server_count", 1),
]
EXPECTED_AGENT_VALUES = {
    "agent_connected": AGENT_CONNECTED,
    "agent_after": [
        *AGENT_CONNECTED,
        ("open_endpoint_connections", "open_endpoint_connections", 0),
        ("dial_duration_seconds", "dial_duration_seconds_count", ECHO_CONNECTIONS),
        # upstream's agent files "connection refused" under reason "unknown"
        ("endpoint_dial_failure_total", 'endpoint_dial_failure_total{reason="unknown"}', 1),
        *(
            (
                "stream_packets_total",
                f'stream_packets_total{{packet_type="{kind}",segment="{segment}"}}',
                count,
            )
            for kind, segment, count in [
                ("DIAL_REQ", "to_agent", 3),
                ("DIAL_RSP", "from_agent", 3),
                ("CLOSE_REQ", "to_agent", 2),
                ("CLOSE_RSP", "from_agent", 2),
            ]
        ),
    ],
}


CONNECTED = [
    ("ready_backends", 'ready_backends{proxy_strategy="default"}', 1),
    ("ready_backend_connections", "ready_backend_connections", 1),
    ("grpc_connections", 'grpc_connections{service_method="Connect"}', 1),
    ("http_connections", "http_connections", 0),
]
# Values the scenario fixes (DATA packet counts depend on how reads split, so none here).
EXPECTED_VALUES = {
    "server_connected": CONNECTED,
    "server_after": [
        *CONNECTED,
        ("grpc_connections", 'grpc_connections{service_method="Proxy"}', 0),
        ("established_connections", "established_connections", 0),
        ("pending_backend_dials", "pending_backend_dials", 0),
        ("dial_failure_count", 'dial_failure_count{reason="error_response"}', 1),
        ("dial_duration_seconds", "dial_duration_seconds_count", ECHO_CONNECTIONS),
        *(
            (
                "stream_packets_total",
                f'stream_packets_total{{packet_type="{kind}",segment="{segment}"}}',
                count,
            )
            for kind, count in [
                ("DIAL_REQ", 3),
                ("DIAL_RSP", 3),
                ("CLOSE_REQ", 2),
                ("CLOSE_RSP", 2),
            ]
            for segment in (
                ("from_client", "to_agent") if kind.endswith("REQ") else ("from_agent", "to_client")
            )
        ),
    ],
}


def wrong_values(
    families: dict[str, Family], expected: list[tuple[str, str, int]], prefix: str = SERVER_PREFIX
) -> dict[str, float | None]:
    """The expected samples whose value differs (None: not shown)."""
    return {
        sample: value(families, prefix + name, prefix + sample)
        for name, sample, want in expected
        if value(families, prefix + name, prefix + sample) != want
    }


# -- upstream's source against the golden lists ----------------------------------------------

CONSTRUCTOR = re.compile(r"prometheus\.New(Counter|Gauge|Histogram)(Vec)?\(")
BUCKET_VAR = re.compile(r"(\w+)\s*=\s*\[\]float64\{([^}]*)\}")


@dataclass(frozen=True)
class Definition:
    type: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...]
    help: str


def source_definitions(path: Path) -> dict[str, Definition]:
    """The metric definitions of one Go file, by their Name (without namespace)."""
    text = path.read_text()
    variables = {
        name: [float(v) for v in values.split(",") if v.strip()]
        for name, values in BUCKET_VAR.findall(text)
    }
    found = {}
    matches = list(CONSTRUCTOR.finditer(text))
    for match, after in zip(matches, [*matches[1:], None], strict=True):
        chunk = text[match.end() : after.start() if after else len(text)]
        name = re.search(r'Name:\s*"(\w+)"', chunk)
        help_text = re.search(r'Help:\s*"((?:[^"\\]|\\.)*)"', chunk)
        assert name and help_text, chunk[:300]
        labels: tuple[str, ...] = ()
        if match.group(2):
            listed = re.search(r"\[\]string\{([^}]*)\}", chunk[help_text.end() :])
            assert listed, chunk[:300]
            labels = tuple(s.strip().strip('"') for s in listed.group(1).split(",") if s.strip())
        buckets: tuple[float, ...] = ()
        if match.group(1) == "Histogram":
            named = re.search(r"Buckets:\s*(\w+)", chunk)
            buckets = tuple(variables[named.group(1)] if named else DEF_BUCKETS)
        found[name.group(1)] = Definition(
            match.group(1).lower(), labels, buckets, help_text.group(1).replace('\\"', '"')
        )
    return found


@pytest.mark.parametrize("program", ["proxy-server", "proxy-agent"])
def test_golden_lists_are_upstreams_source(upstream: Upstream, program: str) -> None:
    own = "server" if program == "proxy-server" else "agent"
    definitions = source_definitions(upstream.source / "pkg" / own / "metrics" / "metrics.go")
    common = upstream.client_source / "pkg" / "common" / "metrics" / "metrics.go"
    definitions.update(source_definitions(common))
    prefix = f"konnectivity_network_proxy_{own}_"
    golden = read_golden(program)
    assert len(definitions) == len(golden)
    assert {prefix + name for name in definitions} == set(golden)
    for name, definition in definitions.items():
        row = golden[prefix + name]
        assert row.verified, f"{row.name}: upstream's source defines it, drop the '?' mark"
        theirs = (definition.type, definition.labels, definition.buckets, definition.help)
        ours = (row.type, row.labels, tuple(float(b) for b in row.buckets), row.help)
        assert ours == theirs, row.name


# -- our server against upstream's ------------------------------------------------------------


def shape(families: dict[str, Family]) -> dict[str, tuple[str, str, frozenset[str], list[str]]]:
    return {
        name: (f.type, f.help, frozenset(f.labels), f.buckets)
        for name, f in konnectivity(families, SERVER_PREFIX).items()
    }


@pytest.mark.parametrize("phase", ["server_start", "server_connected", "server_after"])
def test_our_server_families_are_upstreams(
    upstream_scrapes: Scrapes, our_scrapes: Scrapes, phase: str
) -> None:
    theirs = shape(getattr(upstream_scrapes, phase))
    ours = shape(getattr(our_scrapes, phase))
    shown = {"only upstream shows": sorted(set(theirs) - set(ours)),
             "only we show": sorted(set(ours) - set(theirs))}  # fmt: skip
    assert shown == {"only upstream shows": [], "only we show": []}
    differ = {name: (ours[name], theirs[name]) for name in theirs if ours[name] != theirs[name]}
    assert differ == {}, "(ours, upstream's): type, HELP, label names, buckets"


@pytest.mark.parametrize("phase", ["server_connected", "server_after"])
def test_our_server_values_are_upstreams(our_scrapes: Scrapes, phase: str) -> None:
    """Samples whose value differs from upstream's in the same scenario (None: not shown)."""
    assert wrong_values(getattr(our_scrapes, phase), EXPECTED_VALUES[phase]) == {}


# -- our agent against upstream's -------------------------------------------------------------


def agent_shape(
    families: dict[str, Family],
) -> dict[str, tuple[str, str, frozenset[str], list[str]]]:
    return {
        name: (f.type, f.help, frozenset(f.labels), f.buckets)
        for name, f in konnectivity(families, AGENT_PREFIX).items()
    }


@pytest.mark.parametrize("phase", ["agent_connected", "agent_after"])
def test_our_agent_families_are_upstreams(
    upstream_scrapes: Scrapes, our_agent_scrapes: Scrapes, phase: str
) -> None:
    theirs = agent_shape(getattr(upstream_scrapes, phase))
    ours = agent_shape(getattr(our_agent_scrapes, phase))
    shown = {
        "only upstream shows": sorted(set(theirs) - set(ours)),
        "only we show": sorted(set(ours) - set(theirs)),
    }
    assert shown == {"only upstream shows": [], "only we show": []}
    differ = {name: (ours[name], theirs[name]) for name in theirs if ours[name] != theirs[name]}
    assert differ == {}, "(ours, upstream's): type, HELP, label names, buckets"


@pytest.mark.parametrize("phase", ["agent_connected", "agent_after"])
def test_our_agent_values_are_upstreams(our_agent_scrapes: Scrapes, phase: str) -> None:
    """Samples whose value differs from upstream's in the same scenario (None: not shown)."""
    families = getattr(our_agent_scrapes, phase)
    assert wrong_values(families, EXPECTED_AGENT_VALUES[phase], AGENT_PREFIX) == {}


def test_upstream_server_with_our_agent_is_unchanged(
    upstream_scrapes: Scrapes, our_agent_scrapes: Scrapes
) -> None:
    """Upstream's server shows the same families and values whichever agent serves it."""
    for phase in ("server_connected", "server_after"):
        assert shape(getattr(our_agent_scrapes, phase)) == shape(getattr(upstream_scrapes, phase))
        assert wrong_values(getattr(our_agent_scrapes, phase), EXPECTED_VALUES[phase]) == {}
