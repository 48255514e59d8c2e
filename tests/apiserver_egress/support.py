"""The harness of the Kubernetes end-to-end tests: a worker network namespace, one PKI,
kube-apiservers whose egress selector names a proxy-server, the proxy-server and
proxy-agent programs (ours or upstream's v0.36.0), a fake kubelet, kubectl, and a TCP
round-robin balancer for several proxy-servers.

Topology (root = the test's own network namespace):

    root: kube-apiserver, etcd, proxy-server(s)      worker namespace: proxy-agent(s),
          on 127.0.0.1 and ROOT_IP (a /32 on          the fake kubelet on KUBELET_IP
          the root end of a veth)                     (a /32 on the worker's lo)
                          <---- veth: the agent dials ROOT_IP ----

Invariants:
- before any address exists, the root namespace gets an ``unreachable`` route for the
  whole worker /24, kept until teardown: a packet meant for the worker that does not take
  the one host route below fails locally ("No route to host") and never leaves the
  machine through the default route;
- the root namespace has exactly one route into the worker, a /32 to WORKER_IP, which
  carries the answers to the agents' connections; nothing in the root namespace opens a
  connection to a worker address. KUBELET_IP is covered only by the unreachable route, so
  kube-apiserver can reach the kubelet only through the tunnel (checked with
  ``ip route get``, which sends nothing);
- everything a test starts is a direct child process, ended at teardown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.kubeapi import KubeCluster, kube_version, running_apiserver, running_etcd
from tests.support.net import free_ports
from tests.support.upstream import Processes, Upstream, parse_exposition

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# Third octets tried for the worker's 10.213.X.0/24, from the pid so that two test runs on
# one machine pick different ones; one already routed is skipped.
SUBNET_PREFIX = "10.213"
KUBELET_PORT = 10250
NODE_NAME = "kf-worker"
AUDIENCE = "system:konnectivity-server"
# The webhook's Service lives here; the fake kubelet's certificate names it.
WEBHOOK_NAMESPACE = "kf-hook"
# Egress modes: (name, proxyProtocol, transport).
MODES = {
    "grpc-uds": ("GRPC", "uds"),
    "http-uds": ("HTTPConnect", "uds"),
    "http-tcp": ("HTTPConnect", "tcp"),
}
IMPLS = ("ours", "upstream")
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.1
KUBECTL_SECONDS = 60.0


# --- the worker network namespace -----------------------------------------------------------


@dataclass(frozen=True)
class Worker:
    ns: str
    subnet: str  # the /24 guarded in the root namespace
    root_ip: str  # where agents dial: the root end of the veth (/32), or ``via``'s
    worker_ip: str  # worker end of the veth
    kubelet_ip: str  # on the worker's lo: reachable only from inside the worker

    def cmd(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


def run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _free_subnet() -> str:
    routes = run_ip("route", "show", "table", "all").stdout
    start = os.getpid() % 200
    for i in range(200):
        third = 20 + (start + i) % 200
        subnet = f"{SUBNET_PREFIX}.{third}"
        if f"{subnet}." not in routes:
            return subnet
    raise AssertionError(f"no free {SUBNET_PREFIX}.X.0/24")


@contextlib.contextmanager
def worker_namespace(suffix: str = "", via: str = "") -> Iterator[Worker]:
    """A worker; ``suffix`` tells a second one apart. With ``via`` (another worker's
    ``root_ip``) its agents dial that address, routed through this worker's own veth (the
    root end is the gateway): one address and one certificate serve both workers, which
    the root side still sees as two sources."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        message = "the Kubernetes e2e tests need root and iproute2 (network namespaces)"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    net = _free_subnet()
    tag = f"{os.getpid() % 100000}{suffix}"
    w = Worker(f"kf-worker-{tag}", f"{net}.0/24", f"{net}.1", f"{net}.2", f"{net}.10")
    root_if, worker_if = f"kfr{tag}", f"kfw{tag}"
    # The guard first, before any address of the subnet exists anywhere.
    run_ip("route", "add", "unreachable", w.subnet)
    try:
        run_ip("netns", "add", w.ns)
        try:
            run_ip("link", "add", root_if, "type", "veth", "peer", "name", worker_if, "netns", w.ns)
            run_ip("addr", "add", f"{w.root_ip}/32", "dev", root_if)
            run_ip("link", "set", root_if, "up")
            run_ip("route", "add", f"{w.worker_ip}/32", "dev", root_if, "src", w.root_ip)
            run_ip("-n", w.ns, "link", "set", "lo", "up")
            run_ip("-n", w.ns, "addr", "add", f"{w.worker_ip}/24", "dev", worker_if)
            run_ip("-n", w.ns, "link", "set", worker_if, "up")
            run_ip("-n", w.ns, "addr", "add", f"{w.kubelet_ip}/32", "dev", "lo")
            check_kubelet_unroutable(w)
            if via:
                run_ip("-n", w.ns, "route", "add", f"{via}/32", "via", w.root_ip, "dev", worker_if)
                w = dataclasses.replace(w, root_ip=via)
            yield w
        finally:
            run_ip("netns", "del", w.ns, check=False)  # takes the veth pair with it
            run_ip("link", "del", root_if, check=False)
    finally:
        run_ip("route", "del", "unreachable", w.subnet, check=False)


