"""A remote control plane whose workers reach kube-apiserver only through the agents'
tunnels (issue 18, node-to-control-plane tunneling), for test_node_to_cp.py::

    root namespace (the control plane)               worker namespace          pod namespace
      etcd, kube-apiserver on 127.0.0.1 only           proxy-agent,              kubectl
        --egress--> proxy-server (UDS, gRPC)             fake kubelet            (POD_IP)
      proxy-server: agent port on 127.0.0.1,             mapping listeners  <----- veth ---
        --allowed-destination=<the apiserver>            on LOCAL_IP
      HAProxy on ROOT_IP: the agent port,       <------ the agent dials ROOT_IP
        the one thing a worker can reach
      "etcd-like" listener on 127.0.0.1 (mapped by the agent, not allowed by the server)

- **The pod** is a network namespace behind the worker: one veth, a /32 each way
  (LOCAL_IP on the worker's end, POD_IP on the pod's), both in the worker's /24 that the
  root namespace guards with its ``unreachable`` route, no default route, and the
  worker does not forward (a new namespace's default). So the pod can reach the worker's
  LOCAL_IP and nothing else: no path to the control plane but the agent's listeners.
- **The control plane** listens on ROOT_IP (the root end of the worker's veth) with
  HAProxy alone, in front of the proxy-server's agent port; kube-apiserver and the server
  bind 127.0.0.1.
- **The agent** (ours) maps ``API_PORT`` on LOCAL_IP to the apiserver and ``DENIED_PORT``
  to the etcd-like listener, which the server's allow-list does not name.

``Plane`` holds what lives for the module; ``in_pod``/``pod_kubectl`` run programs in the
pod namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.haproxy import haproxy_config, require_haproxy
from tests.support.kubeapi import KubeCluster, running_apiserver
from tests.support.net import free_ports

from .support import (
    Harness,
    ProxyServer,
    Worker,
    admin_ssl,
    egress_config,
    kubectl_path,
    register_node,
    run_ip,
    wait,
)

ETCD_PREFIX = "/registry-n2cp"
#: The agent's local ports in the worker (its namespace has nothing else listening).
API_PORT = 6443
DENIED_PORT = 2379
#: The name the pod's kubeconfig asks the apiserver's certificate for (in-cluster
#: clients use the ``kubernetes`` Service's names, not the node-local address).
TLS_NAME = "kubernetes.default.svc"
KUBECTL_SECONDS = 60.0


@dataclass(frozen=True)
class Pod:
    ns: str
    ip: str  # the pod's end of its veth
    local_ip: str  # the worker's end: where the agent's mapping listeners bind

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


@contextlib.contextmanager
def pod_namespace(w: Worker) -> Iterator[Pod]:
    """A pod behind worker ``w``: see the module docstring. Its addresses are in ``w``'s
    guarded /24, so the root namespace can never send to them."""
    net = w.subnet.rsplit(".", 1)[0]
    tag = w.ns.rsplit("-", 1)[-1]
    pod = Pod(f"kf-pod-{tag}", f"{net}.21", f"{net}.20")
    worker_if, pod_if = f"kfp{tag}", f"kfq{tag}"
    run_ip("netns", "add", pod.ns)
    try:
        run_ip("-n", w.ns, "link", "add", worker_if, "type", "veth", "peer", "name", pod_if)
        run_ip("-n", w.ns, "link", "set", pod_if, "netns", pod.ns)
        run_ip("-n", w.ns, "addr", "add", f"{pod.local_ip}/32", "dev", worker_if)
        run_ip("-n", w.ns, "link", "set", worker_if, "up")
        run_ip("-n", w.ns, "route", "add", f"{pod.ip}/32", "dev", worker_if, "src", pod.local_ip)
        run_ip("-n", pod.ns, "link", "set", "lo", "up")
        run_ip("-n", pod.ns, "addr", "add", f"{pod.ip}/32", "dev", pod_if)
        run_ip("-n", pod.ns, "link", "set", pod_if, "up")
        run_ip("-n", pod.ns, "route", "add", f"{pod.local_ip}/32", "dev", pod_if, "src", pod.ip)
        yield pod
    finally:
        run_ip("netns", "del", pod.ns, check=False)  # takes the veth pair with it


@dataclass
class Plane:
    harness: Harness  # its processes live for the module
    pod: Pod
    cluster: KubeCluster  # bound on 127.0.0.1: the workers cannot route to it
    server: ProxyServer
    agent: subprocess.Popen[bytes]
    denied: socket.socket  # the etcd-like listener: must never accept a connection
    pod_kubeconfig: Path  # the agent's API_PORT, TLS verified against TLS_NAME
    context: ssl.SSLContext  # system:masters, for requests from the control plane

    @property
    def api_port(self) -> int:
        return int(self.cluster.server.rsplit(":", 1)[1])

    def pod_kubectl(
        self, *args: str, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl in the pod namespace with the pod's kubeconfig (or ``kubeconfig``)."""
        argv = [str(kubectl_path()), f"--kubeconfig={kubeconfig or self.pod_kubeconfig}"]
        return subprocess.run(
            self.pod.cmd([*argv, "--request-timeout=20s", *args]),
            capture_output=True,
            text=True,
            timeout=KUBECTL_SECONDS,
            check=False,
        )

    def node_proxy(self, node: str, path: str) -> tuple[int, str]:
        """``GET /api/v1/nodes/<node>/proxy/<path>`` from the control plane: the forward
        direction (kube-apiserver -> proxy-server -> agent -> kubelet)."""
        host, port = self.cluster.server.removeprefix("https://").rsplit(":", 1)
        conn = http.client.HTTPSConnection(host, int(port), context=self.context, timeout=20)
        try:
            conn.request("GET", f"/api/v1/nodes/{node}/proxy/{path}")
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        except OSError as exc:
            return 0, repr(exc)
        finally:
            conn.close()

    def pending_on_denied(self) -> int:
        """Connections waiting in the etcd-like listener's accept queue."""
        count = 0
        for _ in range(64):
            try:
                conn, _ = self.denied.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1
        return count


