"""``LeaseCounter`` (``--count-server-leases``) against a real kube-apiserver: which Leases
count (valid vs expired, label selection), the count following Leases as they are
created, renewed, deleted and expire, the last count kept while the API is unreachable,
start-up blocking until the first list, the lease metrics, ``--server-count-source``, and
an agent process that ends up holding both of two proxy-servers through their Leases
alone."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from konnectivity_fast.agent.app import SetupError
from konnectivity_fast.agent.leases import LeaseCounter, is_valid
from konnectivity_fast.agent.policy import ServerCounter
from konnectivity_fast.kube import KubeClient
from konnectivity_fast.metrics import agent as agent_metrics
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client, create_namespace, lease, micro_time
from tests.support.net import RunFn

from .conftest import Certs
from .support import LOOPBACK
from .test_app import agent_process, free_ports, get, metric, spawn, wait_for

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(180)

WAIT = 30.0  # bound on polling for the counter to see a change
PREFIX = "konnectivity_network_proxy_agent_"
DURATION = kubeapi.LEASE_DURATION


SERVERS = {"k8s-app": "konnectivity-server"}
SELECTOR = "k8s-app=konnectivity-server"


async def eventually(probe: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT):
            while not probe():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def sample(line_start: str) -> float:
    for line in agent_metrics.expose().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Clock:
    """The wall clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


async def counting(
    cluster: KubeCluster, prefix: str, body: Callable[[KubeClient, str], Awaitable[None]]
) -> None:
    client = admin_client(cluster)
    try:
        await body(client, await create_namespace(client, prefix))
    finally:
        await client.close()


# --- validity ---------------------------------------------------------------------------


def test_validity_rule() -> None:
    now = datetime.now(UTC)
    assert is_valid(lease("a", {}, renewed=now), now)
    assert is_valid(lease("a", {}, acquired=now - timedelta(seconds=29)), now)
    assert not is_valid(lease("a", {}, renewed=now - timedelta(seconds=DURATION)), now)
    # renewTime wins over acquireTime
    old = now - timedelta(hours=1)
    assert not is_valid(lease("a", {}, renewed=old, acquired=now), now)
    assert not is_valid(lease("a", {}), now)  # neither time
    assert not is_valid(lease("a", {}, renewed=now, duration=None), now)


def test_counts_valid_leases_only(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body(client: KubeClient, ns: str) -> None:
        now = datetime.now(UTC)
        hour_ago = now - timedelta(hours=1)
        for item in (
            lease("renewed", SERVERS, renewed=now),
            lease("acquired", SERVERS, acquired=now),
            lease("expired", SERVERS, renewed=hour_ago),
            lease("expired-acquired", SERVERS, acquired=hour_ago),
            lease("no-time", SERVERS),
            lease("other-label", {"k8s-app": "other"}, renewed=now),
            lease("no-label", {}, renewed=now),
        ):
            await client.create_lease(ns, item)
        counter = LeaseCounter(ns, SELECTOR, client=client)
        await counter.start()
        try:
            assert counter.count() == 2
        finally:
            await counter.close()

    run(counting(kube_cluster, "count", body))


def test_no_valid_lease_counts_as_one(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body(client: KubeClient, ns: str) -> None:
        await client.create_lease(
            ns, lease("expired", SERVERS, renewed=datetime.now(UTC) - timedelta(hours=1))
        )
        counter = LeaseCounter(ns, SELECTOR, client=client)
        await counter.start()
        try:
            assert counter.count() == 1
        finally:
            await counter.close()

    run(counting(kube_cluster, "zero", body))


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("k8s-app=konnectivity-server", 3),
        ("k8s-app=konnectivity-server,zone=a", 2),
        ("k8s-app=konnectivity-server, zone != a", 1),
        ("zone in (a, b)", 4),
        ("zone notin (a), k8s-app in (konnectivity-server)", 1),
        ("k8s-app", 4),
        ("", 5),
    ],
)
def test_label_selection(
    kube_cluster: KubeCluster, run: RunFn, selector: str, expected: int
) -> None:
    async def body(client: KubeClient, ns: str) -> None:
        now = datetime.now(UTC)
        for name, labels in (
            ("s1", {**SERVERS, "zone": "a"}),
            ("s2", {**SERVERS, "zone": "a"}),
            ("s3", {**SERVERS, "zone": "b"}),
            ("other", {"k8s-app": "other", "zone": "b"}),
            ("bare", {}),
        ):
            await client.create_lease(ns, lease(name, labels, renewed=now))
        counter = LeaseCounter(ns, selector, client=client)
        await counter.start()
        try:
            assert counter.count() == expected
        finally:
            await counter.close()

    run(counting(kube_cluster, "select", body))


# --- following changes ------------------------------------------------------------------


