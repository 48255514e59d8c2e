"""Fixtures: see tests/support/net.py (re-exported), plus the scenario harness.

``arun`` runs a scenario's coroutine on a fresh loop (uvloop unless a test parametrizes
``loop_kind``) and checks for leaks: the open fds (``/proc/self/fd``, by number and
target) and the loop's tasks are recorded as the scenario starts (after grpcio's per-loop
poller exists, see ``LeakGuard``) and, once the scenario has closed its servers and peers,
nothing new may remain (reported in the fixture's teardown). Leftovers get a short bounded
settle loop (grpcio frees a channel's fds when the channel object is collected, hence
``gc.collect``); only a passing test is held to it, so a failure is not buried under its
own leaks.

``proxy_env`` starts an in-process proxy-server (``ProxyServer``, a frontend of the chosen
mode on a Unix socket or TCP+mTLS, the TLS agent listener with client certificates, the
health server) and tracks every peer a test opens through it, closing them first.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass, field
from random import Random
from typing import Any

import grpc
import grpc.aio
import pytest

from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.server.buffering import BufferBudget
from konnectivity_fast.server.health import health_routes, start_http
from konnectivity_fast.server.http_connect import (
    start_http_connect_tcp,
    start_http_connect_uds,
)
from konnectivity_fast.server.listeners import (
    ServerHandle,
    start_agent_listener,
    start_frontend_tcp,
    start_frontend_uds,
)
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire.contract import DialBalance
from tests.support.agent_peer import (
    GrpcDialer,
    HttpTunnel,
    TestAgent,
    agent_credentials,
    connect_request,
    open_http,
)
from tests.support.net import LOOPS, Certs, RunFn, certs, run, sock_dir

__all__ = ["Certs", "ProxyEnv", "RunFn", "arun", "certs", "proxy_env", "run", "sock_dir"]

# A scenario's own bound (pytest-timeout's 120 s is the outer one).
SCENARIO_TIMEOUT = 90.0
# How long leftovers may take to go after a scenario (sockets closing, tasks finishing).
SETTLE_SECONDS = 5.0
SETTLE_POLL = 0.01


# --- leak checking ------------------------------------------------------------------------


def _fd_snapshot() -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return out


@dataclass
class LeakGuard:
    """grpcio's asyncio layer opens a poller (epoll, eventfd, a socket pair) when its first
    channel connects and shuts it down, not always completely, when its last channel is
    collected. A keeper channel, connected before the baseline and closed only after the
    check, keeps that poller out of the comparison."""

    fds: set[tuple[str, str]] = field(default_factory=set)
    _dir: tempfile.TemporaryDirectory[str] | None = None
    _server: kgrpc.GrpcServer | None = None
    _channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="kf-keep-")
        path = os.path.join(self._dir.name, "k.sock")
        self._server = await kgrpc.serve(None, path=path)
        self._channel = grpc.aio.insecure_channel("unix:" + path)
        await asyncio.wait_for(self._channel.channel_ready(), 10)

    def snapshot(self) -> None:
        gc.collect()
        self.fds = _fd_snapshot()

    async def leftovers(self) -> list[str]:
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        deadline = loop.time() + SETTLE_SECONDS
        while True:
            gc.collect()
            fds = sorted(_fd_snapshot() - self.fds)
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            if not fds and not tasks:
                return []
            if loop.time() > deadline:
                return [f"fd {fd} -> {target}" for fd, target in fds] + [
                    f"task {t!r}" for t in tasks
                ]
            await asyncio.sleep(SETTLE_POLL)

    async def stop(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._dir is not None:
            self._dir.cleanup()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed


_CALL_PASSED = pytest.StashKey[bool]()


@pytest.fixture
def loop_kind() -> str:
    return "uvloop"


@pytest.fixture
def arun(request: pytest.FixtureRequest, loop_kind: str) -> Iterator[RunFn]:
    """Run coroutines on one fresh loop; teardown checks that no fd and no task is left."""
    guard = LeakGuard()
    with asyncio.Runner(loop_factory=LOOPS[loop_kind]) as runner:
        runner.run(guard.start())

        leftovers: list[str] = []

        async def guarded(coro: Coroutine[Any, Any, Any]) -> Any:
            # Baseline and check in the same run of the loop: uvloop makes a new signal
            # socket pair for each run.
            guard.snapshot()
            result = await asyncio.wait_for(coro, SCENARIO_TIMEOUT)
            leftovers.extend(await guard.leftovers())
            return result

        def run_one(coro: Coroutine[Any, Any, Any]) -> Any:
            return runner.run(guarded(coro))

        try:
            yield run_one
        finally:
            runner.run(guard.stop())
    if request.node.stash.get(_CALL_PASSED, False) and leftovers:
        pytest.fail("left after the scenario:\n  " + "\n  ".join(leftovers), pytrace=False)


# --- the in-process proxy-server ------------------------------------------------------------

METRIC_PREFIX = "konnectivity_network_proxy_server_"


def scrape() -> dict[str, float]:
    """The registry's text exposition as {series: value}, prefix dropped."""
    out: dict[str, float] = {}
    for line in server_metrics.expose().decode().splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.startswith(METRIC_PREFIX):
            out[series[len(METRIC_PREFIX) :]] = float(value)
    return out


