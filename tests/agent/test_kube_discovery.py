"""Direct endpoints discovered through a real kube-apiserver: the agent endpoint our
servers publish on their Leases (``--server-discovery=leases``), read by the agent's
informer and dialled by its ``ClientSet`` with no balancer at all, and the ready
EndpointSlices of the servers' Service (``--server-discovery=service``). The API refuses
loopback addresses (and one-label names such as ``localhost``) in EndpointSlices, so the
Service source is checked up to the addresses it yields; dialling them is the same code
as for every other source (tests/agent/test_direct.py)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from konnectivity_fast.agent.clientset import ClientSet, EndpointSource
from konnectivity_fast.agent.discovery import EndpointBook, Source
from konnectivity_fast.agent.leases import LeaseCounter
from konnectivity_fast.agent.service import SERVICE_NAME_LABEL, ServiceEndpoints, slice_endpoints
from konnectivity_fast.kube import KubeClient
from konnectivity_fast.wire.endpoints import AGENT_ENDPOINT_ANNOTATION, Address
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client, create_namespace, lease

from .conftest import Certs, RunFn
from .support import LOOPBACK, agent_config, proxy_server, until

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(180)

SERVERS = {"k8s-app": "konnectivity-server"}
SELECTOR = "k8s-app=konnectivity-server"
SERVICE = "konnectivity-server"


def published(server_id: str, endpoint: str, renewed: datetime | None = None) -> dict[str, Any]:
    item = lease(f"konnectivity-proxy-server-{server_id}", SERVERS, renewed=renewed)
    item["spec"]["holderIdentity"] = server_id
    item["metadata"]["annotations"] = {AGENT_ENDPOINT_ANNOTATION: endpoint}
    return item


def endpoint_slice(
    name: str, port: int, endpoints: list[tuple[str, bool | None]]
) -> dict[str, Any]:
    """An EndpointSlice of the servers' Service: (address, ready) pairs; None leaves the
    ready condition out (Kubernetes reads that as ready)."""
    items = []
    for address, ready in endpoints:
        conditions = {} if ready is None else {"ready": ready}
        items.append({"addresses": [address], "conditions": conditions})
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {SERVICE_NAME_LABEL: SERVICE}},
        "addressType": "IPv4",
        "ports": [{"name": "agent", "port": port, "protocol": "TCP"}],
        "endpoints": items,
    }


def slices_path(ns: str, name: str = "") -> str:
    path = f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"
    return f"{path}/{name}" if name else path


@contextlib.asynccontextmanager
async def kube(cluster: KubeCluster, prefix: str) -> AsyncIterator[tuple[KubeClient, str]]:
    client = admin_client(cluster)
    try:
        yield client, await create_namespace(client, prefix)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def discovering_agent(
    certs: Certs, source: Source, endpoints: EndpointSource
) -> AsyncIterator[ClientSet]:
    """An agent with no balancer (empty host) and one direct endpoint source."""
    cs = ClientSet(
        agent_config(certs, 1, host=""),
        sync_interval=0.05,
        sync_interval_cap=0.2,
        rng=random.Random(7),
        book=EndpointBook(0.05, 0.2, random.Random(8)),
        sources={source: endpoints},
    )
    cs.start()
    try:
        yield cs
    finally:
        await cs.stop()


def test_lease_endpoints_are_read_from_valid_leases_only(
    kube_cluster: KubeCluster, run: RunFn
) -> None:
    async def main() -> None:
        async with kube(kube_cluster, "lease-endpoints") as (client, ns):
            now = datetime.now(UTC)
            for item in (
                published("s1", "10.0.0.1:8132", renewed=now),
                published("s2", "[fd00::2]:8132", renewed=now),
                published("old", "10.0.0.3:8132", renewed=now - timedelta(hours=1)),
                published("bad", "not an address", renewed=now),
                lease("upstream", SERVERS, renewed=now),  # an upstream server: no annotation
            ):
                await client.create_lease(ns, item)
            counter = LeaseCounter(ns, SELECTOR, client=client)
            await counter.start()
            try:
                assert counter.endpoints() == {
                    Address("10.0.0.1", 8132): "s1",
                    Address("fd00::2", 8132): "s2",
                }
                assert counter.count() == 4  # the endpoints do not change the count
            finally:
                await counter.close()

    run(main())


def test_agent_holds_the_servers_its_leases_publish(
    kube_cluster: KubeCluster, run: RunFn, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with (
            kube(kube_cluster, "lease-dial") as (client, ns),
            contextlib.AsyncExitStack() as stack,
        ):
            servers = [
                await stack.enter_async_context(
                    proxy_server(sock_dir, certs, server_id=sid, server_count=1)
                )
                for sid in ("s1", "s2", "s3")
            ]
            for server in servers[:2]:
                endpoint = f"{LOOPBACK}:{server.agent_port}"
                await client.create_lease(
                    ns, published(server.proxy.server_id, endpoint, datetime.now(UTC))
                )
            counter = LeaseCounter(ns, SELECTOR, client=client)
            await counter.start()
            stack.push_async_callback(counter.close)
            cs = await stack.enter_async_context(
                discovering_agent(certs, Source.LEASE, counter.endpoints)
            )
            # Every server says it is alone (--server-count=1): the Leases make it two.
            await until(lambda: sorted(cs.clients) == ["s1", "s2"], what="s1 and s2")
            assert cs.known_count() == 2
            # A third server publishes its Lease later: the agent finds it.
            endpoint = f"{LOOPBACK}:{servers[2].agent_port}"
            await client.create_lease(ns, published("s3", endpoint, datetime.now(UTC)))
            await until(lambda: sorted(cs.clients) == ["s1", "s2", "s3"], what="s3 found")

    run(main())


def test_service_endpoints_follow_ready_endpoint_slices(
    kube_cluster: KubeCluster, run: RunFn
) -> None:
    async def main() -> None:
        async with kube(kube_cluster, "service-endpoints") as (client, ns):
            await client.request(
                "POST",
                slices_path(ns),
                body=endpoint_slice("a", 8132, [("10.0.0.1", True), ("10.0.0.2", False)]),
            )
            await client.request(
                "POST", slices_path(ns), body=endpoint_slice("b", 8132, [("10.0.0.3", None)])
            )
            other = endpoint_slice("c", 8132, [("10.0.0.9", True)])
            other["metadata"]["labels"] = {SERVICE_NAME_LABEL: "something-else"}
            await client.request("POST", slices_path(ns), body=other)
            watcher = ServiceEndpoints(ns, SERVICE, 8132, client=client)
            await watcher.start()
            try:
                assert watcher.endpoints() == {
                    Address("10.0.0.1", 8132): "",
                    Address("10.0.0.3", 8132): "",
                }
                await client.request("DELETE", slices_path(ns, "b"))
                await until(lambda: Address("10.0.0.3", 8132) not in watcher.endpoints())
                assert list(watcher.endpoints()) == [Address("10.0.0.1", 8132)]
            finally:
                await watcher.close()

    run(main())


def test_slice_port_choice() -> None:
    """The port numbered --proxy-server-port, else a slice's only port (a Service may map
    its port to another target port), else nothing: the right one cannot be known."""
    one = endpoint_slice("a", 9443, [("10.0.0.1", True)])
    assert slice_endpoints(one, 8091) == [Address("10.0.0.1", 9443)]
    two = endpoint_slice("b", 8091, [("10.0.0.1", True)])
    two["ports"].append({"name": "metrics", "port": 8095, "protocol": "TCP"})
    assert slice_endpoints(two, 8091) == [Address("10.0.0.1", 8091)]
    assert slice_endpoints(two, 8132) == []
    assert slice_endpoints({"ports": "junk", "endpoints": [1, {}]}, 8091) == []
    broken = endpoint_slice("c", 8091, [("10.0.0.1", True)])
    broken["endpoints"] = [{"addresses": [7]}, {"conditions": {}}, "x"]
    assert slice_endpoints(broken, 8091) == []
