"""The whole-host view of a proxy-server run with ``--workers``: its health, metrics and
tunnel listing, made from each worker's.

The supervisor (``server.workers``) serves the health and admin ports the flags name; each
worker serves its own on private loopback ports, and these routes ask every worker and
answer for all of them together:

- ``/healthz``: ok while every worker process runs;
- ``/readyz`` (``/ready``): ok when every worker is ready (holds an agent), since the
  frontend socket hands each client connection to any worker;
- ``/metrics`` (health and admin ports): every worker's exposition and the supervisor's
  own merged into one, family by family: a sample's values are added up (counters,
  gauges of things held, histogram buckets, sums and counts; the process figures are
  the host's), except the few process figures that are not amounts (``NOT_ADDED``); a
  worker that does not answer is left out of that scrape;
- the tunnel listing: the workers' rows together, each with its worker's server ID,
  sorted and cut again to the query's limit; per-agent counts added up.

Pure functions (``merge_metrics``, ``merge_listings``) do the merging; ``WorkerView`` is
what the routes need of the supervisor.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.metrics.negotiate import TEXT_CONTENT_TYPE
from konnectivity_fast.metrics.registry import format_value
from konnectivity_fast.server.health import NOT_READY_BODY
from konnectivity_fast.transport.http import NOSNIFF, TEXT_PLAIN, Handler, Request, Response
from konnectivity_fast.tunnel.listing import (
    JSON_CONTENT_TYPE,
    ListingError,
    TunnelQuery,
    encode_listing,
    parse_tunnel_query,
    top_peers,
)
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH, TunnelQueryParam, TunnelSort

__all__ = [
    "NOT_ADDED",
    "WorkerAnswer",
    "WorkerView",
    "fetch",
    "merge_listings",
    "merge_metrics",
    "supervisor_admin_routes",
    "supervisor_health_routes",
]

#: How long the supervisor waits for a worker's answer: a worker answers its health and
#: admin ports between packets, in milliseconds; one that takes this long is stuck.
FETCH_TIMEOUT = 10.0
#: The largest answer read from a worker: a listing is bounded to ~250 KB
#: (``tunnel.listing.MAX_LIMIT``) and an exposition is a few hundred KB even with many
#: label values; anything larger is not a worker's.
MAX_ANSWER_BYTES = 16 << 20

#: Process figures that are not amounts of each process: the merged value is the
#: smallest (start time: when the oldest process started) or the largest (limits every
#: process has alike, and the network counters, which are the network namespace's, read
#: alike by every process of the host).
NOT_ADDED: dict[str, Callable[[float, float], float]] = {
    "process_start_time_seconds": min,
    "process_max_fds": max,
    "process_virtual_memory_max_bytes": max,
    "process_network_receive_bytes_total": max,
    "process_network_transmit_bytes_total": max,
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)$")

WorkerAnswer = tuple[int, bytes]  # HTTP status (0: no answer) and body


class WorkerView(Protocol):
    """What the routes need of the supervisor."""

    def running(self) -> list[bool]:
        """Whether each worker's process runs."""
        ...

    def ask(self, port: str, target: str) -> Awaitable[list[WorkerAnswer]]:
        """Every worker's answer to a GET of ``target`` on its ``port`` ("health" or
        "admin"), in worker order."""
        ...

    def worker_ids(self) -> list[str]:
        """Each worker's server ID, in worker order."""
        ...


async def fetch(port: int, target: str) -> WorkerAnswer:
    """GET ``target`` from a worker's loopback ``port``: its status and body, or status 0
    when it does not answer whole within ``FETCH_TIMEOUT``."""
    try:
        return await asyncio.wait_for(_get(port, target), FETCH_TIMEOUT)
    except (OSError, TimeoutError, ValueError):
        return 0, b""


async def _get(port: int, target: str) -> WorkerAnswer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {target} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = b""
        while chunk := await reader.read(MAX_ANSWER_BYTES + 1 - len(answer)):
            answer += chunk
            if len(answer) > MAX_ANSWER_BYTES:
                raise ValueError("answer too large")
    finally:
        writer.close()
    head, sep, body = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        raise ValueError("not an HTTP answer")
    return int(status_line[1]), body


