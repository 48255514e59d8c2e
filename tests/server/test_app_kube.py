"""The proxy-server program against a real kube-apiserver: agent token authentication
(``--agent-namespace``, ``--agent-service-account``, ``--authentication-audience``) and the
lease controller (``--enable-lease-controller``), end to end in a subprocess with
``--kubeconfig``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from konnectivity_fast.server import CONNECT_PATH
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire.errors import StatusCode
from tests.support import kubeapi
from tests.support.kubeapi import KubeCluster, admin_client, create_namespace
from tests.support.net import Certs

from .test_app import LOOPBACK, WAIT_SECONDS, Running, command, free_ports, wait_healthy

kube_cluster = kubeapi.kube_cluster
pytestmark = pytest.mark.timeout(120)

AUDIENCE = "kf-test-server"
AGENT_SA = "konnectivity-agent"
SERVER_ID = "kf-app-test"
LEASE = f"konnectivity-proxy-server-{SERVER_ID}"


@dataclass(frozen=True)
class Setup:
    namespace: str
    good_token: str
    foreign_token: str  # the right audience, another service account


@pytest.fixture(scope="module")
def setup(kube_cluster: KubeCluster) -> Setup:
    async def make() -> Setup:
        admin = admin_client(kube_cluster)
        try:
            ns = await create_namespace(admin, "proxy")
            await admin.create_service_account(ns, AGENT_SA)
            await admin.create_service_account(ns, "intruder")
            return Setup(
                ns,
                await admin.create_token(ns, AGENT_SA, [AUDIENCE]),
                await admin.create_token(ns, "intruder", [AUDIENCE]),
            )
        finally:
            await admin.close()

    return asyncio.run(make())


@pytest.fixture
def server(
    kube_cluster: KubeCluster, setup: Setup, certs: Certs, sock_dir: str
) -> Iterator[Running]:
    agent, health, admin = free_ports(3)
    uds = os.path.join(sock_dir, "konnectivity.sock")
    proc = subprocess.Popen(
        command(
            f"--uds-name={uds}",
            "--server-port=0",
            f"--server-id={SERVER_ID}",
            f"--cluster-cert={certs.server_cert}",
            f"--cluster-key={certs.server_key}",
            f"--agent-bind-address={LOOPBACK}",
            f"--agent-port={agent}",
            f"--health-bind-address={LOOPBACK}",
            f"--health-port={health}",
            f"--admin-bind-address={LOOPBACK}",
            f"--admin-port={admin}",
            f"--kubeconfig={kube_cluster.kubeconfig}",
            f"--agent-namespace={setup.namespace}",
            f"--agent-service-account={AGENT_SA}",
            f"--authentication-audience={AUDIENCE}",
            "--enable-lease-controller",
            f"--lease-namespace={setup.namespace}",
            "--lease-label=k8s-app=kf-test, tier = proxy",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    running = Running(proc, health, admin, agent, uds, "grpc")
    try:
        wait_healthy(running)
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=WAIT_SECONDS)


async def connect_agent(
    server: Running, certs: Certs, token: str | None
) -> tuple[int | None, str, dict[str, str]]:
    """Open a Connect stream (TLS, no client certificate: token-auth mode); the status
    and message if the server ended it, and the response headers."""
    ctx = tls.client_context(certs.ca)
    proto = await kgrpc.connect(
        host=LOOPBACK, port=server.agent_port, ssl=ctx, server_hostname="localhost"
    )
    try:
        metadata = [("agentid", "a1")]
        if token is not None:
            metadata.append(("authorization", f"Bearer {token}"))
        call = proto.start_call(CONNECT_PATH, metadata=metadata)
        try:
            headers = dict(await call.headers_received)
        except kgrpc.GrpcError:
            headers = {}
        if "serverid" in headers:
            return None, "", headers
        await call.wait_status()
        return call.status, call.message, headers
    finally:
        await proto.aclose()


def test_agent_with_a_valid_token_is_admitted(server: Running, setup: Setup, certs: Certs) -> None:
    status, _, headers = asyncio.run(connect_agent(server, certs, setup.good_token))
    assert status is None
    assert headers["serverid"] == SERVER_ID


@pytest.mark.parametrize("case", ["missing", "foreign", "garbage"])
def test_agent_refused_with_upstreams_message(
    server: Running, setup: Setup, certs: Certs, case: str
) -> None:
    token = {"missing": None, "foreign": setup.foreign_token, "garbage": "not-a-jwt"}[case]
    status, message, headers = asyncio.run(connect_agent(server, certs, token))
    assert status == StatusCode.UNKNOWN
    assert "serverid" not in headers
    expected = {
        "missing": "Authentication context was not found in metadata",
        "foreign": "Failed to validate authentication token, err:lookup failed: incoming "
        f'request from "intruder" service account. Expected "{AGENT_SA}"',
        "garbage": "Failed to validate authentication token, err:lookup failed: ",
    }[case]
    assert message.startswith(expected), message


def test_lease_published_and_deleted_on_sigterm(
    server: Running, setup: Setup, kube_cluster: KubeCluster
) -> None:
    async def lease() -> dict[str, object] | None:
        admin = admin_client(kube_cluster)
        try:
            for item in await admin.list_leases(setup.namespace, "k8s-app=kf-test,tier=proxy"):
                if item["metadata"]["name"] == LEASE:
                    return dict(item)
            return None
        finally:
            await admin.close()

    async def published() -> dict[str, object]:
        while (found := await lease()) is None:
            await asyncio.sleep(0.1)
        return found

    found = asyncio.run(asyncio.wait_for(published(), WAIT_SECONDS))
    spec = found["spec"]
    assert isinstance(spec, dict)
    assert spec["holderIdentity"] == SERVER_ID
    assert spec["leaseDurationSeconds"] == 30
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=WAIT_SECONDS) == 0
    assert asyncio.run(lease()) is None
