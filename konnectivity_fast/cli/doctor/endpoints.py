"""``doctor server`` and ``doctor agent``: a running program read from outside, through
its health port (``/healthz``, ``/readyz``, ``/metrics``) and optionally its admin port,
with upstream's metric names (``konnectivity_network_proxy_server_...`` and
``..._agent_...``), so it works with upstream's programs as with ours.

What counts as wrong:

- any program: not healthy, not answering, or its admin port not answering;
- a server: not ready (no agent connected), a stream blocked on a full receive queue; with
  several servers, one holding fewer agents than another (agents do not reach every
  replica: a sticky or short load balancer);
- an agent: not ready (no server), or holding fewer servers than it knows of.

Counters since start (dial failures by reason, stream errors) are shown, not judged: a
past failure is information, not a present fault.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from konnectivity_fast.cli.promtext import Samples, http_get, parse_samples
from konnectivity_fast.metrics.agent import PREFIX as AGENT
from konnectivity_fast.metrics.server import PREFIX as SERVER

__all__ = ["check_agents", "check_servers"]

READY_PATH = "/readyz"
# ready_backends counts keys: agent IDs for these strategies (destHost counts identifiers),
# the first one present gives the number of agents.
AGENT_KEYED_STRATEGIES = ("default", "defaultRoute", "destHost")


@dataclass
class Checked:
    """One program's findings."""

    address: str
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    metrics: Samples = field(default_factory=lambda: Samples({}))

    def print(self, kind: str) -> None:
        print(f"\n{kind} {self.address}")
        for line in self.lines:
            print(f"  {line}")
        for problem in self.problems:
            print(f"  PROBLEM: {problem}")


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _read(address: str) -> Checked:
    host, port = _split(address)
    checked = Checked(address)
    healthz = http_get(host, port, "/healthz")
    if not healthz.status:
        checked.problems.append(f"no answer on {address}: {healthz.error}")
        return checked
    readyz = http_get(host, port, READY_PATH)
    metrics = http_get(host, port, "/metrics")
    checked.lines.append(f"/healthz  {healthz.summary()}")
    checked.lines.append(f"/readyz   {readyz.summary()}")
    if not healthz.ok:
        checked.problems.append(f"not healthy: /healthz answered {healthz.summary()}")
    if not readyz.ok:
        checked.problems.append(f"not ready: /readyz answered {readyz.summary()}")
    if metrics.ok:
        checked.metrics = parse_samples(metrics.body)
    else:
        checked.problems.append(f"/metrics answered {metrics.summary()}")
    return checked


def _admin(address: str, want: int, what: str) -> list[str]:
    host, port = _split(address)
    answer = http_get(host, port, "/metrics")
    if answer.status == want:
        return []
    return [f"admin port {address}: /metrics answered {answer.summary()}, not {want} ({what})"]


def _reasons(samples: Samples, name: str, label: str) -> str:
    parts = [
        f"{labels.get(label, '?')} {value:.0f}" for labels, value in samples.matching(name) if value
    ]
    return ", ".join(parts) or "none"


def check_servers(health: Sequence[str], admin: Sequence[str]) -> int:
    """Print the findings; the number of problems."""
    print(f"konnectivity-fast doctor server: {len(health)} proxy-server(s), read from outside")
    found = [_read(address) for address in health]
    agents: dict[str, float] = {}
    for checked in found:
        m = checked.metrics
        if not len(m):
            continue
        per_strategy = {
            labels.get("proxy_strategy", "?"): value
            for labels, value in m.matching(SERVER + "ready_backends")
        }
        count = next(
            (per_strategy[s] for s in AGENT_KEYED_STRATEGIES if s in per_strategy),
            m.value(SERVER + "ready_backend_connections"),
        )
        agents[checked.address] = count
        strategies = ", ".join(f"{k} {v:.0f}" for k, v in per_strategy.items())
        checked.lines.append(
            f"agents    {count:.0f} connected (by strategy: {strategies or 'none'})"
        )
        streams = m.value(SERVER + "grpc_connections", service_method="Proxy")
        checked.lines.append(
            f"frontends gRPC streams {streams:.0f}, "
            f"HTTP-CONNECT connections {m.value(SERVER + 'http_connections'):.0f}"
        )
        checked.lines.append(
            f"tunnels   established {m.value(SERVER + 'established_connections'):.0f}, "
            f"pending dials {m.value(SERVER + 'pending_backend_dials'):.0f}"
        )
        checked.lines.append(
            "dial failures since start: " + _reasons(m, SERVER + "dial_failure_count", "reason")
        )
        if count == 0:
            checked.problems.append(
                "no agent connected: kube-apiserver's requests through this server fail with "
                '"No agent available"'
            )
        if m.value(SERVER + "full_receive_channels"):
            checked.problems.append("a stream is blocked on a full receive queue")
    if len(agents) > 1 and len(set(agents.values())) > 1:
        most = max(agents.values())
        for checked in found:
            if checked.address in agents and agents[checked.address] < most:
                checked.problems.append(
                    f"holds {agents[checked.address]:.0f} agents while another server holds "
                    f"{most:.0f}: agents do not reach every replica (a sticky or short load "
                    "balancer? run konnectivity-fast doctor lb on the agents' address)"
                )
    for checked in found:
        checked.print("proxy-server")
    problems = sum(len(c.problems) for c in found)
    for address in admin:
        for problem in _admin(address, 200, "a proxy-server's admin port serves /metrics"):
            print(f"PROBLEM: {problem}")
            problems += 1
    return problems


def check_agents(health: Sequence[str], admin: Sequence[str]) -> int:
    """Print the findings; the number of problems."""
    print(f"konnectivity-fast doctor agent: {len(health)} proxy-agent(s), read from outside")
    found = [_read(address) for address in health]
    for checked in found:
        m = checked.metrics
        if not len(m):
            continue
        held = m.value(AGENT + "open_server_connections")
        known = m.value(AGENT + "known_server_count")
        checked.lines.append(f"servers   holds {held:.0f} of the {known:.0f} it knows of")
        checked.lines.append(
            "endpoint dial failures since start: "
            + _reasons(m, AGENT + "endpoint_dial_failure_total", "reason")
        )
        if held == 0:
            checked.problems.append("holds no server connection: nothing can reach this node")
        elif held < known:
            checked.problems.append(
                f"holds {held:.0f} of {known:.0f} servers: requests through the other "
                f"{known - held:.0f} cannot reach this node; the load balancer does not spread "
                "this agent over every replica, or a replica is down (run konnectivity-fast "
                "doctor lb on the agent's --proxy-server-host:--proxy-server-port)"
            )
    for checked in found:
        checked.print("proxy-agent")
    problems = sum(len(c.problems) for c in found)
    for address in admin:
        for problem in _admin(
            address, 301, "a proxy-agent's admin /metrics moved to the health port"
        ):
            print(f"PROBLEM: {problem}")
            problems += 1
    return problems
