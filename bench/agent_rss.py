"""Idle memory of a proxy-agent holding three proxy-servers: ours against upstream v0.36.0's
agent, in the same run (issue 15 item 4: ours at most ``AGENT_IDLE_RSS_BUDGET_MIB``).

Three proxy-servers (ours; both agents meet the same ones) with ``--server-count=3`` sit
behind a round-robin TCP balancer (the demo's, ``cli/demo/balancer.py``), as replicas sit
behind a load balancer in a cluster. Each agent is started with the same upstream flags
(mTLS, the balancer's address, health and admin ports on loopback), keeps connecting until
it holds all three servers (its ``open_server_connections`` metric reads 3), is left alone
``--settle`` seconds, and then its resident set is read from ``/proc/<pid>/status``:
``VmRSS`` (what ``ps``, ``top`` and a container's memory limit see first), split into
anonymous memory (``RssAnon``, the heap: the process's own) and file-backed pages
(``RssFile``, program and shared libraries, shared with any other process mapping them).
The agents take turns, the order alternating between runs; each figure is the median of
``--runs`` runs.

    .venv/bin/python -m bench.agent_rss                     # 3 runs, both agents
    .venv/bin/python -m bench.agent_rss --runs 1 --ours-only
    .venv/bin/python -m bench.agent_rss --json bench/results/agent-rss.json
    .venv/bin/python -m bench.agent_rss --leases    # as deploy/kubernetes runs the agent

``--leases`` measures the agents as the DaemonSet in ``deploy/kubernetes`` runs them: the
servers publish Leases (``--enable-lease-controller``) to a real kube-apiserver and etcd
(``scripts/build-kube.sh``, started as the tests start them: ``tests/support/kubeapi.py``),
and the agents count them (``--count-server-leases``), with the Kubernetes client and a
Lease watch running. The budget is for the default agent; with ``--leases`` the figure to
compare is the DaemonSet's memory limit, upstream's ``DAEMONSET_MEMORY_LIMIT_MIB``.

Upstream's binaries come from ``scripts/build-upstream.sh`` (``.cache/upstream``; a cold
build takes minutes). The exit code is 1 when our agent's median is over its limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench._echo_proc import ChildError
from bench._tunnel_procs import (
    LOOPBACK,
    POLL,
    READY_TIMEOUT,
    Certs,
    Proc,
    Procs,
    agent_flags,
    build_upstream,
    free_ports,
    make_certs,
    wait_ready,
)

#: The proxy-server replicas an agent holds: a small HA control plane.
SERVERS = 3
#: Issue 15's budget for our agent idle with three servers (upstream's Go agent: ~33 MiB).
AGENT_IDLE_RSS_BUDGET_MIB = 24.0
#: The agent DaemonSet's memory limit, upstream's (examples/kubernetes/konnectivity-agent.yaml
#: at v0.36.0) and ours (deploy/kubernetes/agent/konnectivity-agent.yaml): what the agent
#: counting Leases must stay under.
DAEMONSET_MEMORY_LIMIT_MIB = 30.0
#: Seconds an agent is left alone once it holds every server before its memory is read:
#: start-up is over, the connections' first keepalive exchanges are done.
SETTLE_S = 5.0
RUNS = 3
#: klog verbosity of every program: quiet logs (their buffers are not what is measured).
VERBOSITY = 0
METRIC = b"konnectivity_network_proxy_agent_open_server_connections"


@dataclass(frozen=True)
class Sample:
    agent: str  # "ours" or "upstream"
    run: int
    rss_kib: int
    anon_kib: int
    file_kib: int


def memory_kib(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) of a process, KiB."""
    fields: dict[bytes, int] = {}
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            name, _, rest = line.partition(b":")
            if name in (b"VmRSS", b"RssAnon", b"RssFile"):
                fields[name] = int(rest.split()[0])
    return fields[b"VmRSS"], fields[b"RssAnon"], fields[b"RssFile"]


def open_server_connections(health_port: int) -> int:
    """The agent's ``open_server_connections`` gauge (0 when it cannot be read yet)."""
    try:
        with urllib.request.urlopen(
            f"http://{LOOPBACK}:{health_port}/metrics", timeout=2.0
        ) as resp:
            text: bytes = resp.read()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(METRIC + b" "):
            return int(float(line.split()[1]))
    return 0


