"""How long the admin port's tunnel listing takes with many tunnels open (issue 13 item 4:
10,000 tunnels in under 100 ms).

It builds the proxy-server's real routing state (``ProxyServer``, its ``Router``, every
tunnel dialled and established through the router's packet API, from agents spread over
``--agents`` streams, with byte counters and a buffer per frontend, as the data path leaves
them) and the proxy-agent's (``AgentClient`` objects holding ``Endpoint`` objects), with no
sockets, then times the admin routes themselves (``tunnels_handler``: query parsing, the
listing, the JSON encoding) and one request through the admin HTTP server on loopback.

    .venv/bin/python -m bench.tunnel_listing                        # 10k and 100k tunnels
    .venv/bin/python -m bench.tunnel_listing --tunnels 10000 --repeat 50

Each figure is the median (and the slowest) of ``--repeat`` calls, wall time, with the
garbage collector left on (it runs in production too).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.clientset import ClientSet
from konnectivity_fast.agent.connect import ClientConfig
from konnectivity_fast.agent.endpoint import Endpoint, EndpointPool
from konnectivity_fast.agent.tunnel_list import tunnels_handler as agent_handler
from konnectivity_fast.server.buffering import TunnelBuffer
from konnectivity_fast.server.health import admin_routes
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.server.tunnel_list import tunnels_handler as server_handler
from konnectivity_fast.transport.http import Handler, Request, start_http
from konnectivity_fast.tunnel import AgentIdentifiers, FrontendMode
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH
from konnectivity_fast.wire.packets import DialRequest, DialResponse, Packet, PacketType

#: The issue's target for 10,000 tunnels.
TARGET_MS = 100.0
QUERIES = ("", "sort=age", "limit=1000", "agent=agent-7")


class FakeCall:
    """A gRPC frontend call as the listing sees it: its sink and its queue."""

    __slots__ = ("pending", "sink")

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.sink = FakeSink(TunnelBuffer(self.outbound_pending))

    def outbound_pending(self) -> int:
        return self.pending


@dataclass
class FakeSink:
    buffer: TunnelBuffer
    source_paused: bool = False


def build_server(tunnels: int, agents: int, loop: asyncio.AbstractEventLoop) -> ProxyServer:
    """A proxy-server holding ``tunnels`` established gRPC tunnels over ``agents`` agents."""
    rng = Random(1)
    proxy = ProxyServer(server_id="bench", rng=Random(2), loop=loop)
    router = proxy.router
    backends = [router.add_backend(f"agent-{i}", AgentIdentifiers()) for i in range(agents)]
    next_id = dict.fromkeys(backends, 1)
    for random in range(1, tunnels + 1):
        frontend = router.add_frontend(FrontendMode.GRPC, FakeCall(rng.randrange(1 << 20)))
        dial = Packet(PacketType.DIAL_REQ, DialRequest("tcp", f"10.0.{random % 250}.1:443", random))
        (send,) = router.receive_from_frontend(frontend, dial, float(random))
        backend = send.backend  # type: ignore[attr-defined]
        connect_id = next_id[backend]
        next_id[backend] += 1
        answer = Packet(PacketType.DIAL_RSP, DialResponse(connect_id=connect_id, random=random))
        router.receive_from_agent(backend, answer, float(random))
        frontend.bytes_up = rng.randrange(1 << 30)
        frontend.bytes_down = rng.randrange(1 << 30)
    return proxy


def build_agent(tunnels: int, servers: int) -> ClientSet:
    """A proxy-agent with ``tunnels`` endpoints over ``servers`` server connections."""
    rng = Random(3)
    config = ClientConfig("bench", 1, ssl.create_default_context(), "agent-bench")
    pool = EndpointPool()
    clients = ClientSet(config)
    for index in range(servers):
        client = AgentClient(config, pool)
        client.server_id = f"server-{index}"
        clients.clients[client.server_id] = client
    owners = list(clients.clients.values())
    for connect_id in range(1, tunnels + 1):
        owner = owners[connect_id % servers]
        endpoint = Endpoint(pool, owner, connect_id, f"10.1.{connect_id % 250}.1:80", connect_id)
        endpoint.bytes_up = rng.randrange(1 << 30)
        endpoint.bytes_down = rng.randrange(1 << 30)
        owner.endpoints[connect_id] = endpoint
    return clients


def timed(handler: Handler, query: str, repeat: int) -> tuple[float, float, int]:
    """Median and slowest call, in ms, and the answer's size."""
    request = Request("GET", ADMIN_TUNNELS_PATH, query, {})
    times = []
    size = 0
    for _ in range(repeat):
        start = time.perf_counter()
        status, _, body, _ = handler(request)
        times.append((time.perf_counter() - start) * 1000)
        assert status == 200, body
        size = len(body)
    return statistics.median(times), max(times), size


async def over_http(handler: Handler, repeat: int) -> tuple[float, float]:
    """One GET through the admin HTTP server on loopback, ``repeat`` times."""
    server = await start_http("admin", "127.0.0.1", 0, admin_routes(handler))
    assert server is not None
    port = server.sockets[0].getsockname()[1]
    times = []
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {ADMIN_TUNNELS_PATH} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            body = await reader.read()
            times.append((time.perf_counter() - start) * 1000)
            writer.close()
            assert body.startswith(b"HTTP/1.1 200 "), body[:80]
    finally:
        server.close()
        await server.wait_closed()
    return statistics.median(times), max(times)


def report(label: str, figures: tuple[float, ...], size: int | None, tunnels: int) -> None:
    median, worst = figures[0], figures[1]
    verdict = ""
    if tunnels == 10_000:
        verdict = "  ok" if worst < TARGET_MS else f"  OVER {TARGET_MS:g} ms"
    weight = f"{size / 1024:7.1f} KiB" if size is not None else " " * 11
    print(f"  {label:<34} median {median:7.2f} ms  slowest {worst:7.2f} ms  {weight}{verdict}")


async def bench(tunnels: int, peers: int, repeat: int) -> None:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    proxy = build_server(tunnels, peers, loop)
    clients = build_agent(tunnels, max(1, peers // 100))
    built = time.perf_counter() - start
    print(f"{tunnels:,} tunnels over {peers} agents (state built in {built:.1f} s):")
    handlers: list[tuple[str, Callable[[], Handler]]] = [
        ("proxy-server", lambda: server_handler(proxy)),
        ("proxy-agent", lambda: agent_handler("agent-bench", clients)),
    ]
    for program, make in handlers:
        handler = make()
        for asked in QUERIES:
            # The agent filters on its servers.
            query = "server=server-0" if program == "proxy-agent" and "agent=" in asked else asked
            median, worst, size = timed(handler, query, repeat)
            report(f"{program} ?{query}", (median, worst), size, tunnels)
    median, worst = await over_http(server_handler(proxy), repeat)
    report("proxy-server GET over loopback", (median, worst), None, tunnels)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tunnel_listing", description=__doc__)
    parser.add_argument("--tunnels", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--agents", type=int, default=500, help="agents the tunnels spread on")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    print(f"tunnel listing benchmark, Python {sys.version.split()[0]}")
    for tunnels in args.tunnels:
        asyncio.run(bench(tunnels, args.agents, args.repeat))
    return 0


if __name__ == "__main__":
    sys.exit(main())
