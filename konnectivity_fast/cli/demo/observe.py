"""What the demo reads from the programs themselves: ``/healthz``, ``/readyz`` and
``/metrics`` on their health ports, through ``Place`` (from inside a namespace for the
remote topology).

The final check (``check_counters``) does not take the demo's word for anything it
carried: it asks each proxy-server and each proxy-agent's own counters whether DATA
packets and dials went through them, in both modes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from konnectivity_fast.cli.demo.layout import Layout, Place
from konnectivity_fast.cli.demo.procs import Proc
from konnectivity_fast.cli.demo.report import Out
from konnectivity_fast.cli.demo.traffic import ModeResult
from konnectivity_fast.cli.promtext import HttpAnswer, Samples, parse_samples
from konnectivity_fast.metrics.agent import PREFIX as AGENT
from konnectivity_fast.metrics.server import PREFIX as SERVER

__all__ = ["Observer", "Scrape", "check_counters", "print_counters", "print_health"]

SERVER_READY = SERVER + "ready_backends"
SERVER_DIALS = SERVER + "dial_duration_seconds_count"
SERVER_PACKETS = SERVER + "stream_packets_total"
SERVER_FAILURES = SERVER + "dial_failure_count"
AGENT_OPEN = AGENT + "open_server_connections"
AGENT_KNOWN = AGENT + "known_server_count"
AGENT_DIALS = AGENT + "dial_duration_seconds_count"
AGENT_PACKETS = AGENT + "stream_packets_total"
# The families printed at the end, per program kind (every sample of each).
FINAL_FAMILIES = {
    "proxy-server": (
        SERVER + "ready_backend_connections",
        SERVER_READY,
        SERVER_DIALS,
        SERVER_FAILURES,
        SERVER_PACKETS,
    ),
    "proxy-agent": (AGENT_OPEN, AGENT_KNOWN, AGENT_DIALS, AGENT_PACKETS),
}
# Only the DATA and dial packets of stream_packets_total are worth a line each.
_PACKET_TYPES = ('packet_type="DATA"', 'packet_type="DIAL_REQ"', 'packet_type="DIAL_RSP"')


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "proxy-server" or "proxy-agent"
    name: str  # server or agent ID
    place: Place
    port: int


@dataclass(frozen=True)
class Scrape:
    healthz: HttpAnswer
    readyz: HttpAnswer
    metrics: Samples


class Observer:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.servers = [
            Endpoint("proxy-server", s.server_id, s.place, s.health_port) for s in layout.servers
        ]
        self.agents = [
            Endpoint("proxy-agent", a.agent_id, a.place, a.health_port) for a in layout.agents
        ]

    def _metrics(self, endpoint: Endpoint) -> Samples:
        (answer,) = endpoint.place.get_many([(endpoint.port, "/metrics")])
        return parse_samples(answer.body if answer.ok else "")

    def servers_healthy(self) -> bool:
        return all(s.place.get_many([(s.port, "/healthz")])[0].ok for s in self.servers)

    def all_connected(self) -> bool:
        """Every agent holds every server, and every server sees every agent."""
        want_servers, want_agents = len(self.servers), len(self.agents)
        for agent in self.agents:
            if self._metrics(agent).value(AGENT_OPEN) != want_servers:
                return False
        for server in self.servers:
            ready = self._metrics(server).value(SERVER_READY, proxy_strategy="default")
            if ready != want_agents:
                return False
        return True

    def agent_dials(self) -> dict[str, float]:
        """Each agent's count of dials it made to a backend."""
        return {a.name: self._metrics(a).value(AGENT_DIALS) for a in self.agents}

    def scrape_all(self) -> dict[Endpoint, Scrape]:
        scrapes = {}
        for endpoint in self.servers + self.agents:
            healthz, readyz, metrics = endpoint.place.get_many(
                [
                    (endpoint.port, "/healthz"),
                    (endpoint.port, "/readyz"),
                    (endpoint.port, "/metrics"),
                ]
            )
            scrapes[endpoint] = Scrape(healthz, readyz, parse_samples(metrics.body))
        return scrapes


def print_health(
    out: Out, observer: Observer, scrapes: Mapping[Endpoint, Scrape], procs: Mapping[str, Proc]
) -> None:
    out.section("Health and metrics, read from each program")
    for endpoint, scrape in scrapes.items():
        m = scrape.metrics
        if endpoint.kind == "proxy-server":
            agents = m.value(SERVER_READY, proxy_strategy="default")
            data = m.value(SERVER_PACKETS, segment="from_agent", packet_type="DATA")
            facts = (
                f"agents {agents:.0f}, dials {m.value(SERVER_DIALS):.0f} "
                f"(failed {m.value(SERVER_FAILURES):.0f}), DATA packets from agents {data:,.0f}"
            )
        else:
            facts = (
                f"holds {m.value(AGENT_OPEN):.0f} of {m.value(AGENT_KNOWN):.0f} servers, "
                f"dials {m.value(AGENT_DIALS):.0f}"
            )
        health = f"/healthz {scrape.healthz.summary()}, /readyz {scrape.readyz.summary()}"
        out.row(endpoint.name, health, facts)


def print_counters(out: Out, observer: Observer, scrapes: Mapping[Endpoint, Scrape]) -> None:
    out.section("Final counters, as scraped from each program's /metrics")
    for endpoint, scrape in scrapes.items():
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        where = f" in {endpoint.place.netns}" if endpoint.place.netns else ""
        out.line(f"  {endpoint.kind} {endpoint.name} ({url}{where})")
        for family in FINAL_FAMILIES[endpoint.kind]:
            for key, value in scrape.metrics.items():
                if key.partition("{")[0] != family:
                    continue
                if family.endswith("stream_packets_total") and not any(
                    t in key for t in _PACKET_TYPES
                ):
                    continue
                out.line(f"    {key} {value:g}")


def check_counters(
    layout: Layout, scrapes: Mapping[Endpoint, Scrape], results: Mapping[str, ModeResult]
) -> list[str]:
    """What is wrong, per the programs' own counters and the demo's results (empty: all
    good)."""
    problems = []
    by_name = {e.name: s for e, s in scrapes.items()}
    for server in layout.servers:
        result = results.get(server.mode)
        if result is None or not result.verified or not result.healthz.startswith("200"):
            problems.append(f"{server.mode}: the requests through this frontend did not all work")
        m = by_name[server.server_id].metrics
        if m.value(SERVER_DIALS) < 1:
            problems.append(f"{server.server_id}: no dial completed (its own counter says)")
        data_in = m.value(SERVER_PACKETS, segment="from_agent", packet_type="DATA")
        if data_in < 1:
            problems.append(f"{server.server_id}: no DATA packet came from an agent")
    agent_dials = sum(by_name[a.agent_id].metrics.value(AGENT_DIALS) for a in layout.agents)
    if agent_dials < 2:
        problems.append("the agents dialled the backend fewer times than the two modes need")
    for endpoint, scrape in scrapes.items():
        if not (scrape.healthz.ok and scrape.readyz.ok):
            problems.append(f"{endpoint.kind} {endpoint.name} is not healthy and ready")
    return problems