def check_kubelet_unroutable(w: Worker) -> None:
    """The root namespace has no route to the kubelet (asked of the kernel; nothing sent)."""
    done = run_ip("route", "get", w.kubelet_ip, check=False)
    assert done.returncode != 0 or "unreachable" in done.stdout, done.stdout
    assert "unreachable" in (done.stdout + done.stderr).lower() or "No route" in done.stderr


# --- certificates --------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: trustme.CA
    folder: Path
    ca_file: str
    proxy_cert: str  # proxy-server: 127.0.0.1, localhost, ROOT_IP
    proxy_key: str
    agent_cert: str  # proxy-agent's client certificate (mTLS mode)
    agent_key: str
    egress_cert: str  # kube-apiserver's client certificate for the HTTP-CONNECT TCP frontend
    egress_key: str
    kubelet_cert: str  # the fake kubelet: KUBELET_IP
    kubelet_key: str


def make_pki(folder: Path, w: Worker) -> Pki:
    ca = trustme.CA()
    issued = {
        "proxy": ca.issue_cert("127.0.0.1", "localhost", w.root_ip),
        "agent": ca.issue_cert("agent.kf.test", common_name="kf-agent"),
        "egress": ca.issue_cert("apiserver.kf.test", common_name="kube-apiserver"),
        "kubelet": ca.issue_cert(w.kubelet_ip, NODE_NAME, f"kubelet.{WEBHOOK_NAMESPACE}.svc"),
    }
    (folder / "ca.pem").write_bytes(ca.cert_pem.bytes())
    paths: dict[str, str] = {}
    for name, cert in issued.items():
        (folder / f"{name}.pem").write_bytes(cert.cert_chain_pems[0].bytes())
        (folder / f"{name}.key").write_bytes(cert.private_key_pem.bytes())
        paths[name] = str(folder / f"{name}.pem")
        paths[f"{name}-key"] = str(folder / f"{name}.key")
    return Pki(
        ca,
        folder,
        str(folder / "ca.pem"),
        paths["proxy"],
        paths["proxy-key"],
        paths["agent"],
        paths["agent-key"],
        paths["egress"],
        paths["egress-key"],
        paths["kubelet"],
        paths["kubelet-key"],
    )


# --- processes -------------------------------------------------------------------------------


def program(which: str, impl: str, upstream: Upstream) -> list[str]:
    """``which`` = "server" | "agent" of ``impl`` = "ours" | "upstream"."""
    if impl == "upstream":
        return [str(upstream.proxy_server if which == "server" else upstream.proxy_agent)]
    return [sys.executable, "-m", f"konnectivity_fast.{which}"]


