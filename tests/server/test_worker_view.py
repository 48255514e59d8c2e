"""The whole-host view of ``--workers`` (server/worker_view.py): merging the workers'
expositions and tunnel listings, and the worker's part passed in its environment
(server/workers.py ``WorkerSpec``)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from konnectivity_fast.server import worker_view
from konnectivity_fast.server.worker_view import merge_listings, merge_metrics
from konnectivity_fast.server.workers import WorkerSpec, worker_spec
from konnectivity_fast.tunnel.listing import TunnelQuery
from konnectivity_fast.wire.contract import TunnelSort
from tests.support.upstream import parse_exposition

WORKER_0 = """\
# HELP a_total Things done.
# TYPE a_total counter
a_total{kind="x"} 3
a_total{kind="y"} 1
# HELP d_seconds A histogram.
# TYPE d_seconds histogram
d_seconds_bucket{le="0.1"} 2
d_seconds_bucket{le="+Inf"} 3
d_seconds_sum 0.25
d_seconds_count 3
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1000.5
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 1024
"""
WORKER_1 = """\
# HELP a_total Things done.
# TYPE a_total counter
a_total{kind="x"} 4
a_total{kind="z"} 2
# HELP d_seconds A histogram.
# TYPE d_seconds histogram
d_seconds_bucket{le="0.1"} 1
d_seconds_bucket{le="+Inf"} 1
d_seconds_sum 0.05
d_seconds_count 1
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.
# TYPE process_start_time_seconds gauge
process_start_time_seconds 999.25
# HELP process_max_fds Maximum number of open file descriptors.
# TYPE process_max_fds gauge
process_max_fds 4096
# HELP b_count Only one worker has this.
# TYPE b_count gauge
b_count 1.5e+06
"""


def test_samples_are_added_and_process_figures_kept_whole() -> None:
    merged = parse_exposition(merge_metrics([WORKER_0, WORKER_1]))
    assert merged["a_total"].samples == {
        'a_total{kind="x"}': 7,
        'a_total{kind="y"}': 1,
        'a_total{kind="z"}': 2,
    }
    assert merged["d_seconds"].samples == {
        'd_seconds_bucket{le="0.1"}': 3,
        'd_seconds_bucket{le="+Inf"}': 4,
        "d_seconds_sum": 0.3,
        "d_seconds_count": 4,
    }
    assert merged["process_start_time_seconds"].samples == {"process_start_time_seconds": 999.25}
    assert merged["process_max_fds"].samples == {"process_max_fds": 4096}
    assert merged["b_count"].samples == {"b_count": 1.5e6}
    assert merged["d_seconds"].type == "histogram"
    assert merged["a_total"].help == "Things done."


def test_merged_exposition_is_sorted_with_one_header_each() -> None:
    text = merge_metrics([WORKER_0, WORKER_1, WORKER_0])
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert types == sorted(set(types))
    helps = [line for line in text.splitlines() if line.startswith("# HELP")]
    assert len(helps) == len(types)
    # Values as Go writes them: integers without a point, large ones in exponent form.
    assert 'a_total{kind="x"} 10\n' in text
    assert "b_count 1.5e+06\n" in text


def test_one_exposition_merges_to_itself() -> None:
    assert merge_metrics([WORKER_1]).splitlines() == sorted_families(WORKER_1)


def sorted_families(text: str) -> list[str]:
    blocks: dict[str, list[str]] = {}
    name = ""
    for line in text.splitlines():
        if line.startswith("# HELP"):
            name = line.split()[2]
        blocks.setdefault(name, []).append(line)
    return [line for key in sorted(blocks) for line in blocks[key]]


@given(st.text(max_size=200))
def test_any_text_merges_without_error(text: str) -> None:
    merge_metrics([text, WORKER_0])


def row(connection_id: int, moved: int, age: float) -> dict[str, object]:
    return {
        "connection_id": connection_id,
        "agent_id": "a1",
        "bytes_up": moved,
        "bytes_down": 0,
        "age_seconds": age,
    }


def listing(server_id: str, rows: list[dict[str, object]], streams: int = 1) -> dict[str, object]:
    return {
        "program": "proxy-server",
        "server_id": server_id,
        "dial_balance": "random",
        "totals": {"tunnels": len(rows), "agents": 1, "listed": len(rows)},
        "agents": [
            {"agent_id": "a1", "streams": streams, "tunnels": len(rows), "paused": False},
        ],
        "tunnels": rows,
    }


@pytest.mark.parametrize(
    ("sort", "order"), [(TunnelSort.BYTES, [3, 1, 4]), (TunnelSort.AGE, [4, 2, 3])]
)
def test_listings_merge_rows_sorted_and_cut(sort: TunnelSort, order: list[int]) -> None:
    first = listing("h-0", [row(1, 500, 1.0), row(2, 10, 9.0)])
    second = listing("h-1", [row(3, 900, 2.0), row(4, 100, 20.0)])
    second["agents"][0]["paused"] = True  # type: ignore[index]
    merged = merge_listings([first, second], TunnelQuery(sort, 3), "h")
    assert [r["connection_id"] for r in merged["tunnels"]] == order
    by_id = {r["connection_id"]: r["server_id"] for r in merged["tunnels"]}
    assert by_id.get(3, "h-1") == "h-1" and by_id.get(2, "h-0") == "h-0"
    assert merged["totals"] == {"tunnels": 4, "agents": 1, "listed": 3}
    assert merged["agents"] == [
        {"agent_id": "a1", "streams": 2, "tunnels": 4, "paused": True},
    ]
    assert (merged["server_id"], merged["workers"]) == ("h", ["h-0", "h-1"])


def test_worker_spec_round_trips_through_the_environment() -> None:
    spec = WorkerSpec(1, "h-1", 4, 40001, 40002, ((("tcp", "", 8091), (5, 6)),), 7)
    assert worker_spec({"KONNECTIVITY_FAST_WORKER": spec.encode()}) == spec
    assert worker_spec({}) is None


@pytest.mark.parametrize("text", ["", "{}", "[1]", '{"index": "x"}', "not json"])
def test_a_worker_spec_not_written_by_a_supervisor_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid KONNECTIVITY_FAST_WORKER"):
        WorkerSpec.decode(text)


@pytest.mark.parametrize("extra", [0, 1], ids=["at-the-bound", "one-byte-over"])
def test_a_workers_answer_is_read_up_to_its_bound(
    extra: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer over ``MAX_ANSWER_BYTES`` counts as no answer, even one that arrives in a
    single read; one at the bound is read whole."""
    bound = 4096
    monkeypatch.setattr(worker_view, "MAX_ANSWER_BYTES", bound)
    head = b"HTTP/1.0 200 OK\r\n\r\n"
    body = b"x" * (bound - len(head) + extra)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head + body)
        writer.close()

    async def main() -> tuple[int, bytes]:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        try:
            return await worker_view.fetch(server.sockets[0].getsockname()[1], "/metrics")
        finally:
            server.close()
            await server.wait_closed()

    got = asyncio.run(main())
    assert got == ((0, b"") if extra else (200, body))