def test_count_follows_leases(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body(client: KubeClient, ns: str) -> None:
        clock = Clock()
        counter = LeaseCounter(ns, SELECTOR, client=client, now=clock)
        await counter.start()
        try:
            assert counter.count() == 1  # none yet
            now = datetime.now(UTC)
            for i in range(3):
                await client.create_lease(ns, lease(f"s{i}", SERVERS, renewed=now))
            await eventually(lambda: counter.count() == 3, "3 leases created")
            await client.delete_lease(ns, "s0")
            await eventually(lambda: counter.count() == 2, "a lease deleted")
            # A label change takes a Lease out of the selection.
            s1 = await client.get_lease(ns, "s1")
            s1["metadata"]["labels"] = {"k8s-app": "retired"}
            await client.update_lease(ns, s1)
            await eventually(lambda: counter.count() == 1, "a lease relabelled")
            # Expiry needs no event: s2 is not renewed and time passes.
            clock.offset = timedelta(seconds=DURATION + 1)
            assert counter.count() == 1  # none valid: counted as 1
            later = now + timedelta(seconds=DURATION)
            for name in ("late1", "late2"):
                await client.create_lease(ns, lease(name, SERVERS, renewed=later))
            await eventually(lambda: counter.count() == 2, "two leases renewed later")
            # Renewing s2 brings it back.
            s2 = await client.get_lease(ns, "s2")
            s2["spec"]["renewTime"] = micro_time(later)
            await client.update_lease(ns, s2)
            await eventually(lambda: counter.count() == 3, "a lease renewed")
        finally:
            await counter.close()

    run(counting(kube_cluster, "follow", body))


@pytest.mark.parametrize(
    ("source", "header", "expected"),
    [("default", 5, 2), ("", 5, 2), ("max", 5, 5), ("max", 1, 2), ("default", 0, 2)],
)
def test_server_count_source(
    kube_cluster: KubeCluster, run: RunFn, source: str, header: int, expected: int
) -> None:
    async def body(client: KubeClient, ns: str) -> None:
        now = datetime.now(UTC)
        for i in range(2):
            await client.create_lease(ns, lease(f"s{i}", SERVERS, renewed=now))
        leases = LeaseCounter(ns, SELECTOR, client=client)
        await leases.start()
        try:
            counter = ServerCounter(leases.count, source)
            counter.last_received = header
            assert counter.count() == expected
        finally:
            await leases.close()

    run(counting(kube_cluster, "source", body))


# --- metrics and failures ---------------------------------------------------------------


def test_list_and_watch_metrics(kube_cluster: KubeCluster, run: RunFn) -> None:
    ok = f'{PREFIX}lease_lists_total{{http_response_code="200",reason=""}}'
    latency = f'{PREFIX}lease_list_latency_seconds_count{{http_response_code="200"}}'

    async def body(client: KubeClient, ns: str) -> None:
        agent_metrics.reset()
        counter = LeaseCounter(ns, SELECTOR, client=client)
        await counter.start()
        try:
            assert sample(ok) == 1 and sample(latency) == 1
            # The first watch event marks the watch opened: counted as a list (upstream).
            await client.create_lease(ns, lease("s1", SERVERS, renewed=datetime.now(UTC)))
            await eventually(lambda: sample(ok) == 2, "the watch counted")
            assert sample(latency) == 1  # a watch has no latency sample
            text = agent_metrics.expose().decode()
            assert f"{PREFIX}lease_watches_total{{" not in text
        finally:
            await counter.close()

    run(counting(kube_cluster, "metrics", body))


def test_forbidden_list_blocks_start(kube_cluster: KubeCluster, run: RunFn) -> None:
    """A user without RBAC rights: start-up waits, each refused list counted as 403."""
    forbidden = f'{PREFIX}lease_lists_total{{http_response_code="403",reason="Forbidden"}}'
    latency = f'{PREFIX}lease_list_latency_seconds_count{{http_response_code="403"}}'

    async def body() -> None:
        agent_metrics.reset()
        counter = LeaseCounter(
            "kube-system", SELECTOR, kubeconfig=kube_cluster.user_kubeconfig("kf-nobody")
        )
        starting = asyncio.get_running_loop().create_task(counter.start())
        try:
            await eventually(lambda: sample(forbidden) >= 2, "two refused lists")
            assert sample(latency) >= 2
            assert not starting.done()
            assert counter.count() == 1
        finally:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            await counter.close()

    run(body())


def test_config_errors_name_upstreams_words(tmp_path: Path, run: RunFn) -> None:
    bad = tmp_path / "bad.kubeconfig"
    bad.write_text("not: [a kubeconfig\n")
    with pytest.raises(SetupError, match=r"^failed to load kubernetes client config: "):
        run(LeaseCounter("ns", SELECTOR, kubeconfig=str(bad)).start())


class TcpRelay:
    """A TCP relay on a loopback port, in its own thread, to ``targets`` in turn. It can be
    cut (every connection closed, new ones closed at once: the API server is unreachable)
    and restored."""

    def __init__(self, *targets: int) -> None:
        self.targets = targets
        self._next = 0
        self._cut = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

        async def listen() -> asyncio.Server:
            return await asyncio.start_server(self._handle, LOOPBACK, 0)

        self._server: asyncio.Server = self._call(listen())
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _call(self, coro: Awaitable[Any]) -> Any:
        async def wrap() -> Any:
            return await coro

        return asyncio.run_coroutine_threadsafe(wrap(), self._loop).result(WAIT)

    def up(self) -> None:
        self._cut = False

    def down(self) -> None:
        async def cut() -> None:
            self._cut = True
            async with asyncio.timeout(WAIT):
                while self._tasks or self._writers:
                    for writer in list(self._writers):
                        writer.close()
                    await asyncio.sleep(0.05)

        self._call(cut())

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        self.down()
        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(WAIT)
        self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            if self._cut:
                return
            target = self.targets[self._next % len(self.targets)]
            self._next += 1
            try:
                up_reader, up_writer = await asyncio.open_connection(LOOPBACK, target)
            except OSError:
                return
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._writers.discard(writer)


@contextlib.contextmanager
def relayed_kubeconfig(cluster: KubeCluster, tmp: Path) -> Iterator[tuple[TcpRelay, str]]:
    """The admin kubeconfig, pointed at a relay in front of the API server."""
    port = int(cluster.server.rsplit(":", 1)[1])
    relay = TcpRelay(port)
    text = Path(cluster.kubeconfig).read_text()
    assert cluster.server in text
    path = tmp / "relayed.kubeconfig"
    path.write_text(text.replace(cluster.server, f"https://127.0.0.1:{relay.port}"))
    try:
        yield relay, str(path)
    finally:
        relay.close()


def test_last_count_kept_while_api_unreachable(
    kube_cluster: KubeCluster, run: RunFn, tmp_path: Path
) -> None:
    transport_latency = f'{PREFIX}lease_list_latency_seconds_count{{http_response_code="200"}}'

    async def body(client: KubeClient, ns: str) -> None:
        now = datetime.now(UTC)
        for i in range(2):
            await client.create_lease(ns, lease(f"s{i}", SERVERS, renewed=now))
        with relayed_kubeconfig(kube_cluster, tmp_path) as (relay, kubeconfig):
            agent_metrics.reset()
            counter = LeaseCounter(ns, SELECTOR, kubeconfig=kubeconfig)
            await counter.start()
            try:
                assert counter.count() == 2
                await asyncio.to_thread(relay.down)
                # The watch breaks; re-lists fail at the transport (latency only, as 200).
                await eventually(lambda: sample(transport_latency) >= 2, "a failed re-list")
                await client.delete_lease(ns, "s0")
                assert counter.count() == 2  # the last Leases seen still count
                await asyncio.to_thread(relay.up)
                await eventually(lambda: counter.count() == 1, "the count after recovery")
            finally:
                await counter.close()

    run(counting(kube_cluster, "outage", body))


# --- the agent process ------------------------------------------------------------------


@contextlib.contextmanager
def lease_server(
    certs: Certs, sock_dir: str, tmp: Path, server_id: str, lease_args: list[str]
) -> Iterator[int]:
    """A proxy-server publishing its Lease (no --server-count); yields its agent port."""
    agent_port, health, admin = free_ports(3)
    args = [
        sys.executable,
        "-m",
        "konnectivity_fast.server",
        f"--uds-name={sock_dir}/{server_id}.sock",
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
        f"--server-id={server_id}",
        "--enable-lease-controller",
        *lease_args,
    ]
    with spawn(args, tmp / f"{server_id}.log") as proc:
        wait_for(lambda: get(health, "/healthz")[0] == 200, "server health", proc.proc, proc.log)
        yield agent_port


def test_agent_holds_every_leased_server(
    kube_cluster: KubeCluster, certs: Certs, sock_dir: str, tmp_path: Path
) -> None:
    async def namespace() -> str:
        client = admin_client(kube_cluster)
        try:
            return await create_namespace(client, "agent")
        finally:
            await client.close()

    ns = asyncio.run(namespace())
    lease_args = [
        f"--lease-namespace={ns}",
        "--lease-label=k8s-app=kf-agent-test",
        f"--kubeconfig={kube_cluster.kubeconfig}",
    ]
    with (
        lease_server(certs, sock_dir, tmp_path, "srv-l1", lease_args) as port1,
        lease_server(certs, sock_dir, tmp_path, "srv-l2", lease_args) as port2,
        round_robin(port1, port2) as port,
    ):
        with agent_process(
            certs, tmp_path, port, "--sync-interval=200ms", "--count-server-leases", *lease_args
        ) as agent:
            health = agent.health

            def holds_both() -> bool:
                return (
                    metric(health, "known_server_count") == 2
                    and metric(health, "open_server_connections") == 2
                )

            wait_for(holds_both, "the agent holding both servers", agent.proc.proc, agent.proc.log)
            text = get(health, "/metrics")[2].decode()
            assert f'{PREFIX}lease_lists_total{{http_response_code="200",reason=""}}' in text


@contextlib.contextmanager
def round_robin(*targets: int) -> Iterator[int]:
    """One loopback port spreading connections over ``targets`` in turn."""
    relay = TcpRelay(*targets)
    try:
        yield relay.port
    finally:
        relay.close()
