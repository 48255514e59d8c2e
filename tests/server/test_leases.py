"""LeaseController against a real kube-apiserver: create, renew, label replacement, GC of
expired leases with resourceVersion preconditions and its metrics, delete on stop."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from konnectivity_fast.kube import ApiError, KubeClient
from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.server.leases import (
    LeaseController,
    format_micro_time,
    is_expired,
    label_selector,
    lease_name,
    parse_lease_labels,
)
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client, create_namespace
from tests.support.net import RunFn

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(120)

LABELS = {"k8s-app": "konnectivity-server", "zone": "a"}
MICRO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
WAIT = 30.0  # bound on polling for a loop's effect
PREFIX = "konnectivity_network_proxy_server_"


async def eventually(probe: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Poll ``probe`` until it returns something truthy, within ``WAIT`` seconds."""
    async with asyncio.timeout(WAIT):
        while True:
            result = await probe()
            if result:
                return result
            await asyncio.sleep(0.1)
    raise AssertionError(what)  # pragma: no cover (timeout raises first)


async def get_or_none(client: KubeClient, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return await client.get_lease(ns, name)
    except ApiError as exc:
        if exc.not_found:
            return None
        raise


def sample(line_start: str) -> float:
    """The value of the exposed series whose line starts with ``line_start``."""
    for line in server_metrics.expose().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_create_renew_and_delete_on_stop(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "leases")
            controller = LeaseController(
                client, "srv-1", ns, LABELS, renew_period=0.2, gc_period=3600
            )
            assert controller.name == lease_name("srv-1") == "konnectivity-proxy-server-srv-1"
            controller.start()
            first = await eventually(lambda: get_or_none(client, ns, controller.name), "create")
            assert first["metadata"]["labels"] == LABELS
            spec = first["spec"]
            assert spec["holderIdentity"] == "srv-1"
            assert spec["leaseDurationSeconds"] == 30
            assert MICRO_TIME.match(spec["renewTime"]), spec["renewTime"]

            async def renewed() -> dict[str, Any] | None:
                lease = await get_or_none(client, ns, controller.name)
                if lease and lease["spec"]["renewTime"] > spec["renewTime"]:
                    return lease
                return None

            later = await eventually(renewed, "renewTime never moved")
            assert MICRO_TIME.match(later["spec"]["renewTime"])
            assert later["metadata"]["uid"] == first["metadata"]["uid"]
            await controller.stop()
            assert await get_or_none(client, ns, controller.name) is None
            await controller.stop()  # already gone: tolerated
        finally:
            await client.close()

    run(body())


def test_existing_lease_is_taken_over_and_labels_replaced(
    kube_cluster: KubeCluster, run: RunFn
) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "takeover")
            name = lease_name("srv-2")
            an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
            stale = kubeapi.lease(name, {"old": "label"}, renewed=an_hour_ago)
            await client.create_lease(ns, stale)
            controller = LeaseController(client, "srv-2", ns, LABELS, gc_period=3600)
            await controller.renew()
            lease = await client.get_lease(ns, name)
            assert lease["metadata"]["labels"] == LABELS
            assert lease["spec"]["holderIdentity"] == "srv-2"
            assert not is_expired(lease, datetime.now(UTC))
            # Someone else writes the lease: our cached copy is stale, renew still works.
            lease["metadata"]["labels"] = {"changed": "elsewhere"}
            await client.update_lease(ns, lease)
            await controller.renew()
            assert (await client.get_lease(ns, name))["metadata"]["labels"] == LABELS
            # Deleted behind our back: created again.
            await client.delete_lease(ns, name)
            await controller.renew()
            assert (await client.get_lease(ns, name))["spec"]["holderIdentity"] == "srv-2"
        finally:
            await client.close()

    run(body())