@dataclass
class ProxyServer:
    name: str
    proc: subprocess.Popen[bytes]
    agent_port: int
    health_port: int
    admin_port: int

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics (on the admin port) as {series: value}."""
        body = http_get(f"http://127.0.0.1:{self.admin_port}/metrics")[1].decode()
        out: dict[str, float] = {}
        for family in parse_exposition(body).values():
            out.update(family.samples)
        return out

    def ready(self) -> bool:
        try:
            return http_get(f"http://127.0.0.1:{self.health_port}/readyz", timeout=2)[0] == 200
        except OSError:
            return False


@dataclass
class Harness:
    """What a test runs against: the worker, the PKI, the apiserver of the current
    egress mode, the frontend endpoints its egress configuration names."""

    worker: Worker
    pki: Pki
    upstream: Upstream
    uds: str
    frontend_port: int
    folder: Path
    apiservers: ApiServers
    procs: Processes = field(init=False)

    def __post_init__(self) -> None:
        self.procs = Processes(self.folder)

    def start_server(
        self,
        impl: str,
        mode: str,
        name: str,
        *extra: str,
        agent_bind: str = "",
        uds: str = "",
        agent_port: int = 0,
    ) -> ProxyServer:
        """A proxy-server whose frontend is the one the apiserver's egress configuration
        names (or, with ``uds``, a Unix socket of its own: one of several servers);
        ``agent_port``: one reserved by the caller (0: a free one)."""
        protocol, transport = MODES[mode]
        if uds:
            transport = "uds"
        agent, health, admin = free_ports(3)
        agent = agent_port or agent
        args = [
            *program("server", impl, self.upstream),
            f"--mode={'grpc' if protocol == 'GRPC' else 'http-connect'}",
            f"--server-id={name}",
            f"--cluster-cert={self.pki.proxy_cert}",
            f"--cluster-key={self.pki.proxy_key}",
            f"--agent-bind-address={agent_bind or self.worker.root_ip}",
            f"--agent-port={agent}",
            "--health-bind-address=127.0.0.1",
            f"--health-port={health}",
            "--admin-bind-address=127.0.0.1",
            f"--admin-port={admin}",
        ]
        if transport == "uds":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(uds or self.uds)
            args += [f"--uds-name={uds or self.uds}", "--server-port=0"]
        else:
            args += [
                "--server-bind-address=127.0.0.1",
                f"--server-port={self.frontend_port}",
                f"--server-ca-cert={self.pki.ca_file}",
                f"--server-cert={self.pki.proxy_cert}",
                f"--server-key={self.pki.proxy_key}",
            ]
        proc = self.procs.start(f"server-{name}", [*args, *extra])
        server = ProxyServer(name, proc, agent, health, admin)
        wait(lambda: _healthy(server), f"proxy-server {name} health", proc)
        return server

    def start_agent(
        self,
        impl: str,
        name: str,
        port: int,
        *extra: str,
        host: str = "",
        worker: Worker | None = None,
    ) -> subprocess.Popen[bytes]:
        """A proxy-agent in the worker namespace (``worker``'s if given) dialing ``host``
        (ROOT_IP) : ``port``."""
        worker = worker or self.worker
        health, admin = free_ports(2)  # free in the worker namespace: nothing else there
        args = [
            *program("agent", impl, self.upstream),
            f"--ca-cert={self.pki.ca_file}",
            f"--proxy-server-host={host or worker.root_ip}",
            f"--proxy-server-port={port}",
            "--health-server-host=127.0.0.1",
            f"--health-server-port={health}",
            "--admin-bind-address=127.0.0.1",
            f"--admin-server-port={admin}",
            f"--agent-id={name}",
            "--sync-interval=200ms",
            "--sync-interval-cap=1s",
            *extra,
        ]
        proc = self.procs.start(f"agent-{name}", worker.cmd(args))
        proc.health_port = health  # type: ignore[attr-defined]
        proc.worker = worker  # type: ignore[attr-defined]
        return proc

    def agent_metrics(self, agent: subprocess.Popen[bytes]) -> dict[str, float]:
        """The agent's /metrics, fetched from inside its worker namespace."""
        port = agent.health_port  # type: ignore[attr-defined]
        worker: Worker = agent.worker  # type: ignore[attr-defined]
        done = subprocess.run(
            worker.cmd(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{port}/metrics"]),
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if done.returncode != 0:
            return {}
        out: dict[str, float] = {}
        for family in parse_exposition(done.stdout).values():
            out.update(family.samples)
        return out

    def mtls_agent_args(self) -> list[str]:
        return [f"--agent-cert={self.pki.agent_cert}", f"--agent-key={self.pki.agent_key}"]


def _healthy(server: ProxyServer) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{server.health_port}/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def wait(
    predicate: Callable[[], bool],
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
    timeout: float = WAIT_SECONDS,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode}")
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out waiting for {what}")


# --- kube-apiserver with an egress selector ------------------------------------------------------


def egress_config(mode: str, uds: str, frontend_port: int, pki: Pki) -> str:
    protocol, transport = MODES[mode]
    if transport == "uds":
        transport_yaml = f"      uds:\n        udsName: {uds}\n"
    else:
        transport_yaml = (
            "      tcp:\n"
            f"        url: https://127.0.0.1:{frontend_port}\n"
            "        tlsConfig:\n"
            f"          caBundle: {pki.ca_file}\n"
            f"          clientKey: {pki.egress_key}\n"
            f"          clientCert: {pki.egress_cert}\n"
        )
    return (
        "apiVersion: apiserver.k8s.io/v1beta1\n"
        "kind: EgressSelectorConfiguration\n"
        "egressSelections:\n"
        "- name: cluster\n"
        "  connection:\n"
        f"    proxyProtocol: {protocol}\n"
        "    transport:\n" + transport_yaml
    )


class ApiServers:
    """One kube-apiserver at a time (the egress configuration is read at start-up), all
    on one etcd, each under its own prefix; the current one is replaced when a test asks
    for another mode. Each gets the worker's Node registered."""

    def __init__(
        self, bin_dir: Path, folder: Path, pki: Pki, worker: Worker, *, uds: str, frontend_port: int
    ) -> None:
        self.bin_dir, self.folder, self.pki, self.worker = bin_dir, folder, pki, worker
        self.uds, self.frontend_port = uds, frontend_port
        self._stack = contextlib.ExitStack()
        self._etcd = self._stack.enter_context(running_etcd(bin_dir, folder))
        self._current: tuple[str, KubeCluster, contextlib.ExitStack] | None = None

    @property
    def etcd_url(self) -> str:
        """The shared etcd, for apiservers started elsewhere (each with its own prefix)."""
        return self._etcd

    def get(self, mode: str = "") -> KubeCluster:
        """The apiserver for ``mode``; "" means whichever runs (the first mode if none)."""
        if self._current is not None and mode in ("", self._current[0]):
            return self._current[1]
        self.stop_current()
        mode = mode or next(iter(MODES))
        folder = self.folder / f"apiserver-{mode}"
        folder.mkdir(exist_ok=True)
        config = folder / "egress.yaml"
        config.write_text(egress_config(mode, self.uds, self.frontend_port, self.pki))
        stack = contextlib.ExitStack()
        cluster = stack.enter_context(
            running_apiserver(
                self.bin_dir,
                folder,
                self._etcd,
                ca=self.pki.ca,
                bind=self.worker.root_ip,
                etcd_prefix=f"/registry-{mode}",
                extra_args=(
                    f"--egress-selector-config-file={config}",
                    # Webhooks named by a Service go to its endpoint, not its ClusterIP (no
                    # kube-proxy serves ClusterIPs in the worker).
                    "--enable-aggregator-routing=true",
                ),
            )
        )
        self._current = (mode, cluster, stack)
        register_node(cluster, self.worker)
        return cluster

    @property
    def mode(self) -> str:
        """The egress mode of the running apiserver (the first mode if none runs yet)."""
        return self._current[0] if self._current is not None else next(iter(MODES))

    def stop_current(self) -> None:
        if self._current is not None:
            self._current[2].close()
            self._current = None

    def close(self) -> None:
        self.stop_current()
        self._stack.close()


# --- kubectl -------------------------------------------------------------------------------------


def kubectl(
    cluster: KubeCluster, *args: str, stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(
        [str(kubectl_path()), f"--kubeconfig={cluster.kubeconfig}", "--request-timeout=30s", *args],
        input=stdin,
        capture_output=True,
        timeout=KUBECTL_SECONDS,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.decode()[-2000:]}"
        )
    return done


def apply(cluster: KubeCluster, *objects: dict[str, Any]) -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    kubectl(cluster, "apply", "-f", "-", stdin=json.dumps(doc).encode())


def get_json(cluster: KubeCluster, *args: str) -> Any:
    return json.loads(kubectl(cluster, "get", "-o", "json", *args).stdout)


def kubectl_path() -> Path:
    return ROOT / ".cache" / "kube" / kube_version() / "bin" / "kubectl"


def register_node(cluster: KubeCluster, w: Worker, name: str = NODE_NAME) -> None:
    """A Node whose InternalIP and kubelet port are the fake kubelet's, as a kubelet
    registers itself (the status is written through its subresource)."""
    apply(cluster, {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    status = {
        "status": {
            "addresses": [{"type": "InternalIP", "address": w.kubelet_ip}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "fake kubelet",
                }
            ],
        }
    }
    kubectl(
        cluster,
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(status),
    )


def new_namespace(cluster: KubeCluster, prefix: str, labels: dict[str, str] | None = None) -> str:
    name = f"{prefix}-{random.Random().randrange(16**6):06x}"
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": labels or {}},
        },
    )
    return name


def admin_ssl(cluster: KubeCluster) -> ssl.SSLContext:
    """A client context with a fresh system:masters certificate, for raw HTTP/1.1."""
    ctx = ssl.create_default_context(cadata=cluster.ca_pem.decode())
    cert = cluster.ca.issue_cert(
        "kf-raw.users.test", common_name="kf-raw", organization_name="system:masters"
    )
    cert.configure_cert(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# --- a round-robin TCP balancer (root namespace) -------------------------------------------------


class _Pipe(socketserver.BaseRequestHandler):
    server: Balancer

    def handle(self) -> None:
        backend = self.server.next_backend()
        if backend is None:
            return
        try:
            upstream = socket.create_connection(backend, timeout=5)
        except OSError:
            return
        upstream.settimeout(None)
        done = threading.Event()

        def pump(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while data := src.recv(65536):
                    dst.sendall(data)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            done.set()

        t = threading.Thread(target=pump, args=(upstream, self.request), daemon=True)
        t.start()
        pump(self.request, upstream)
        t.join()
        upstream.close()


class Balancer(socketserver.ThreadingTCPServer):
    """An L4 round-robin balancer (like a Service in front of the proxy-servers): each
    accepted connection goes to the next backend of ``backends``, which tests change."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address, _Pipe)
        self.backends: list[tuple[str, int]] = []
        self._i = 0
        self._lock = threading.Lock()

    def next_backend(self) -> tuple[str, int] | None:
        with self._lock:
            if not self.backends:
                return None
            self._i = (self._i + 1) % len(self.backends)
            return self.backends[self._i]


@contextlib.contextmanager
def balancer(host: str) -> Iterator[Balancer]:
    (port,) = free_ports(1, host)
    lb = Balancer((host, port))
    thread = threading.Thread(target=lb.serve_forever, name="balancer", daemon=True)
    thread.start()
    try:
        yield lb
    finally:
        lb.shutdown()
        lb.server_close()
        thread.join(timeout=10)
