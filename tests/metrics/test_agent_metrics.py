"""The proxy-agent's metric definitions equal the golden list taken from upstream v0.36.0
(tests/data/metrics/proxy-agent.txt), and the event helpers move the right series."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from konnectivity_fast.metrics import agent as m

from . import check_against_golden, golden, shown


@pytest.fixture
def fresh() -> Iterator[None]:
    m.reset()
    yield
    m.reset()


def test_definitions_match_golden_list(fresh: None) -> None:
    start = {name for name in shown(m.expose()) if not name.startswith("process_")}
    check_against_golden(m.REGISTRY, "proxy-agent.txt", start)
    assert all(verified for verified, _ in golden("proxy-agent.txt"))


def lines(prefix: str) -> list[str]:
    return [line for line in m.expose().decode().splitlines() if line.startswith(m.PREFIX + prefix)]


def test_open_server_connections_at_zero_from_first_scrape(fresh: None) -> None:
    assert lines("open_server_connections") == [f"{m.PREFIX}open_server_connections 0"]
    assert lines("known_server_count") == [f"{m.PREFIX}known_server_count 0"]
    m.set_server_connections_count(2)
    m.set_server_count(3)
    assert lines("open_server_connections") == [f"{m.PREFIX}open_server_connections 2"]
    assert lines("known_server_count") == [f"{m.PREFIX}known_server_count 3"]


def test_event_helpers(fresh: None) -> None:
    p = m.PREFIX
    m.observe_dial_latency(0.03)
    m.observe_dial_failure(m.DIAL_FAILURE_TIMEOUT)
    m.observe_server_failure_deprecated(m.DIRECTION_FROM_SERVER)
    m.endpoint_connection_opened()
    m.endpoint_connection_opened()
    m.endpoint_connection_closed()
    m.observe_packet(m.SEGMENT_FROM_AGENT, 1)
    m.observe_packet(m.SEGMENT_TO_AGENT, 0)
    m.observe_stream_error(m.SEGMENT_FROM_AGENT, 14, 4)
    m.observe_stream_error_no_packet(m.SEGMENT_TO_AGENT, 1)
    m.observe_lease_list(200, "")
    m.observe_lease_list_latency(200, 0.001)
    m.observe_lease_watch(403, "Forbidden")
    assert lines("dial_duration")[:2] == [
        f'{p}dial_duration_seconds_bucket{{le="0.005"}} 0',
        f'{p}dial_duration_seconds_bucket{{le="0.025"}} 0',
    ]
    assert lines("dial_duration")[-3:] == [
        f'{p}dial_duration_seconds_bucket{{le="+Inf"}} 1',
        f"{p}dial_duration_seconds_sum 0.03",
        f"{p}dial_duration_seconds_count 1",
    ]
    assert lines("endpoint_dial") == [f'{p}endpoint_dial_failure_total{{reason="timeout"}} 1']
    assert lines("server_connection_failure") == [
        f'{p}server_connection_failure_count{{direction="from_server"}} 1'
    ]
    assert lines("open_endpoint") == [f"{p}open_endpoint_connections 1"]
    assert lines("stream_packets") == [
        f'{p}stream_packets_total{{packet_type="DIAL_REQ",segment="to_agent"}} 1',
        f'{p}stream_packets_total{{packet_type="DIAL_RSP",segment="from_agent"}} 1',
    ]
    assert lines("stream_errors") == [
        f'{p}stream_errors_total{{code="Canceled",packet_type="Unknown",segment="to_agent"}} 1',
        f'{p}stream_errors_total{{code="Unavailable",packet_type="DATA",segment="from_agent"}} 1',
    ]
    assert lines("lease_lists") == [f'{p}lease_lists_total{{http_response_code="200",reason=""}} 1']
    assert lines("lease_watches") == [
        f'{p}lease_watches_total{{http_response_code="403",reason="Forbidden"}} 1'
    ]
    assert f'{p}lease_list_latency_seconds_bucket{{http_response_code="200",le="0.005"}} 1' in (
        lines("lease_list_latency")
    )