def test_gc_deletes_expired_matching_leases(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        server_metrics.reset()
        try:
            ns = await create_namespace(client, "gc")
            now = datetime.now(UTC)
            old = now - timedelta(seconds=120)
            leases = {
                "expired": kubeapi.lease("expired", LABELS, renewed=old),
                "never-renewed": kubeapi.lease("never-renewed", LABELS, renewed=None),
                "fresh": kubeapi.lease("fresh", LABELS, renewed=now),
                "other-labels": kubeapi.lease("other-labels", {"k8s-app": "x"}, renewed=old),
                "subset-labels": kubeapi.lease("subset-labels", {"zone": "a"}, renewed=old),
            }
            for lease in leases.values():
                await client.create_lease(ns, lease)
            controller = LeaseController(client, "srv-3", ns, LABELS)
            await controller.collect()
            left = {item["metadata"]["name"] for item in await client.list_leases(ns)}
            assert left == {"fresh", "other-labels", "subset-labels"}
            assert sample(PREFIX + "culled_leases_count") == 2
            ok = '{http_status_code="200",reason=""}'
            assert sample(PREFIX + "lease_delete_total" + ok) == 2
            assert sample(PREFIX + "lease_list_total" + ok) == 1
            assert sample(PREFIX + 'lease_list_latency_seconds_count{http_status_code="200"}') == 1
        finally:
            await client.close()

    run(body())


def test_gc_precondition_and_not_found(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        server_metrics.reset()
        try:
            ns = await create_namespace(client, "race")
            old = datetime.now(UTC) - timedelta(seconds=120)
            seen = await client.create_lease(ns, kubeapi.lease("racer", LABELS, renewed=old))
            # The holder renews between our list and our delete: the delete must lose.
            renewed = dict(
                seen, spec=dict(seen["spec"], renewTime=format_micro_time(datetime.now(UTC)))
            )
            await client.update_lease(ns, renewed)
            controller = LeaseController(client, "srv-4", ns, LABELS)
            await controller._delete_expired(seen)
            assert await get_or_none(client, ns, "racer") is not None
            assert (
                sample(PREFIX + 'lease_delete_total{http_status_code="409",reason="Conflict"}') == 1
            )
            # Gone before our delete: NotFound is tolerated and counted.
            gone = dict(seen, metadata=dict(seen["metadata"], name="gone"))
            await controller._delete_expired(gone)
            assert (
                sample(PREFIX + 'lease_delete_total{http_status_code="404",reason="NotFound"}') == 1
            )
            assert sample(PREFIX + "culled_leases_count") == 0
        finally:
            await client.close()

    run(body())


def test_gc_loop_runs_by_itself(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "gcloop")
            controller = LeaseController(
                client, "srv-5", ns, LABELS, renew_period=3600, gc_period=0.2
            )
            controller.start()
            old = datetime.now(UTC) - timedelta(seconds=120)
            await client.create_lease(ns, kubeapi.lease("dead-server", LABELS, renewed=old))

            async def culled() -> bool:
                return await get_or_none(client, ns, "dead-server") is None

            await eventually(culled, "the GC loop never deleted the expired lease")
            # Our own lease is live and stays.
            assert await get_or_none(client, ns, controller.name) is not None
            await controller.stop()
        finally:
            await client.close()

    run(body())


def test_pure_helpers() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 600, tzinfo=UTC)
    assert format_micro_time(when) == "2026-01-02T03:04:05.000600Z"
    assert label_selector({"b": "2", "a": "1"}) == "a=1,b=2"
    lease = {"spec": {"acquireTime": "2026-01-02T03:04:05.000000Z", "leaseDurationSeconds": 30}}
    assert not is_expired(lease, when + timedelta(seconds=29))
    assert is_expired(lease, when + timedelta(seconds=30))
    assert is_expired({"spec": {"leaseDurationSeconds": 30}}, when)


def test_parse_lease_labels() -> None:
    assert parse_lease_labels("k8s-app=konnectivity-server") == {"k8s-app": "konnectivity-server"}
    assert parse_lease_labels(" a = 1 ,b=2") == {"a": "1", "b": "2"}
    for text, message in (
        ("", "empty string provided"),
        ("a=1,b", "invalid label format: b"),
        ("a=1=2", "invalid label format: a=1=2"),
        ("a=1,", "invalid label format: "),
    ):
        with pytest.raises(ValueError) as error:
            parse_lease_labels(text)
        assert str(error.value) == message
