"""KubeClient against a real kube-apiserver: every authentication form, TLS settings,
error statuses, Lease operations with preconditions, and connection reuse."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from pathlib import Path

import pytest

from konnectivity_fast.kube import ApiError, KubeClient, TransportError, load_config
from konnectivity_fast.kube.config import load_in_cluster
from tests.support.kubeapi import KubeCluster, admin_client, create_namespace
from tests.support.net import RunFn

pytestmark = pytest.mark.timeout(120)
UNTRUSTED = r'^Get "https://127\.0\.0\.1:.*": tls: failed to verify certificate: '


def lease(name: str, labels: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"holderIdentity": "h", "leaseDurationSeconds": 30},
    }


def test_lease_crud_and_preconditions(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "crud")
            created = await client.create_lease(ns, lease("a", {"app": "x"}))
            await client.create_lease(ns, lease("b", {"app": "y"}))
            got = await client.get_lease(ns, "a")
            assert got["metadata"]["uid"] == created["metadata"]["uid"]
            assert got["spec"]["holderIdentity"] == "h"

            listed = await client.list_leases(ns, "app=x")
            assert [item["metadata"]["name"] for item in listed] == ["a"]
            assert len(await client.list_leases(ns)) == 2

            got["spec"]["holderIdentity"] = "h2"
            updated = await client.update_lease(ns, got)
            assert updated["spec"]["holderIdentity"] == "h2"
            # The stale copy carries the old resourceVersion: 409, the lease unchanged.
            with pytest.raises(ApiError) as stale:
                await client.update_lease(ns, got)
            assert (stale.value.code, stale.value.reason, stale.value.conflict) == (
                409,
                "Conflict",
                True,
            )
            old_rv = created["metadata"]["resourceVersion"]
            with pytest.raises(ApiError) as precondition:
                await client.delete_lease(ns, "a", resource_version=old_rv)
            assert precondition.value.code == 409
            assert "the ResourceVersion in the precondition" in str(precondition.value)
            await client.delete_lease(ns, "a", updated["metadata"]["resourceVersion"])
            await client.delete_lease(ns, "b")

            with pytest.raises(ApiError) as missing:
                await client.get_lease(ns, "a")
            assert missing.value.not_found
            assert (missing.value.code, missing.value.reason) == (404, "NotFound")
            assert str(missing.value) == 'leases.coordination.k8s.io "a" not found'
            with pytest.raises(ApiError) as exists:
                await client.create_lease(ns, lease("c"))
                await client.create_lease(ns, lease("c"))
            assert exists.value.already_exists
        finally:
            await client.close()

    run(body())


def test_keep_alive_reuses_one_connection(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "reuse")
            for _ in range(20):
                await client.list_leases(ns)
            pool = client._pool
            assert len(pool._idle) == 1
            first = pool._idle[0]
            await client.list_leases(ns)
            assert pool._idle == [first]
        finally:
            await client.close()

    run(body())


def test_forbidden_user_gets_the_status_message(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = KubeClient(load_config(kube_cluster.user_kubeconfig("nobody")))
        try:
            with pytest.raises(ApiError) as denied:
                await client.list_leases("default")
            assert (denied.value.code, denied.value.reason) == (403, "Forbidden")
            assert str(denied.value) == (
                'leases.coordination.k8s.io is forbidden: User "nobody" cannot list '
                'resource "leases" in API group "coordination.k8s.io" in the namespace '
                '"default"'
            )
        finally:
            await client.close()

    run(body())


async def service_account_token(cluster: KubeCluster) -> tuple[str, str]:
    """A namespace and a token of its service account ``sa`` (for the API audience)."""
    admin = admin_client(cluster)
    try:
        ns = await create_namespace(admin, "token")
        await admin.create_service_account(ns, "sa")
        token = await admin.create_token(ns, "sa", [])
        return ns, token
    finally:
        await admin.close()


def write_token_kubeconfig(cluster: KubeCluster, folder: Path, extra: str) -> str:
    path = folder / "token.kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
        "contexts:\n- name: t\n  context:\n    cluster: k\n    user: u\n"
        f"clusters:\n- name: k\n  cluster:\n    server: {cluster.server}\n{extra}"
        "users:\n- name: u\n  user:\n    tokenFile: token\n"
    )
    return str(path)


def test_token_file_and_tls_settings(kube_cluster: KubeCluster, run: RunFn, tmp_path: Path) -> None:
    async def body() -> None:
        ns, token = await service_account_token(kube_cluster)
        (tmp_path / "token").write_text(token + "\n")
        ca = base64.b64encode(kube_cluster.ca_pem).decode()
        cases = {
            "ca-data": f"    certificate-authority-data: {ca}\n",
            "insecure": "    insecure-skip-tls-verify: true\n",
        }
        for extra in cases.values():
            client = KubeClient(load_config(write_token_kubeconfig(kube_cluster, tmp_path, extra)))
            try:
                with pytest.raises(ApiError) as denied:
                    await client.get_lease(ns, "x")
                # Authenticated as the service account (so the token was sent), not allowed.
                assert f'User "system:serviceaccount:{ns}:sa" cannot get' in str(denied.value)
            finally:
                await client.close()
        # No CA and no insecure flag: the system roots do not know our CA.
        client = KubeClient(load_config(write_token_kubeconfig(kube_cluster, tmp_path, "")))
        try:
            with pytest.raises(TransportError, match=UNTRUSTED):
                await client.get_lease(ns, "x")
        finally:
            await client.close()

    run(body())


def test_in_cluster_config(kube_cluster: KubeCluster, run: RunFn, tmp_path: Path) -> None:
    async def body() -> None:
        ns, token = await service_account_token(kube_cluster)
        (tmp_path / "token").write_text(token)
        (tmp_path / "ca.crt").write_bytes(kube_cluster.ca_pem)
        (tmp_path / "namespace").write_text(ns)
        port = kube_cluster.server.rsplit(":", 1)[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}
        config = load_in_cluster(str(tmp_path), env)
        assert config.namespace == ns
        client = KubeClient(config)
        try:
            # The token and the CA from the folder were used: the API knows who is asking.
            with pytest.raises(ApiError) as denied:
                await client.create_token_review(token, [])
            assert f'User "system:serviceaccount:{ns}:sa" cannot create' in str(denied.value)
        finally:
            await client.close()

    run(body())


def test_connection_refused_names_the_url(run: RunFn, tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text(
        "current-context: c\ncontexts:\n- name: c\n  context:\n    cluster: k\n"
        "clusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:1\n"
    )

    async def body() -> None:
        client = KubeClient(load_config(str(path)))
        try:
            with pytest.raises(TransportError) as failed:
                await client.create_token_review("t", ["a"])
            assert str(failed.value) == (
                'Post "https://127.0.0.1:1/apis/authentication.k8s.io/v1/tokenreviews": '
                "dial tcp 127.0.0.1:1: connect: connection refused"
            )
        finally:
            await client.close()

    run(body())


def test_large_list(kube_cluster: KubeCluster, run: RunFn) -> None:
    # Tens of KiB: the API server answers with a chunked body (checked by hand once).
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "big")
            labels = {"filler": "x" * 60}
            await asyncio.gather(
                *(client.create_lease(ns, lease(f"l{i}", labels)) for i in range(40))
            )
            items = await client.list_leases(ns, "filler=" + "x" * 60)
            assert sorted(item["metadata"]["name"] for item in items) == sorted(
                f"l{i}" for i in range(40)
            )
        finally:
            await client.close()

    run(body())


def test_watch_leases(kube_cluster: KubeCluster, run: RunFn) -> None:
    async def body() -> None:
        client = admin_client(kube_cluster)
        try:
            ns = await create_namespace(client, "watch")
            await client.create_lease(ns, lease("before", {"app": "x"}))
            listed = await client.request(
                "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
            )
            since = listed["metadata"]["resourceVersion"]
            events: list[tuple[str, str]] = []
            watch = client.watch_leases(ns, "app=x", since, timeout_seconds=60)

            async def writer() -> None:
                created = await client.create_lease(ns, lease("w", {"app": "x"}))
                await client.create_lease(ns, lease("ignored", {"app": "other"}))
                created["spec"]["holderIdentity"] = "h2"
                await client.update_lease(ns, created)
                await client.delete_lease(ns, "w")

            task = asyncio.create_task(writer())
            async with contextlib.aclosing(watch):
                async for kind, obj in watch:
                    if kind != "BOOKMARK":
                        events.append((kind, obj["metadata"]["name"]))
                    if kind == "DELETED":
                        break
            await task
            assert events == [("ADDED", "w"), ("MODIFIED", "w"), ("DELETED", "w")]
            # A bad resourceVersion: the API refuses, its Status becomes the error.
            with pytest.raises(ApiError) as refused:
                async for _ in client.watch_leases(ns, resource_version="not-a-version"):
                    pass
            assert (refused.value.code, refused.value.reason) == (500, "InternalError")
            assert 'Invalid value: "not-a-version"' in str(refused.value)
        finally:
            await client.close()

    run(body())