def pod_kubeconfig(cluster: KubeCluster, pod: Pod, folder: Path, tls_name: str | None) -> Path:
    """The admin kubeconfig, its server the agent's local address, asking the certificate
    for ``tls_name`` (None: for the address itself, which it does not name)."""
    text = Path(cluster.kubeconfig).read_text()
    server = f"    server: https://{pod.local_ip}:{API_PORT}\n"
    if tls_name is not None:
        server += f"    tls-server-name: {tls_name}\n"
    text = text.replace(f"    server: {cluster.server}\n", server)
    assert f"{pod.local_ip}:{API_PORT}" in text
    path = folder / f"pod-{tls_name or 'address'}.kubeconfig"
    path.write_text(text)
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def n2cp_plane(k8s: Harness, folder: Path) -> Iterator[Plane]:
    """The module's control plane, pod, server, HAProxy and agent (see the docstring);
    the session's single apiserver is stopped first (two cores)."""
    require_haproxy()
    k8s.apiservers.stop_current()
    harness = dataclasses.replace(k8s, folder=folder)
    sock_dir = tempfile.mkdtemp(prefix="kf-n2cp-")
    uds = f"{sock_dir}/n2cp.sock"
    config = folder / "egress.yaml"
    config.write_text(egress_config("grpc-uds", uds, 0, k8s.pki))
    denied = socket.create_server(("127.0.0.1", 0))
    denied.setblocking(False)
    try:
        with (
            pod_namespace(k8s.worker) as pod,
            running_apiserver(
                k8s.apiservers.bin_dir,
                folder / "apiserver",
                k8s.apiservers.etcd_url,
                ca=k8s.pki.ca,
                etcd_prefix=ETCD_PREFIX,
                extra_args=(f"--egress-selector-config-file={config}",),
            ) as cluster,
        ):
            register_node(cluster, k8s.worker)
            yield _start(harness, pod, cluster, uds, denied)
    finally:
        harness.procs.stop_all()
        print(harness.procs.report())
        denied.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def _start(
    harness: Harness, pod: Pod, cluster: KubeCluster, uds: str, denied: socket.socket
) -> Plane:
    api = cluster.server.removeprefix("https://")
    server = harness.start_server(
        "ours",
        "grpc-uds",
        "s0",
        f"--cluster-ca-cert={harness.pki.ca_file}",
        f"--allowed-destination={api}",
        agent_bind="127.0.0.1",
        uds=uds,
    )
    (lb_port,) = free_ports(1, harness.worker.root_ip)
    config = harness.folder / "haproxy.cfg"
    server_line = f"    server s0 127.0.0.1:{server.agent_port}"
    bind = f"{harness.worker.root_ip}:{lb_port}"
    config.write_text(haproxy_config([("agents", bind, "roundrobin", [server_line])]))
    harness.procs.start("haproxy", [require_haproxy(), "-f", str(config), "-db"])
    denied_port = denied.getsockname()[1]
    agent = harness.start_agent(
        "ours",
        "kf-worker",
        lb_port,
        *harness.mtls_agent_args(),
        f"--agent-identifiers=ipv4={harness.worker.kubelet_ip}",
        "--feature-gates=NodeToMasterTraffic=true",
        f"--bind-address={pod.local_ip}",
        f"--apiserver-port-mapping={API_PORT}:{api}",
        f"--apiserver-port-mapping={DENIED_PORT}:127.0.0.1:{denied_port}",
        "-v=2",
    )
    capable = "konnectivity_fast_agent_capable_servers"
    wait(lambda: harness.agent_metrics(agent).get(capable) == 1, "a capable server", agent)
    kubeconfig = pod_kubeconfig(cluster, pod, harness.folder, TLS_NAME)
    return Plane(harness, pod, cluster, server, agent, denied, kubeconfig, admin_ssl(cluster))
