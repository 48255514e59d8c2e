"""kube-apiserver reaching a worker through the proxy-server named by its egress selector
(``cluster``): gRPC over a Unix socket, HTTP-CONNECT over a Unix socket, HTTP-CONNECT over
TCP with mTLS; each with our proxy-server and proxy-agent and with upstream's v0.36.0
(the baseline that tells a harness fault from ours), and mixed pairs.

Through the real API, for each: the node proxy (``kubectl get --raw``, a large body
byte-exact), a Service proxy to an Endpoints/EndpointSlice address in the worker, a
validating webhook served only in the worker, a streamed (chunked) node-proxy response
read while the kubelet is still writing it, and a WebSocket upgrade through the node
proxy."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from tests.support.kubeapi import KubeCluster

from . import payloads, wsmini
from .support import (
    IMPLS,
    KUBECTL_SECONDS,
    KUBELET_PORT,
    MODES,
    NODE_NAME,
    WEBHOOK_NAMESPACE,
    Harness,
    ProxyServer,
    Worker,
    admin_ssl,
    apply,
    kubectl,
    kubectl_path,
    new_namespace,
    wait,
)

pytestmark = pytest.mark.timeout(180)

# Which proxy-server and proxy-agent: each implementation's own pair in every mode, and
# the two mixed pairs (the agent side does not depend on the frontend mode) in one.
PAIRS = {
    "ours": ("ours", "ours"),
    "upstream": ("upstream", "upstream"),
    "ours-server": ("ours", "upstream"),
    "ours-agent": ("upstream", "ours"),
}
MIXED_MODE = "grpc-uds"
COMBOS = [(mode, pair) for mode in MODES for pair in (PAIRS if mode == MIXED_MODE else IMPLS)]
# A port nothing listens on in the worker namespace.
CLOSED_PORT = 10251
# Node-proxy requests in flight at once in the concurrency test.
CONCURRENT_REQUESTS = 16
# How long a webhook configuration may take to reach the apiserver's informer.
WEBHOOK_WAIT_SECONDS = 30.0


@dataclass
class Tunnel:
    mode: str
    impl: str
    cluster: KubeCluster
    harness: Harness
    server: ProxyServer


@pytest.fixture(scope="module", params=COMBOS, ids=[f"{m}-{i}" for m, i in COMBOS])
def tunnel(
    request: pytest.FixtureRequest, k8s: Harness, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tunnel]:
    mode, impl = request.param
    server_impl, agent_impl = PAIRS[impl]
    h = dataclasses.replace(k8s, folder=tmp_path_factory.mktemp(f"{mode}-{impl}"))
    cluster = h.apiservers.get(mode)
    try:
        # Agents authenticate with their client certificate (mTLS).
        server = h.start_server(
            server_impl, mode, f"{server_impl}-{mode}", f"--cluster-ca-cert={h.pki.ca_file}"
        )
        h.start_agent(agent_impl, f"agent-{agent_impl}", server.agent_port, *h.mtls_agent_args())
        wait(server.ready, f"{server_impl} proxy-server ready (agent connected)", server.proc)
        yield Tunnel(mode, impl, cluster, h, server)
    finally:
        h.procs.stop_all()
        print(h.procs.report())


@pytest.fixture(autouse=True)
def _logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "tunnel" in request.fixturenames:
        t: Tunnel = request.getfixturevalue("tunnel")
        print(t.harness.procs.report())


def node_proxy(path: str) -> str:
    return f"/api/v1/nodes/{NODE_NAME}/proxy/{path}"


def test_node_proxy_small_and_large_bodies(tunnel: Tunnel) -> None:
    small = kubectl(tunnel.cluster, "get", "--raw", node_proxy("hello"))
    assert small.stdout == payloads.HELLO
    big = kubectl(tunnel.cluster, "get", "--raw", node_proxy("big"))
    want = payloads.big_body()
    assert len(big.stdout) == len(want)
    assert hashlib.sha256(big.stdout).hexdigest() == hashlib.sha256(want).hexdigest()


def expose_kubelet(cluster: KubeCluster, w: Worker, ns: str) -> None:
    """A Service "kubelet" in ``ns`` whose one endpoint is the fake kubelet. The apiserver
    proxies to a Service's endpoint only when it is a Pod's IP (it checks the endpoint's
    targetRef against the Pod's status), so the worker address is given a Pod, as a
    kubelet would report it."""
    pod_ref = {"kind": "Pod", "namespace": ns, "name": "kubelet-pod"}
    apply(
        cluster,
        # No controller-manager runs: the "default" ServiceAccount the Pod admission
        # wants is made here.
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": ns},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "kubelet-pod", "namespace": ns},
            "spec": {
                "nodeName": NODE_NAME,
                "automountServiceAccountToken": False,
                "containers": [{"name": "c", "image": "kf.test/none"}],
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kubelet", "namespace": ns},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": KUBELET_PORT}]},
        },
        # Both forms of the endpoint: v1.37 reads the EndpointSlice, v1.36 the Endpoints.
        {
            "apiVersion": "v1",
            "kind": "Endpoints",
            "metadata": {"name": "kubelet", "namespace": ns},
            "subsets": [
                {
                    "addresses": [{"ip": w.kubelet_ip, "targetRef": pod_ref}],
                    "ports": [{"name": "https", "port": KUBELET_PORT}],
                }
            ],
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubelet-1",
                "namespace": ns,
                "labels": {"kubernetes.io/service-name": "kubelet"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": [w.kubelet_ip], "conditions": {"ready": True}, "targetRef": pod_ref}
            ],
            "ports": [{"name": "https", "port": KUBELET_PORT, "protocol": "TCP"}],
        },
    )
    status = {
        "status": {"phase": "Running", "podIP": w.kubelet_ip, "podIPs": [{"ip": w.kubelet_ip}]}
    }
    kubectl(
        cluster,
        "patch",
        "pod",
        "kubelet-pod",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def test_dial_failure_in_the_worker_reaches_the_client(tunnel: Tunnel) -> None:
    """A node-proxy request to a port nothing listens on in the worker: the agent's dial
    error comes back through the tunnel as the apiserver's error, at once; the tunnel
    still serves the next request."""
    done = kubectl(
        tunnel.cluster,
        "get",
        "--raw",
        f"/api/v1/nodes/https:{NODE_NAME}:{CLOSED_PORT}/proxy/hello",
        check=False,
    )
    assert done.returncode != 0
    # gRPC carries the agent's dial error text; HTTP-CONNECT only a status line.
    expected = (
        b"connect: connection refused"
        if MODES[tunnel.mode][0] == "GRPC"
        else (b", code 502: 502 Bad Gateway")
    )
    assert expected in done.stderr, done.stderr
    assert kubectl(tunnel.cluster, "get", "--raw", node_proxy("hello")).stdout == payloads.HELLO


def test_concurrent_node_proxy_requests(tunnel: Tunnel) -> None:
    """Many requests at once (one tunnel each through the same agent), each body intact."""
    size = 1 << 20
    want = hashlib.sha256(payloads.big_body(size)).hexdigest()
    url = urlsplit(tunnel.cluster.server)
    ctx = admin_ssl(tunnel.cluster)

    def fetch(_: int) -> tuple[int, str]:
        conn = http.client.HTTPSConnection(url.hostname or "", url.port, context=ctx, timeout=60)
        try:
            conn.request("GET", node_proxy(f"big?size={size}"))
            response = conn.getresponse()
            return response.status, hashlib.sha256(response.read()).hexdigest()
        finally:
            conn.close()

    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        results = list(pool.map(fetch, range(CONCURRENT_REQUESTS)))
    assert results == [(200, want)] * CONCURRENT_REQUESTS


def test_service_proxy(tunnel: Tunnel) -> None:
    cluster = tunnel.cluster
    ns = new_namespace(cluster, "svc")
    expose_kubelet(cluster, tunnel.harness.worker, ns)
    path = f"/api/v1/namespaces/{ns}/services/https:kubelet:https/proxy/hello"
    # The apiserver resolves the Service from its informer caches: the new objects may
    # take a moment to be there ("no endpoints available" until then).
    answers: list[bytes] = []

    def proxied() -> bool:
        done = kubectl(cluster, "get", "--raw", path, check=False)
        answers.append(done.stdout if done.returncode == 0 else done.stderr)
        return done.returncode == 0

    try:
        wait(proxied, "the Service proxy to answer", timeout=20)
    finally:
        print("service proxy answers:", answers[:1], answers[-1:])
    assert answers[-1] == payloads.HELLO
    kubectl(cluster, "delete", "namespace", ns, "--wait=false")


def test_validating_webhook_only_reachable_through_the_tunnel(tunnel: Tunnel) -> None:
    """A webhook named by a Service (kube-apiserver sends those through the ``cluster``
    egress; a webhook named by URL goes through ``controlplane``), resolved to its
    endpoint (``--enable-aggregator-routing``: no kube-proxy in front of a ClusterIP)."""
    cluster, w, pki = tunnel.cluster, tunnel.harness.worker, tunnel.harness.pki
    apply(
        cluster, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": WEBHOOK_NAMESPACE}}
    )
    expose_kubelet(cluster, w, WEBHOOK_NAMESPACE)
    ns = new_namespace(cluster, "hook")
    ns_labels = {"kubernetes.io/metadata.name": ns}
    apply(
        cluster,
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": f"kf-{ns}"},
            "webhooks": [
                {
                    "name": "verdict.kf.test",
                    "clientConfig": {
                        "service": {
                            "namespace": WEBHOOK_NAMESPACE,
                            "name": "kubelet",
                            "port": 443,
                            "path": "/validate",
                        },
                        "caBundle": _b64(pki.ca.cert_pem.bytes()),
                    },
                    "rules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["configmaps"],
                        }
                    ],
                    "namespaceSelector": {"matchLabels": ns_labels},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 10,
                }
            ],
        },
    )
    try:
        # The configuration takes effect once the apiserver's informer has it: until then a
        # "deny" ConfigMap is simply created. Each attempt uses a new name.
        deadline = time.monotonic() + WEBHOOK_WAIT_SECONDS
        attempt, refused = 0, None
        while time.monotonic() < deadline:
            attempt += 1
            done = kubectl(
                cluster,
                "create",
                "configmap",
                f"deny-{attempt}",
                "-n",
                ns,
                f"--from-literal={payloads.VERDICT_KEY}={payloads.DENY}",
                check=False,
            )
            if done.returncode != 0:
                refused = done.stderr.decode()
                break
            time.sleep(0.5)
        assert refused is not None, "the webhook never refused a ConfigMap"
        assert payloads.DENY_MESSAGE in refused, refused
        assert "verdict.kf.test" in refused, refused
        kubectl(
            cluster,
            "create",
            "configmap",
            "allowed",
            "-n",
            ns,
            f"--from-literal={payloads.VERDICT_KEY}=allow",
        )
    finally:
        kubectl(cluster, "delete", "validatingwebhookconfiguration", f"kf-{ns}", check=False)
        kubectl(cluster, "delete", "namespace", ns, "--wait=false", check=False)


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


# --- raw HTTP/1.1 to the apiserver (streaming and upgrades) ---------------------------------------


@dataclass
class Raw:
    sock: ssl.SSLSocket
    reader: object  # a buffered binary file over sock

    def close(self) -> None:
        self.sock.close()


def raw_request(
    cluster: KubeCluster, path: str, headers: dict[str, str]
) -> tuple[Raw, int, dict[str, str]]:
    """Send GET ``path`` on a new TLS connection as an admin; the status and headers read."""
    url = urlsplit(cluster.server)
    host, port = url.hostname or "", url.port or 443
    sock = socket.create_connection((host, port), timeout=30)
    tls = admin_ssl(cluster).wrap_socket(sock, server_hostname=host)
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    reader = tls.makefile("rb")
    status_line = reader.readline().decode()
    status = int(status_line.split()[1])
    got: dict[str, str] = {}
    while line := reader.readline().decode().rstrip("\r\n"):
        k, _, v = line.partition(":")
        got[k.strip().lower()] = v.strip()
    return Raw(tls, reader), status, got


def test_streamed_response_arrives_while_the_kubelet_writes(tunnel: Tunnel) -> None:
    raw, status, headers = raw_request(tunnel.cluster, node_proxy("stream"), {})
    try:
        assert status == 200, headers
        assert headers.get("transfer-encoding") == "chunked", headers
        reader = raw.reader
        assert hasattr(reader, "readline")

        def chunk() -> bytes:
            size = int(reader.readline().strip(), 16)
            data = reader.read(size)
            reader.readline()
            return data

        # Line 0 arrives before the kubelet may write line 1: the response streams.
        assert chunk() == payloads.stream_line(0)
        kubectl(tunnel.cluster, "get", "--raw", node_proxy("release"))
        rest = b""
        while data := chunk():
            rest += data
        want = b"".join(payloads.stream_line(i) for i in range(1, payloads.STREAM_LINES))
        assert rest == want
    finally:
        raw.close()


def test_kubectl_logs_and_logs_follow(tunnel: Tunnel) -> None:
    """``kubectl logs`` of a Pod on the worker's Node: kube-apiserver's kubelet client
    (pods/log) through the tunnel; with ``-f`` the lines stream while the kubelet is
    still writing them."""
    cluster = tunnel.cluster
    ns = new_namespace(cluster, "logs")
    expose_kubelet(cluster, tunnel.harness.worker, ns)
    lines = [payloads.stream_line(i) for i in range(payloads.STREAM_LINES)]
    assert kubectl(cluster, "logs", "kubelet-pod", "-n", ns).stdout == b"".join(lines)
    follow = subprocess.Popen(
        [
            str(kubectl_path()),
            f"--kubeconfig={cluster.kubeconfig}",
            "logs",
            "-f",
            "kubelet-pod",
            "-n",
            ns,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline() == lines[0]
        kubectl(cluster, "get", "--raw", node_proxy("release"))
        out, err = follow.communicate(timeout=KUBECTL_SECONDS)
        assert follow.returncode == 0, err
        assert out == b"".join(lines[1:])
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
        kubectl(cluster, "delete", "namespace", ns, "--wait=false", check=False)


def test_websocket_upgrade_through_the_node_proxy(tunnel: Tunnel) -> None:
    key = wsmini.new_key()
    raw, status, headers = raw_request(
        tunnel.cluster,
        node_proxy("ws"),
        {
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": key,
        },
    )
    try:
        assert status == 101, headers
        assert headers.get("sec-websocket-accept") == wsmini.accept_key(key)
        reader = raw.reader
        big = payloads.big_body(1 << 20, seed=7)
        for message in (b"ping", big, b"after the big one"):
            raw.sock.sendall(wsmini.encode(message, wsmini.BINARY, masked=True))
            opcode, echoed = wsmini.read_frame(reader)  # type: ignore[arg-type]
            assert opcode == wsmini.BINARY
            assert echoed == b"echo:" + message
        raw.sock.sendall(wsmini.encode(b"\x03\xe8", wsmini.CLOSE, masked=True))
        opcode, _ = wsmini.read_frame(reader)  # type: ignore[arg-type]
        assert opcode == wsmini.CLOSE
    finally:
        raw.close()


def test_egress_config_names_the_tunnel(tunnel: Tunnel) -> None:
    """The apiserver under test really has this egress configuration, and the proxy-server
    sent the dials to the agent (counted as it does)."""
    kubectl(tunnel.cluster, "get", "--raw", node_proxy("hello"))
    config = (tunnel.cluster.folder / "egress.yaml").read_text()
    protocol, transport = MODES[tunnel.mode]
    assert f"proxyProtocol: {protocol}" in config
    assert f"      {transport}:" in config
    metrics = tunnel.server.metrics()
    dials = [v for k, v in metrics.items() if "DIAL_REQ" in k and "to_agent" in k]
    assert dials and sum(dials) > 0, json.dumps(
        {k: v for k, v in metrics.items() if "packets" in k}, indent=1
    )
