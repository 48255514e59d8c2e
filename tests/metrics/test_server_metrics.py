"""The proxy-server's metric definitions equal the golden list taken from upstream v0.36.0
(tests/data/metrics/proxy-server.txt), and the event helpers move the right series."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from konnectivity_fast.metrics import ProcessCollector
from konnectivity_fast.metrics import server as m

from . import check_against_golden, golden, shown


@pytest.fixture
def fresh() -> Iterator[None]:
    m.reset()
    yield
    m.reset()


def test_definitions_match_golden_list(fresh: None) -> None:
    m.startup(["default"])
    start = {name for name in shown(m.expose()) if not name.startswith("process_")}
    check_against_golden(m.REGISTRY, "proxy-server.txt", start)


def test_unverified_help_texts_are_few() -> None:
    unverified = [cols[0] for verified, cols in golden("proxy-server.txt") if not verified]
    assert unverified == []


def test_process_metrics_are_exposed(fresh: None) -> None:
    assert "process_resident_memory_bytes" in shown(m.expose()) or not ProcessCollector().collect()


def lines(prefix: str) -> list[str]:
    return [line for line in m.expose().decode().splitlines() if line.startswith(m.PREFIX + prefix)]


def test_startup_sets_strategies_to_zero(fresh: None) -> None:
    m.startup(["destHost", "default"])
    assert lines("ready_backend") == [
        f"{m.PREFIX}ready_backend_connections 0",
        f'{m.PREFIX}ready_backends{{proxy_strategy="default"}} 0',
        f'{m.PREFIX}ready_backends{{proxy_strategy="destHost"}} 0',
    ]
    m.set_ready_backends("default", 3)
    m.set_backend_count_deprecated(3)
    assert lines("ready_backend")[:2] == [
        f"{m.PREFIX}ready_backend_connections 3",
        f'{m.PREFIX}ready_backends{{proxy_strategy="default"}} 3',
    ]


def test_event_helpers(fresh: None) -> None:
    m.grpc_connection_opened(m.PROXY)
    m.grpc_connection_opened(m.CONNECT)
    m.grpc_connection_opened(m.PROXY)
    m.grpc_connection_closed(m.PROXY)
    m.http_connection_opened()
    m.set_pending_dial_count(2)
    m.set_established_connection_count(5)
    full = m.full_receive_channel(m.CONNECT)
    full.inc()
    m.observe_dial_failure(m.DIAL_FAILURE_NO_AGENT)
    m.observe_dial_failure(m.DIAL_FAILURE_NO_AGENT)
    m.observe_packet(m.SEGMENT_FROM_CLIENT, 0)
    m.observe_packet(m.SEGMENT_TO_AGENT, 4)
    m.observe_packet(m.SEGMENT_TO_AGENT, 4)
    m.observe_packet(m.SEGMENT_FROM_AGENT, 99)
    m.observe_stream_error(m.SEGMENT_TO_CLIENT, 1, 4)
    m.observe_stream_error_no_packet(m.SEGMENT_FROM_AGENT, 14)
    m.observe_stream_error_no_packet(m.SEGMENT_FROM_AGENT, 42)
    m.culled_lease()
    m.observe_lease_delete(404, "NotFound")
    m.observe_lease_delete_latency(404, 0.02)
    m.observe_lease_list(200, "")
    m.observe_lease_list_latency(200, 0.2)
    m.observe_dial_latency(0.00002)
    m.observe_frontend_write_latency(0.3)
    p = m.PREFIX
    assert lines("grpc_connections") == [
        f'{p}grpc_connections{{service_method="Connect"}} 1',
        f'{p}grpc_connections{{service_method="Proxy"}} 1',
    ]
    assert lines("http_connections") == [f"{p}http_connections 1"]
    assert lines("pending") == [f"{p}pending_backend_dials 2"]
    assert lines("established") == [f"{p}established_connections 5"]
    assert lines("full") == [f'{p}full_receive_channels{{service_method="Connect"}} 1']
    assert lines("dial_failure") == [f'{p}dial_failure_count{{reason="no_agent"}} 2']
    assert lines("stream_packets") == [
        f'{p}stream_packets_total{{packet_type="99",segment="from_agent"}} 1',
        f'{p}stream_packets_total{{packet_type="DATA",segment="to_agent"}} 2',
        f'{p}stream_packets_total{{packet_type="DIAL_REQ",segment="from_client"}} 1',
    ]
    errors = p + "stream_errors_total"
    assert lines("stream_errors") == [
        f'{errors}{{code="Canceled",packet_type="DATA",segment="to_client"}} 1',
        f'{errors}{{code="Code(42)",packet_type="Unknown",segment="from_agent"}} 1',
        f'{errors}{{code="Unavailable",packet_type="Unknown",segment="from_agent"}} 1',
    ]
    assert lines("culled") == [f"{p}culled_leases_count 1"]
    assert lines("lease_delete_total") == [
        f'{p}lease_delete_total{{http_status_code="404",reason="NotFound"}} 1'
    ]
    assert lines("lease_list_total") == [
        f'{p}lease_list_total{{http_status_code="200",reason=""}} 1'
    ]
    assert f'{p}lease_delete_latency_seconds_bucket{{http_status_code="404",le="0.025"}} 1' in (
        lines("lease_delete_latency")
    )
    assert lines("dial_duration")[2:4] == [
        f'{p}dial_duration_seconds_bucket{{le="0.0001"}} 1',
        f'{p}dial_duration_seconds_bucket{{le="0.005"}} 1',
    ]
    assert lines("dial_duration")[-2:] == [
        f"{p}dial_duration_seconds_sum 2e-05",
        f"{p}dial_duration_seconds_count 1",
    ]
    assert f'{p}frontend_write_duration_seconds_bucket{{le="0.5"}} 1' in lines("frontend_write")
    assert lines("connection_duration") == []  # not in v0.36.0


def test_reset_returns_to_import_state(fresh: None) -> None:
    before = shown(m.expose())
    m.observe_packet(m.SEGMENT_FROM_CLIENT, 0)
    m.http_connection_opened()
    m.reset()
    assert shown(m.expose()) == before
    assert lines("http_connections") == [f"{m.PREFIX}http_connections 0"]
    m.observe_packet(m.SEGMENT_FROM_CLIENT, 0)
    assert len(lines("stream_packets")) == 1
