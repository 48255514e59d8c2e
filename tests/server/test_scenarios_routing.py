"""Agent selection and readiness scenarios (upstream's pkg/server/backend_manager.go,
desthost_backend_manager.go, default_route_backend_manager.go, readiness_manager.go and
cmd/server/app/server.go runHealthServer): several grpcio agents on one in-process
proxy-server, ``--proxy-strategies`` chains, DRAIN, two streams of one agent, and
``/readyz`` on the health server flipping as agents come and go. Each agent answers dials
with an error naming itself, so the frontend sees who was chosen.
"""

from __future__ import annotations

from collections import Counter

from tests.support.agent_peer import (
    DialPolicy,
    ProxyStream,
    TestAgent,
    backend,
    data,
    echo,
    wait_until,
)

from .conftest import Certs, ProxyEnv, RunFn, check_metrics, proxy_env


async def named_agent(env: ProxyEnv, name: str, identifiers: str = "", **kw: object) -> TestAgent:
    return await env.agent(
        agent_id=name, identifiers=identifiers, policy=DialPolicy.ERROR, dial_error=name, **kw
    )


async def chosen(env: ProxyEnv, address: str, random: int) -> str:
    """Which agent a dial to ``address`` went to (its error text), or the server's error."""
    stream = env.dialer().stream()
    rsp = await stream.dial(address, random)
    await stream.end()
    return str(rsp.dialResponse.error)


def ready_backends(strategy: str) -> str:
    return f'ready_backends{{proxy_strategy="{strategy}"}}'


