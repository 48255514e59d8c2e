"""Direct endpoints through the server Leases, against a real kube-apiserver
(docs/high-availability.md, "Direct endpoints: the server side").

- ``LeaseController`` in process: its Lease carries ``konnectivity-fast.io/agent-endpoint``
  (and whatever annotations others wrote stay), loses it when the controller has none, and
  each GC list feeds a ``ServerDirectory``.
- Two ``proxy-server`` programs with ``--enable-lease-controller`` and different
  ``--agent-advertise-address``: each Lease carries its server's address, each server
  tells an agent that offers ``server-endpoints.v1`` about both, and also about a third
  (foreign) Lease until that one expires; a server stopped (its Lease deleted) drops out
  of the other's header. (That two live servers never lose each other between lists is
  shown with upstream's periods on a clock in tests/server/test_directory.py.)
- Our ``proxy-agent`` program with ``--server-discovery=headers``, given one server's
  address only, connects to both servers (the agent side of the same contract).

The programs keep upstream's periods (GC list every 15 s), so the waits below are bounded
by those.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from konnectivity_fast.kube import KubeClient
from konnectivity_fast.server.directory import ServerDirectory
from konnectivity_fast.server.leases import GC_PERIOD, JITTER, LeaseController, lease_name
from konnectivity_fast.wire.endpoints import (
    AGENT_ENDPOINT_ANNOTATION,
    MD_SERVER_ENDPOINTS,
    PEER_ENDPOINT_ANNOTATION,
    Address,
    parse_server_endpoints,
)
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client, create_namespace
from tests.support.net import Certs, RunFn

from .test_app import LOOPBACK, WAIT_SECONDS, Running, command, free_ports, get, wait_healthy
from .test_server_endpoints import connect_headers

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(180)

LABELS = {"k8s-app": "kf-endpoints"}
LABEL = "k8s-app=kf-endpoints"
WAIT = 30.0  # polling bound for an in-process loop's effect
# A server learns of the others' Leases at its GC list: one period and its jitter, plus
# room for a slow shared machine.
LIST_BOUND = GC_PERIOD * (1 + JITTER) + 15.0
# A foreign Lease that must be listed while valid, then expire on its own: long enough to
# cover both servers' start and a second GC list (the first server sees the second only
# then), short enough to keep the test's wait reasonable.
SHORT_LEASE_SECONDS = 45


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, bound: float = WAIT) -> Any:
    async with asyncio.timeout(bound):
        while not (result := await probe()):
            await asyncio.sleep(0.2)
        return result
    raise AssertionError(what)  # pragma: no cover (the timeout raises first)


async def annotations_of(client: KubeClient, ns: str, name: str) -> dict[str, str]:
    return dict((await client.get_lease(ns, name))["metadata"].get("annotations") or {})


# --- the controller, in process ----------------------------------------------------------


def test_controller_writes_keeps_and_removes_annotations(
    kube_cluster: KubeCluster, run: RunFn
) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "annotations")
            name = lease_name("srv-a")
            ours = {AGENT_ENDPOINT_ANNOTATION: "10.0.0.1:8091"}
            controller = LeaseController(client, "srv-a", ns, LABELS, annotations=ours)
            await controller.renew()
            assert await annotations_of(client, ns, name) == ours
            # Someone else annotates the Lease (and leaves a stale peer endpoint of ours):
            # their annotation stays, ours are what the controller says.
            lease = await client.get_lease(ns, name)
            lease["metadata"]["annotations"] = {
                "example.com/owner": "ops",
                AGENT_ENDPOINT_ANNOTATION: "10.9.9.9:1",
                PEER_ENDPOINT_ANNOTATION: "10.9.9.9:2",
            }
            await client.update_lease(ns, lease)
            await controller.renew()
            assert await annotations_of(client, ns, name) == {"example.com/owner": "ops", **ours}
            # Restarted without --agent-advertise-address: our annotation goes, theirs stays.
            plain = LeaseController(client, "srv-a", ns, LABELS)
            await plain.renew()
            assert await annotations_of(client, ns, name) == {"example.com/owner": "ops"}
            # The peering engineer's annotation goes through the same map.
            peer = {PEER_ENDPOINT_ANNOTATION: "[2001:db8::1]:8095"}
            await LeaseController(client, "srv-a", ns, LABELS, annotations=peer).renew()
            assert await annotations_of(client, ns, name) == {"example.com/owner": "ops", **peer}
            await plain.stop()
        finally:
            await client.close()

    run(body())


def test_gc_list_feeds_the_directory(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "directory")
            mine = ServerDirectory("srv-1", agent_endpoint=Address("10.0.0.1", 8091))
            theirs = ServerDirectory("srv-2", agent_endpoint=Address("10.0.0.2", 8091))
            controllers = [
                LeaseController(
                    client,
                    directory.server_id,
                    ns,
                    LABELS,
                    annotations=directory.own_annotations(),
                    on_list=directory.update,
                    renew_period=0.5,
                    gc_period=0.2,
                )
                for directory in (mine, theirs)
            ]
            for controller in controllers:
                controller.start()
            both = {"srv-1": Address("10.0.0.1", 8091), "srv-2": Address("10.0.0.2", 8091)}

            async def knows_both() -> bool:
                return mine.agent_endpoints() == both == theirs.agent_endpoints()

            await eventually(knows_both, "each directory lists both servers")
            assert mine.peer_endpoints() == {} == theirs.peer_endpoints()
            await controllers[1].stop()  # deletes its Lease

            async def dropped() -> bool:
                return mine.agent_endpoints() == {"srv-1": Address("10.0.0.1", 8091)}

            await eventually(dropped, "srv-2 left srv-1's directory")
            await controllers[0].stop()
        finally:
            await client.close()

    run(body())


# --- two programs -----------------------------------------------------------------------


def start_server(
    cluster: KubeCluster,
    certs: Certs,
    sock_dir: str,
    *,
    ns: str,
    server_id: str,
    advertise: str | None = None,
) -> Running:
    """A proxy-server program; ``advertise``: its --agent-advertise-address (None: its own
    agent port on loopback, which agents can really dial)."""
    agent, health, admin = free_ports(3)
    uds = os.path.join(sock_dir, f"{server_id}.sock")
    proc = subprocess.Popen(
        command(
            f"--uds-name={uds}",
            "--server-port=0",
            f"--server-id={server_id}",
            f"--cluster-cert={certs.server_cert}",
            f"--cluster-key={certs.server_key}",
            f"--cluster-ca-cert={certs.ca}",
            f"--agent-bind-address={LOOPBACK}",
            f"--agent-port={agent}",
            f"--health-bind-address={LOOPBACK}",
            f"--health-port={health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-port={admin}",
            f"--kubeconfig={cluster.kubeconfig}",
            "--enable-lease-controller",
            f"--lease-namespace={ns}",
            f"--lease-label={LABEL}",
            f"--agent-advertise-address={advertise or f'{LOOPBACK}:{agent}'}",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    running = Running(proc, health, admin, agent, uds, "grpc")
    wait_healthy(running)
    return running


@pytest.fixture
def servers() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.communicate(timeout=WAIT_SECONDS)


def told(server: Running, certs: Certs) -> dict[str, Address]:
    """What ``server`` tells an agent that offers server-endpoints.v1."""
    headers = asyncio.run(connect_headers(certs, server.agent_port, "server-endpoints.v1"))
    return parse_server_endpoints(value for key, value in headers if key == MD_SERVER_ENDPOINTS)


def wait_told(
    server: Running,
    certs: Certs,
    expected: dict[str, Address],
    what: str,
    always: frozenset[str] = frozenset(),
) -> None:
    """Poll until ``server`` tells ``expected``; ``always``: IDs every answer meanwhile
    must hold."""
    deadline = time.monotonic() + LIST_BOUND
    while (seen := told(server, certs)) != expected:
        assert always <= seen.keys(), f"{what}: told {seen} while waiting"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: told {seen}, expected {expected}")
        time.sleep(0.5)


def test_two_servers_tell_agents_about_each_other(
    kube_cluster: KubeCluster, certs: Certs, sock_dir: str, servers: list[Running]
) -> None:
    async def setup() -> str:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "endpoints")
            # A server of another process, already running: listed at once, then left to
            # expire (nobody renews it) while still in the list until GC deletes it.
            foreign = kubeapi.lease("srv-c", LABELS, renewed=datetime.now(UTC))
            foreign["metadata"]["annotations"] = {AGENT_ENDPOINT_ANNOTATION: "10.0.0.3:8091"}
            foreign["spec"]["leaseDurationSeconds"] = SHORT_LEASE_SECONDS
            await client.create_lease(ns, foreign)
            return ns
        finally:
            await client.close()

    ns = asyncio.run(setup())
    expires = time.monotonic() + SHORT_LEASE_SECONDS
    a_addr, b_addr, c_addr = (
        Address("lb.example", 8141),
        Address("2001:db8::b", 8091),
        Address("10.0.0.3", 8091),
    )
    for server_id, advertise in (("srv-a", "lb.example:8141"), ("srv-b", "[2001:db8::b]:8091")):
        servers.append(
            start_server(
                kube_cluster, certs, sock_dir, ns=ns, server_id=server_id, advertise=advertise
            )
        )
    a, b = servers
    everyone = {"srv-a": a_addr, "srv-b": b_addr, "srv-c": c_addr}
    wait_told(a, certs, everyone, "srv-a")
    wait_told(b, certs, everyone, "srv-b")

    async def annotations() -> dict[str, str]:
        client = admin_client(kube_cluster)
        try:
            found = {}
            for item in await client.list_leases(ns, LABEL):
                meta = item["metadata"]
                found[meta["name"]] = (meta.get("annotations") or {}).get(
                    AGENT_ENDPOINT_ANNOTATION, ""
                )
            return found
        finally:
            await client.close()

    published = asyncio.run(annotations())
    assert published[lease_name("srv-a")] == "lb.example:8141"
    assert published[lease_name("srv-b")] == "[2001:db8::b]:8091"

    # The foreign Lease expires: both drop it at their next list, and never drop each
    # other meanwhile (each renews on time).
    time.sleep(max(0.0, expires - time.monotonic()))
    both = {"srv-a": a_addr, "srv-b": b_addr}
    wait_told(a, certs, both, "srv-a after srv-c expired", always=frozenset(both))
    wait_told(b, certs, both, "srv-b after srv-c expired", always=frozenset(both))

    # srv-b stops cleanly and deletes its Lease: srv-a drops it at its next list.
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(timeout=WAIT_SECONDS) == 0
    wait_told(a, certs, {"srv-a": a_addr}, "srv-a after srv-b stopped")


READY_BACKENDS = "konnectivity_network_proxy_server_ready_backend_connections"


def ready_backends(server: Running) -> float | None:
    text = get(server.admin_port, "/metrics")[2].decode()
    for line in text.splitlines():
        if line.startswith(READY_BACKENDS + " "):
            return float(line.split()[1])
    return None


def test_our_agent_follows_the_header_to_every_server(
    kube_cluster: KubeCluster, certs: Certs, sock_dir: str, servers: list[Running]
) -> None:
    async def namespace() -> str:
        client = admin_client(kube_cluster)
        try:
            return await create_namespace(client, "follow")
        finally:
            await client.close()

    ns = asyncio.run(namespace())
    # srv-b first: srv-a's first list, at its start, already holds srv-b's Lease.
    for server_id in ("srv-b", "srv-a"):
        servers.append(start_server(kube_cluster, certs, sock_dir, ns=ns, server_id=server_id))
    b, a = servers
    wait_told(
        a,
        certs,
        {"srv-a": Address(LOOPBACK, a.agent_port), "srv-b": Address(LOOPBACK, b.agent_port)},
        "srv-a",
    )
    health, admin = free_ports(2)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "konnectivity_fast.agent",
            f"--ca-cert={certs.ca}",
            f"--agent-cert={certs.client_cert}",
            f"--agent-key={certs.client_key}",
            f"--proxy-server-host={LOOPBACK}",
            f"--proxy-server-port={a.agent_port}",  # srv-a only: srv-b from its header
            f"--health-server-host={LOOPBACK}",
            f"--health-server-port={health}",
            f"--admin-server-port={admin}",
            "--agent-id=follower",
            "--server-discovery=headers",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not (ready_backends(a) == 1 and ready_backends(b) == 1):
            assert agent.poll() is None, "the agent exited"
            assert time.monotonic() < deadline, (ready_backends(a), ready_backends(b))
            time.sleep(0.2)
    finally:
        agent.kill()
        agent.communicate(timeout=WAIT_SECONDS)
