"""The demo from start to end: set up, start the programs, carry traffic through both
frontends, read health and metrics, stop (or keep) everything.

Invariants: every process started is stopped and the namespaces removed on every way out
(success, failure, Ctrl-C, SIGTERM) unless ``--keep`` was asked and everything worked; the
exit code is 0 only when every step worked and the programs' own counters show the bytes
went through a proxy-server and a proxy-agent in both modes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import konnectivity_fast
from konnectivity_fast.cli.demo import layout as layout_mod
from konnectivity_fast.cli.demo import netns
from konnectivity_fast.cli.demo.observe import (
    Observer,
    check_counters,
    print_counters,
    print_health,
)
from konnectivity_fast.cli.demo.pki import make_pki
from konnectivity_fast.cli.demo.procs import Proc, Processes, write_state
from konnectivity_fast.cli.demo.report import Out
from konnectivity_fast.cli.demo.traffic import ModeResult, exercise
from konnectivity_fast.cli.demo.tunnels import TunnelError
from konnectivity_fast.wire.contract import FrontendMode

__all__ = ["DemoFailure", "DemoOptions", "run_demo"]

# Bound on the programs starting and the agents holding every server.
READY_SECONDS = 45.0
POLL_SECONDS = 0.1
# The demo's folder holds Unix sockets (at most 108 bytes a path, "http-connect.sock" in it).
MAX_FOLDER_CHARS = 80
# The shell's convention for a program ended by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
MODE_TITLES = {
    FrontendMode.GRPC: "gRPC frontend (/ProxyService/Proxy, as konnectivity-client speaks it)",
    FrontendMode.HTTP_CONNECT: "HTTP-CONNECT frontend (CONNECT host:port, kube-apiserver's egress)",
}


def _tool() -> str:
    """How to run ``konnectivity-fast`` from a shell here."""
    found = shutil.which("konnectivity-fast")
    beside = Path(sys.executable).parent / "konnectivity-fast"
    if found:
        return "konnectivity-fast"
    if beside.is_file():
        return str(beside)
    return f"{sys.executable} -m konnectivity_fast.cli.main"


def _where(place: layout_mod.Place) -> str:
    return f"in namespace {place.netns}: " if place.netns else ""


class DemoFailure(Exception):
    """A step failed; the text says which and why."""


@dataclass(frozen=True)
class DemoOptions:
    topology: str = "local"
    keep: bool = False


def _child_env() -> dict[str, str]:
    """The programs run the code this demo runs, and only with the compiled core."""
    root = str(Path(konnectivity_fast.__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root,
        "KONNECTIVITY_FAST_REQUIRE_COMPILED": "1",
    }


class Demo:
    def __init__(self, options: DemoOptions, out: Out) -> None:
        self.options = options
        self.out = out
        # Short: Unix socket paths must stay under 108 bytes (a long $TMPDIR would not).
        self.folder = Path(tempfile.mkdtemp(prefix="kf-demo-"))
        if len(str(self.folder)) > MAX_FOLDER_CHARS:
            self.folder.rmdir()
            self.folder = Path(tempfile.mkdtemp(prefix="kf-demo-", dir="/tmp"))
        net = netns.Network() if options.topology == "remote" else None
        self.layout = (
            layout_mod.remote_layout(self.folder, net)
            if net is not None
            else layout_mod.local_layout(self.folder)
        )
        self.procs = Processes(self.folder, keep=options.keep, env=_child_env())
        self.by_name: dict[str, Proc] = {}
        self.observer = Observer(self.layout)

    # --- setting up -------------------------------------------------------------------

    def start(self, name: str, argv: list[str]) -> Proc:
        proc = self.procs.start(name, argv)
        self.by_name[name] = proc
        return proc

    async def wait(self, what: str, check: object) -> None:
        """Poll ``check()`` until true; fail when a process died or READY_SECONDS pass."""
        assert callable(check)
        deadline = time.monotonic() + READY_SECONDS
        while True:
            dead = self.procs.dead()
            if dead:
                raise DemoFailure(
                    f"{dead[0].name} exited while waiting for {what}:\n{dead[0].log_tail()}"
                )
            if await asyncio.to_thread(check):
                return
            if time.monotonic() > deadline:
                raise DemoFailure(f"{what}: not within {READY_SECONDS:.0f} s")
            await asyncio.sleep(POLL_SECONDS)

    async def set_up(self) -> None:
        out, lay = self.out, self.layout
        out.section("Setting up")
        if lay.network is not None:
            busy = netns.busy_namespaces(lay.network)
            if busy:
                raise DemoFailure(
                    f"namespaces {', '.join(busy)} hold processes: another remote demo runs "
                    "(a --keep one?); stop it first with the --stop command it printed"
                )
            netns.up(lay.network)
            net = lay.network
            workers = ", ".join(f"{n} {a}" for n, a, _ in net.worker_addresses)
            out.row(
                "network namespaces",
                f"{net.cp} {net.cp_address} (control plane), {workers}",
                f"{net.lb} forwards nothing: HAProxy there is the only way from a worker to the",
                "control plane, and nothing on the control plane can reach a worker",
            )
        pki = make_pki(self.folder / "pki", lay.server_names)
        out.row(
            "certificates", f"throwaway CA, server and agent certificates in {self.folder / 'pki'}"
        )
        for backend in lay.backends:
            proc = self.start(f"backend {backend.name}", lay.backend_argv(backend))
            out.row(
                "backend",
                f"pid {proc.pid:<7} http://{backend.address}",
                f"{_where(backend.place)}{backend.name}, a kubelet stand-in (/healthz, /bulk)",
            )
        for server in lay.servers:
            proc = self.start(f"proxy-server {server.mode}", lay.server_argv(server, pki))
            out.row(
                "proxy-server",
                f"pid {proc.pid:<7} --mode={server.mode} --server-id={server.server_id}",
                f"{_where(server.place)}frontend unix:{server.uds}",
                f"agents {server.agent_host}:{server.agent_port}, health :{server.health_port}, "
                f"admin :{server.admin_port}",
            )
        await self.wait("the proxy-servers' /healthz", self.observer.servers_healthy)
        self.start_balancer()
        for agent in lay.agents:
            proc = self.start(f"proxy-agent {agent.agent_id}", lay.agent_argv(agent, pki))
            identifiers = f", --agent-identifiers={agent.identifiers}" if agent.identifiers else ""
            out.row(
                "proxy-agent",
                f"pid {proc.pid:<7} --agent-id={agent.agent_id}{identifiers}",
                f"{_where(agent.place)}dials {agent.proxy_host}:{agent.proxy_port}, "
                f"health :{agent.health_port}, admin :{agent.admin_port}",
            )
        async with out.step("agents connecting") as done:
            started = time.monotonic()
            await self.wait("every agent on every server", self.observer.all_connected)
            n = len(lay.agents)
            took = time.monotonic() - started
            done(f"each of the {n} agents holds all {len(lay.servers)} servers ({took:.1f} s)")
        if lay.network is not None:
            routes = ", ".join(
                f"{a.identifiers.partition('=')[2]} -> {a.agent_id}" for a in lay.agents
            )
            out.row("routing", f"--proxy-strategies={lay.strategies}: {routes}")

    def start_balancer(self) -> None:
        lay, out = self.layout, self.out
        listen = ", ".join(f"{h}:{p}" for h, p in lay.lb_listen)
        if lay.network is None:
            proc = self.start("balancer", lay.balancer_argv())
            out.row(
                "load balancer",
                f"pid {proc.pid:<7} {listen} -> the servers' agent ports, round robin",
                "stands in for HAProxy or a cloud load balancer",
            )
            return
        config = self.folder / "haproxy.cfg"
        servers = [(s.server_id, s.agent_host, s.agent_port) for s in lay.servers]
        config.write_text(netns.haproxy_config(lay.network, servers, lay.lb_listen[0][1]))
        proc = self.start("haproxy", lay.lb_place.argv(["haproxy", "-db", "-f", str(config)]))
        out.row(
            "HAProxy",
            f"pid {proc.pid:<7} {listen} -> the servers' agent ports",
            f"in {lay.network.lb}, balance roundrobin",
        )

    # --- traffic ------------------------------------------------------------------------

    async def traffic(self) -> dict[str, ModeResult]:
        results: dict[str, ModeResult] = {}
        targets = [b.address for b in self.layout.backends]
        for server in self.layout.servers:
            self.out.section(MODE_TITLES[FrontendMode(server.mode)])
            before = await asyncio.to_thread(self.observer.agent_dials)
            result = results[server.mode] = ModeResult()
            try:
                await exercise(self.out, server.mode, server.uds, targets, result)
            except (TunnelError, OSError, TimeoutError) as exc:
                raise DemoFailure(f"{server.mode}: {exc}") from None
            after = await asyncio.to_thread(self.observer.agent_dials)
            carried = ", ".join(
                f"{agent} {after[agent] - before.get(agent, 0):.0f}" for agent in after
            )
            pid = self.by_name[f"proxy-server {server.mode}"].pid
            self.out.row(
                "carried by",
                f"server {server.server_id} (pid {pid})",
                f"tunnels per agent (their dial counters): {carried}",
            )
        return results

    # --- the end ------------------------------------------------------------------------

    def keep(self) -> None:
        out, lay = self.out, self.layout
        extra: dict[str, object] = {"topology": lay.kind}
        if lay.network is not None:
            extra["namespaces"] = lay.network.names
        write_state(self.folder, self.procs.started, extra)
        out.section("Left running (--keep). Try by hand:")
        for line in self.by_hand():
            out.line(f"  {line}")
        out.line(f"Stop everything: {_tool()} demo --stop={self.folder}")

    def by_hand(self) -> list[str]:
        """Commands a person can paste, each tested by tests/cli/test_demo.py."""
        lay, tool = self.layout, _tool()
        target = lay.backends[0].address
        lines = [
            "# a request through the HTTP-CONNECT frontend (curl cannot CONNECT on a Unix socket):"
        ]
        lines += [
            f"{sys.executable} -m konnectivity_fast.cli.demo.through -i --uds={s.uds} "
            f"http://{target}/healthz"
            for s in lay.servers
            if s.mode == FrontendMode.HTTP_CONNECT
        ]
        lines.append("# the programs' metrics, servers then agents:")
        for place, port in [(s.place, s.health_port) for s in lay.servers] + [
            (a.place, a.health_port) for a in lay.agents
        ]:
            lines.append(
                place.shell(f"curl -s http://127.0.0.1:{port}/metrics | grep ^konnectivity")
            )
        pki = self.folder / "pki"
        agent = lay.agents[0]
        lines.append("# the doctor: the load balancer as an agent sees it, then the programs:")
        tls = f"--ca-cert={pki}/ca.pem --agent-cert={pki}/agent.pem --agent-key={pki}/agent-key.pem"
        address = f"{agent.proxy_host}:{agent.proxy_port}"
        lines.append(agent.place.shell(f"{tool} doctor lb --address={address} {tls}"))
        health = " ".join(f"--health=127.0.0.1:{s.health_port}" for s in lay.servers)
        lines.append(lay.servers[0].place.shell(f"{tool} doctor server {health}"))
        for a in lay.agents if lay.network is not None else lay.agents[:1]:
            agents = (
                f"--health=127.0.0.1:{a.health_port}"
                if lay.network is not None
                else " ".join(f"--health=127.0.0.1:{b.health_port}" for b in lay.agents)
            )
            lines.append(a.place.shell(f"{tool} doctor agent {agents}"))
        lines.append(f"# logs: {self.folder}/*.log")
        return lines

    def tear_down(self) -> None:
        # Another Ctrl-C or SIGTERM must not cut the clean-up short.
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            stopped = self.procs.stop_all()
            if self.layout.network is not None:
                netns.down(self.layout.network)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.out.section(
            f"Stopped {stopped} processes; none is left"
            + (" and the namespaces are removed" if self.layout.network else "")
        )


async def run_demo(options: DemoOptions, out: Out) -> int:
    demo = Demo(options, out)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    ok = kept = interrupted = False
    out.line(
        f"konnectivity-fast demo ({options.topology} topology): the real proxy-server and "
        "proxy-agent programs, as processes"
    )
    try:
        await demo.set_up()
        results = await demo.traffic()
        scrapes = await asyncio.to_thread(demo.observer.scrape_all)
        print_health(out, demo.observer, scrapes, demo.by_name)
        print_counters(out, demo.observer, scrapes)
        problems = check_counters(demo.layout, scrapes, results)
        for problem in problems:
            out.line(f"  PROBLEM: {problem}")
        ok = not problems
        if ok and options.keep:
            demo.keep()
            kept = True
    except DemoFailure as exc:
        out.line(f"\ndemo: FAILED: {exc}")
    except netns.NetnsError as exc:
        out.line(f"\ndemo: FAILED setting up the network namespaces: {exc}")
    except Exception:  # a bug: say so, with where, and still clean up
        out.line(f"\ndemo: FAILED with an unexpected error:\n{traceback.format_exc()}")
    except asyncio.CancelledError:
        interrupted = True
        out.line("\ndemo: interrupted")
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if not kept:
            demo.tear_down()
            if ok:
                shutil.rmtree(demo.folder, ignore_errors=True)
            else:
                out.line(f"logs: {demo.folder}")
    if ok:
        out.line("\ndemo: OK: every request above went through a real proxy-server and proxy-agent")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if ok else 1