def packets(segment: str, packet_type: str) -> str:
    """The ``stream_packets_total`` series name (labels sorted, as client_golang writes)."""
    return f'stream_packets_total{{packet_type="{packet_type}",segment="{segment}"}}'


def failures(reason: str) -> str:
    return f'dial_failure_count{{reason="{reason}"}}'


#: An expected value: the series is absent or 0 (a gauge upstream shows from its first update).
ZERO_OR_ABSENT = -1.0


def check_metrics(expected: dict[str, float | None]) -> None:
    """Every series in ``expected`` has that value (None: absent); all mismatches at once."""
    got = scrape()

    def ok(name: str, want: float | None) -> bool:
        if want == ZERO_OR_ABSENT:
            return got.get(name) in (None, 0)
        return got.get(name) == want

    wrong = [
        f"{name}: expected {want}, got {got.get(name)}"
        for name, want in expected.items()
        if not ok(name, want)
    ]
    assert not wrong, "metrics differ:\n  " + "\n  ".join(wrong)


@dataclass
class ProxyEnv:
    """A running in-process proxy-server and the peers a scenario opened through it."""

    proxy: ProxyServer
    mode: str  # "grpc" | "http-connect"
    transport: str  # "uds" | "tcp"
    certs: Certs
    uds: str | None
    frontend_port: int | None
    agent_port: int
    health_port: int
    handle: ServerHandle
    agents: list[TestAgent] = field(default_factory=list)
    dialers: list[GrpcDialer] = field(default_factory=list)
    tunnels: list[HttpTunnel] = field(default_factory=list)

    # --- agents -----------------------------------------------------------------------------

    @property
    def agent_target(self) -> str:
        return f"127.0.0.1:{self.agent_port}"

    def credentials(self) -> grpc.ChannelCredentials:
        c = self.certs
        return agent_credentials(c.ca_pem, c.client_cert_pem, c.client_key_pem)

    def new_agent(self, **kwargs: Any) -> TestAgent:
        agent = TestAgent(self.agent_target, self.credentials(), **kwargs)
        self.agents.append(agent)
        return agent

    async def agent(self, **kwargs: Any) -> TestAgent:
        return await self.new_agent(**kwargs).start()

    # --- frontends --------------------------------------------------------------------------

    def dialer(self) -> GrpcDialer:
        if self.transport == "uds":
            d = GrpcDialer(f"unix:{self.uds}", None)
        else:
            d = GrpcDialer(f"127.0.0.1:{self.frontend_port}", self.credentials())
        self.dialers.append(d)
        return d

    def client_ssl(self) -> ssl.SSLContext:
        ctx = tls.client_context(self.certs.ca, self.certs.client_cert, self.certs.client_key)
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def http_open(self) -> HttpTunnel:
        ssl_ctx = self.client_ssl() if self.transport == "tcp" else None
        tunnel = await open_http(self.uds, self.frontend_port, ssl_ctx)
        self.tunnels.append(tunnel)
        return tunnel

    async def http_connect(self, address: str, pipelined: bytes = b"") -> HttpTunnel:
        """Open a client and send CONNECT (plus ``pipelined`` bytes); no response read."""
        tunnel = await self.http_open()
        tunnel.writer.write(connect_request(address) + pipelined)
        return tunnel

    # --- health -----------------------------------------------------------------------------

    async def get(self, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.health_port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, body = response.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1]), body

    async def close_peers(self) -> None:
        for tunnel in self.tunnels:
            await tunnel.close()
        for dialer in self.dialers:
            await dialer.close()
        for agent in self.agents:
            await agent.disconnect()
        self.tunnels.clear()
        self.dialers.clear()
        self.agents.clear()