def wait_for_servers(agent: Proc, health_port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if not agent.alive():
            raise ChildError(f"{agent.name} exited before holding {SERVERS} servers")
        if open_server_connections(health_port) == SERVERS:
            return
        time.sleep(POLL)
    raise ChildError(f"{agent.name}: never held {SERVERS} servers within {READY_TIMEOUT} s")


def start_servers(
    procs: Procs,
    certs: Certs,
    folder: Path,
    extra: Sequence[str] = (),
    own_flags: Callable[[int], Sequence[str]] | None = None,
) -> list[int]:
    """Our proxy-servers, ready; their agent ports. ``extra``: more flags for each;
    ``own_flags``: a server's own flags, from its agent port."""
    agent_ports: list[int] = []
    for i in range(SERVERS):
        agent_port, health, admin = free_ports(3)
        server = procs.start(
            f"server-{i}",
            [
                sys.executable,
                "-m",
                "konnectivity_fast.server",
                f"--server-id=server-{i}",
                f"--server-count={SERVERS}",
                f"--uds-name={folder}/server-{i}.sock",
                "--server-port=0",
                f"--cluster-cert={certs.server_cert}",
                f"--cluster-key={certs.server_key}",
                f"--cluster-ca-cert={certs.ca}",
                f"--agent-bind-address={LOOPBACK}",
                f"--agent-port={agent_port}",
                f"--health-bind-address={LOOPBACK}",
                f"--health-port={health}",
                f"--admin-bind-address={LOOPBACK}",
                f"--admin-port={admin}",
                f"--v={VERBOSITY}",
                *extra,
                *(own_flags(agent_port) if own_flags else ()),
            ],
        )
        wait_ready(server, health, "/healthz")
        agent_ports.append(agent_port)
    return agent_ports


def measure_agent(
    procs: Procs,
    command: list[str],
    name: str,
    *,
    certs: Certs,
    balancer_port: int,
    settle: float,
    extra: Sequence[str] = (),
) -> tuple[int, int, int]:
    health, admin = free_ports(2)
    agent = procs.start(
        name,
        [
            *command,
            *agent_flags(certs, balancer_port, health=health, admin=admin),
            f"--v={VERBOSITY}",
            *extra,
        ],
    )
    try:
        wait_for_servers(agent, health)
        time.sleep(settle)
        if open_server_connections(health) != SERVERS:
            raise ChildError(f"{name} lost a server while settling")
        return memory_kib(agent.pid)
    finally:
        procs.stop(agent)


@contextlib.contextmanager
def kubernetes(folder: Path) -> Iterator[str]:
    """etcd and kube-apiserver on loopback, as the tests run them; the admin kubeconfig."""
    from tests.support import kubeapi

    bin_dir = kubeapi.binaries_folder()
    if bin_dir is None:
        raise ChildError("kube-apiserver and etcd are not built: run scripts/build-kube.sh")
    folder.mkdir(parents=True, exist_ok=True)
    with kubeapi.running_etcd(bin_dir, folder) as etcd_url:
        with kubeapi.running_apiserver(bin_dir, folder / "apiserver", etcd_url) as cluster:
            yield cluster.kubeconfig


def run(runs: int, settle: float, ours_only: bool, leases: bool, log_dir: Path) -> list[Sample]:
    commands = {"ours": [sys.executable, "-m", "konnectivity_fast.agent"]}
    if not ours_only:
        commands["upstream"] = [str(build_upstream() / "proxy-agent")]
    samples: list[Sample] = []
    procs = Procs(log_dir)
    with contextlib.ExitStack() as stack:
        server_extra: list[str] = []
        agent_extra: list[str] = []
        if leases:
            kubeconfig = stack.enter_context(kubernetes(log_dir / "kube"))
            server_extra = ["--enable-lease-controller", f"--kubeconfig={kubeconfig}"]
            agent_extra = ["--count-server-leases", f"--kubeconfig={kubeconfig}"]
        stack.callback(procs.kill_all)
        certs = make_certs(log_dir)
        agent_ports = start_servers(procs, certs, log_dir, server_extra)
        (balancer_port,) = free_ports(1)
        balancer = procs.start(
            "balancer",
            [
                sys.executable,
                "-m",
                "konnectivity_fast.cli.demo.balancer",
                f"--listen={LOOPBACK}:{balancer_port}",
                *(f"--backend={LOOPBACK}:{port}" for port in agent_ports),
            ],
        )
        balancer.read_line(READY_TIMEOUT)  # "balancer on ...": it accepts
        for i in range(runs):
            order = list(commands) if i % 2 == 0 else list(reversed(commands))
            for agent in order:
                rss, anon, file = measure_agent(
                    procs,
                    commands[agent],
                    f"{agent}-agent-{i}",
                    certs=certs,
                    balancer_port=balancer_port,
                    settle=settle,
                    extra=agent_extra,
                )
                samples.append(Sample(agent, i, rss, anon, file))
                print(
                    f"run {i + 1}/{runs} {agent:8s} VmRSS {rss / 1024:5.1f} MiB "
                    f"(anon {anon / 1024:5.1f}, file {file / 1024:5.1f})",
                    flush=True,
                )
    return samples


def summary(samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    """Per agent: the median of each figure, MiB."""
    out: dict[str, dict[str, float]] = {}
    for agent in sorted({s.agent for s in samples}):
        mine = [s for s in samples if s.agent == agent]
        out[agent] = {
            f"{key}_mib": round(statistics.median(getattr(s, f"{key}_kib") for s in mine) / 1024, 1)
            for key in ("rss", "anon", "file")
        }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="seconds (default 5)")
    parser.add_argument("--ours-only", action="store_true", help="skip upstream's agent")
    parser.add_argument("--leases", action="store_true", help="servers publish, agents count")
    parser.add_argument("--json", type=Path, help="write the samples and medians here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kf-agent-rss-") as tmp:
        samples = run(args.runs, args.settle, args.ours_only, args.leases, Path(tmp))
    medians = summary(samples)
    how = "counting Leases" if args.leases else "default flags"
    print(f"\nagent idle with {SERVERS} servers ({how}), median of {args.runs} runs (MiB):")
    for agent, figures in medians.items():
        print(
            f"  {agent:8s} VmRSS {figures['rss_mib']:5.1f}  anon {figures['anon_mib']:5.1f}  "
            f"file {figures['file_mib']:5.1f}"
        )
    ours = medians["ours"]["rss_mib"]
    if args.leases:
        limit, what = DAEMONSET_MEMORY_LIMIT_MIB, "DaemonSet memory limit"
    else:
        limit, what = AGENT_IDLE_RSS_BUDGET_MIB, "budget"
    verdict = "within" if ours <= limit else "OVER"
    print(f"ours: {ours} MiB, {verdict} the {limit} MiB {what}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "servers": SERVERS,
            "leases": args.leases,
            "settle_s": args.settle,
            "limit_mib": limit,
            "medians_mib": medians,
            "samples": [asdict(s) for s in samples],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0 if ours <= limit else 1


if __name__ == "__main__":
    sys.exit(main())