def test_default_spreads_over_agents(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """``default``: a random agent per dial; over 60 dials every one of 3 agents is used."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env:
            for name in ("a1", "a2", "a3"):
                await named_agent(env, name)
            picks = Counter([await chosen(env, "10.0.0.1:80", 100 + i) for i in range(60)])
            assert set(picks) == {"a1", "a2", "a3"}, picks
            check_metrics({ready_backends("default"): 3, "ready_backend_connections": 3})

    arun(main())


def test_dest_host_then_default(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """``destHost,default``: an exact host/ipv4/ipv6 identifier match (port stripped) wins,
    anything else falls through to ``default``."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, strategies=("destHost", "default")) as env:
            await named_agent(env, "node-a", "host=node-a&ipv4=10.1.0.1")
            await named_agent(env, "node-b", "host=node-b&ipv6=fd00::2&cidr=10.9.0.0/16")
            assert await chosen(env, "node-a:10250", 1) == "node-a"
            assert await chosen(env, "10.1.0.1:443", 2) == "node-a"
            assert await chosen(env, "node-b:10250", 3) == "node-b"
            assert await chosen(env, "[fd00::2]:10250", 4) == "node-b"
            assert await chosen(env, "NODE-A:10250", 5) in {"node-a", "node-b"}  # default
            # cidr is parsed but unused: 10.9.1.1 is not routed by it.
            picks = {await chosen(env, "10.9.1.1:80", 10 + i) for i in range(20)}
            assert picks == {"node-a", "node-b"}
            check_metrics(
                {
                    ready_backends("destHost"): 4,  # node-a, 10.1.0.1, node-b, fd00::2
                    ready_backends("default"): 2,
                }
            )

    arun(main())


def test_dest_host_only(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """``destHost`` alone: no match means "No agent available"; an agent with no identifiers
    never makes the server ready (readiness comes from the first strategy)."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, strategies=("destHost",)) as env:
            await named_agent(env, "plain")
            assert await env.get("/readyz") == (500, b"no connection to any proxy agent")
            assert await chosen(env, "node-a:1", 1) == "No agent available"
            await named_agent(env, "node-a", "host=node-a")
            assert await env.get("/readyz") == (200, b"ok")
            assert await chosen(env, "node-a:1", 2) == "node-a"
            assert await chosen(env, "node-z:1", 3) == "No agent available"
            check_metrics(
                {ready_backends("destHost"): 1, 'dial_failure_count{reason="no_agent"}': 2}
            )

    arun(main())


def test_dest_host_then_default_route(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """``destHost,defaultRoute``: unmatched dials go only to agents that sent
    ``default-route=true``; without one, "No agent available"."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir, strategies=("destHost", "defaultRoute")) as env:
            await named_agent(env, "node-a", "host=node-a")
            await named_agent(env, "gw-off", "default-route=false")
            assert await chosen(env, "example.com:443", 1) == "No agent available"
            await named_agent(env, "gateway", "default-route=true")
            for i in range(10):
                assert await chosen(env, "example.com:443", 10 + i) == "gateway"
            assert await chosen(env, "node-a:22", 2) == "node-a"
            check_metrics({ready_backends("destHost"): 1, ready_backends("defaultRoute"): 1})

    arun(main())


def test_drain_preference(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """DRAIN marks a stream: new dials avoid it while another agent exists, fall back to it
    when all drain; its established tunnel keeps working; readiness is unchanged."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            draining = await env.agent(
                agent_id="draining", policies={"x:1": DialPolicy.ERROR}, dial_error="draining"
            )
            stream: ProxyStream = env.dialer().stream()
            connect_id = await stream.connect(echo_backend.address, 1)
            await named_agent(env, "fresh")
            await draining.send_drain()
            await wait_until(
                lambda: any(b.draining for b in env.proxy.router.backends.values()),
                "DRAIN processed",
            )
            for i in range(20):
                assert await chosen(env, "x:1", 10 + i) == "fresh"
            await stream.send(data(connect_id, b"still flowing"))
            assert await stream.read_data(connect_id, 13) == b"still flowing"
            assert await env.get("/readyz") == (200, b"ok")
            fresh = env.agents[1]
            await fresh.disconnect()
            await wait_until(lambda: len(env.proxy.router.backends) == 1, "fresh agent gone")
            assert await chosen(env, "x:1", 50) == "draining"  # the only one left
            check_metrics({ready_backends("default"): 1})

    arun(main())


def test_two_streams_of_one_agent(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """A reconnect before the old stream ends: one agentID key, two streams; dials go to the
    first until it leaves, then to the second; readiness holds throughout."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env:
            first = await env.agent(agent_id="same", policy=DialPolicy.ERROR, dial_error="first")
            await env.agent(agent_id="same", policy=DialPolicy.ERROR, dial_error="second")
            check_metrics({ready_backends("default"): 1})
            for i in range(5):
                assert await chosen(env, "x:1", i + 1) == "first"
            await first.disconnect()
            await wait_until(lambda: len(env.proxy.router.backends) == 1, "first stream gone")
            assert await chosen(env, "x:1", 9) == "second"
            assert await env.get("/readyz") == (200, b"ok")
            check_metrics({ready_backends("default"): 1})

    arun(main())


def test_readiness_flips(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """/readyz (and /ready) 500 "no connection to any proxy agent" without agents, 200 "ok"
    with one (draining too), back to 500 when the last leaves; /healthz is always 200."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env:
            not_ready = (500, b"no connection to any proxy agent")
            assert await env.get("/readyz") == not_ready
            assert await env.get("/ready") == not_ready
            assert await env.get("/healthz") == (200, b"ok")
            check_metrics({ready_backends("default"): 0, "ready_backend_connections": 0})
            one = await env.agent(agent_id="one")
            assert await env.get("/readyz") == (200, b"ok")
            two = await env.agent(agent_id="two")
            await one.send_drain()
            await one.disconnect()
            await wait_until(lambda: len(env.proxy.router.backends) == 1, "one gone")
            assert await env.get("/ready") == (200, b"ok")
            check_metrics({ready_backends("default"): 1})
            await two.close()
            await wait_until(lambda: not env.proxy.router.backends, "two gone")
            assert await env.get("/readyz") == not_ready
            assert await env.get("/healthz") == (200, b"ok")
            check_metrics(
                {
                    ready_backends("default"): 0,
                    "ready_backend_connections": 0,
                    'grpc_connections{service_method="Connect"}': 0,
                }
            )

    arun(main())