async def _peers_gone(handle: ServerHandle) -> None:
    """Wait (bounded) until the server saw every peer connection go. grpcio closes a
    channel's connections once the channel is collected; closing them from our side
    instead would wait out the TLS close_notify grace for each."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while loop.time() < deadline:
        gc.collect()
        if not any(getattr(server, "connections", None) for server in handle.servers):
            return
        await asyncio.sleep(SETTLE_POLL)


@contextlib.asynccontextmanager
async def proxy_env(
    certs: Certs,
    sock_dir: str,
    *,
    mode: str = "grpc",
    transport: str = "uds",
    strategies: tuple[str, ...] = ("default",),
    dial_timeout: float = 0.0,
    server_id: str = "scenario-server",
    server_count: int = 2,
    dial_balance: DialBalance = DialBalance.RANDOM,
    budget: BufferBudget | None = None,
) -> AsyncIterator[ProxyEnv]:
    server_metrics.reset()
    server_metrics.startup(strategies)
    proxy = ProxyServer(
        server_id=server_id,
        server_count=server_count,
        strategies=strategies,
        dial_timeout=dial_timeout,
        rng=Random(7),
        dial_balance=dial_balance,
        budget=budget,
    )
    handle = ServerHandle(proxy)
    health: asyncio.Server | None = None
    uds = os.path.join(sock_dir, "frontend.sock") if transport == "uds" else None
    try:
        frontend: Any
        if mode == "grpc" and uds is not None:
            frontend = await start_frontend_uds(proxy, uds)
        elif mode == "grpc":
            frontend = await start_frontend_tcp(
                proxy,
                host="127.0.0.1",
                port=0,
                cert_file=certs.server_cert,
                key_file=certs.server_key,
                client_ca_file=certs.ca,
            )
        elif uds is not None:
            frontend = await start_http_connect_uds(proxy, uds)
        else:
            frontend = await start_http_connect_tcp(
                proxy,
                host="127.0.0.1",
                port=0,
                cert_file=certs.server_cert,
                key_file=certs.server_key,
                client_ca_file=certs.ca,
            )
        handle.servers.append(frontend)
        agents = await start_agent_listener(
            proxy,
            host="127.0.0.1",
            port=0,
            cert_file=certs.server_cert,
            key_file=certs.server_key,
            client_ca_file=certs.ca,
        )
        handle.servers.append(agents)
        health = await start_http(
            "health", "127.0.0.1", 0, health_routes(lambda: proxy.router.ready)
        )
        assert health is not None
        agent_port = agents.sockets[0].getsockname()[1]
        frontend_port = None if uds else frontend.sockets[0].getsockname()[1]
        env = ProxyEnv(
            proxy,
            mode,
            transport,
            certs,
            uds,
            frontend_port,
            agent_port,
            health.sockets[0].getsockname()[1],
            handle,
        )
        try:
            yield env
        finally:
            await env.close_peers()
            await _peers_gone(handle)
    finally:
        if health is not None:
            health.close()
            await health.wait_closed()
        await handle.close()