def merge_metrics(texts: Sequence[str]) -> str:
    """One Prometheus text exposition (0.0.4) from several of the same program: families
    sorted by name, HELP and TYPE from the first that has them, each sample's values
    combined (added, or ``NOT_ADDED``'s rule) in the order samples first appear."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, dict[str, float]] = {}
    for text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    lines = headers.setdefault(family, [])
                    if not any(known.startswith(f"# {parts[1]} ") for known in lines):
                        lines.append(line)
                    samples.setdefault(family, {})
                continue
            match = _SAMPLE.match(line)
            if match is None or not family:
                continue
            key = f"{match[1]}{match[2] or ''}"
            value = _value(match[3])
            seen = samples[family]
            if key in seen:
                seen[key] = NOT_ADDED.get(family, _add)(seen[key], value)
            else:
                seen[key] = value
    out: list[str] = []
    for family in sorted(headers):
        out.extend(headers[family])
        out.extend(f"{key} {format_value(value)}" for key, value in samples[family].items())
    return "".join(f"{line}\n" for line in out)


def _add(a: float, b: float) -> float:
    return a + b


def _value(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def merge_listings(
    documents: Sequence[dict[str, Any]], query: TunnelQuery, server_id: str
) -> dict[str, Any]:
    """The tunnel listing of the whole host from its workers' (``server.tunnel_list``'s
    document each): rows marked with their worker's ``server_id``, sorted as ``query``
    asks and cut to its limit; totals and per-agent entries added up, but for the count
    of agents (each is held by every worker)."""
    rows: list[dict[str, Any]] = []
    agents: dict[str, dict[str, Any]] = {}
    totals: dict[str, int] = {}
    for document in documents:
        for row in document.get("tunnels", []):
            rows.append({**row, "server_id": document.get("server_id", "")})
        for agent in document.get("agents", []):
            _add_agent(agents, agent)
        for name, value in document.get("totals", {}).items():
            totals[name] = totals.get(name, 0) + int(value)
    if query.sort is TunnelSort.BYTES:
        rows.sort(key=lambda row: int(row["bytes_up"]) + int(row["bytes_down"]), reverse=True)
    else:
        rows.sort(key=lambda row: float(row["age_seconds"]), reverse=True)
    rows = rows[: query.limit]
    totals["listed"] = len(rows)
    # Every agent connects to every worker: the host has as many agents as the worker
    # that has the most, not their sum.
    most = max((int(d.get("totals", {}).get("agents", 0)) for d in documents), default=0)
    totals["agents"] = max(most, len(agents))
    first = documents[0] if documents else {}
    return {
        "program": first.get("program", "proxy-server"),
        "server_id": server_id,
        "workers": [document.get("server_id", "") for document in documents],
        "dial_balance": first.get("dial_balance", ""),
        "sort": query.sort.value,
        "limit": query.limit,
        "agent": query.peer,
        "totals": totals,
        "agents": top_peers(agents.values(), query.limit),
        "tunnels": rows,
    }


def _add_agent(agents: dict[str, dict[str, Any]], agent: dict[str, Any]) -> None:
    entry = agents.get(agent["agent_id"])
    if entry is None:
        agents[agent["agent_id"]] = dict(agent)
        return
    for name, value in agent.items():
        if isinstance(value, bool):
            entry[name] = bool(entry.get(name)) or value
        elif isinstance(value, int):
            entry[name] = int(entry.get(name, 0)) + value


def supervisor_health_routes(view: WorkerView) -> dict[str, Handler]:
    """The health port's paths, for every worker together."""

    def healthz(request: Request) -> Response:
        stopped = [str(i) for i, running in enumerate(view.running()) if not running]
        if stopped:
            return 500, TEXT_PLAIN, f"worker {', '.join(stopped)} not running".encode(), ()
        return 200, TEXT_PLAIN, b"ok", ()

    async def readyz(request: Request) -> Response:
        answers = await view.ask("health", "/readyz")
        if all(status == 200 for status, _ in answers):
            return 200, TEXT_PLAIN, b"ok", ()
        return 500, TEXT_PLAIN, NOT_READY_BODY, ()

    metrics = _metrics_route(view)
    return {"/healthz": healthz, "/readyz": readyz, "/ready": readyz, "/metrics": metrics}


def supervisor_admin_routes(view: WorkerView, server_id: str) -> dict[str, Handler]:
    """The admin port's paths, for every worker together."""

    async def tunnels(request: Request) -> Response:
        try:
            query = parse_tunnel_query(request.query, TunnelQueryParam.AGENT)
        except ListingError as exc:
            return 400, TEXT_PLAIN, f"{exc}\n".encode(), NOSNIFF
        target = f"{ADMIN_TUNNELS_PATH}?{request.query}" if request.query else ADMIN_TUNNELS_PATH
        answers = await view.ask("admin", target)
        documents = [json.loads(body) for status, body in answers if status == 200]
        document = merge_listings(documents, query, server_id)
        document["workers_unanswered"] = len(answers) - len(documents)
        return 200, JSON_CONTENT_TYPE, encode_listing(document), ()

    return {"/metrics": _metrics_route(view), ADMIN_TUNNELS_PATH: tunnels}


def _metrics_route(view: WorkerView) -> Handler:
    async def metrics(request: Request) -> Response:
        answers = await view.ask("admin", "/metrics")
        texts = [body.decode("utf-8", "replace") for status, body in answers if status == 200]
        # The supervisor's own process figures count too (its series are all at 0 else).
        texts.append(server_metrics.expose().decode())
        return 200, TEXT_CONTENT_TYPE, merge_metrics(texts).encode(), ()

    return metrics
