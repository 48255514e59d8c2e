"""A real Kubernetes API for tests: etcd and kube-apiserver built by scripts/build-kube.sh,
started on loopback with certificates made here.

``kube_cluster`` is a session fixture; a test module uses it with
``kube_cluster = kubeapi.kube_cluster`` (an assignment, so linters see no shadowed
import). Every module shares one cluster per pytest process (cached on the config) and
it is stopped when the session ends.

What runs:
- etcd on 127.0.0.1 (plain HTTP: loopback only, test data), ``--unsafe-no-fsync``;
- kube-apiserver on 127.0.0.1 with TLS (a trustme CA), client certificates from the same
  CA, a service-account signing key pair made with ``cryptography``,
  ``--service-account-issuer``/``--api-audiences`` = ``ISSUER``, and RBAC;
- an admin client certificate (group ``system:masters``) and a kubeconfig for it;
- ``STATIC_TOKENS`` (``--token-auth-file``): users that are not service accounts.

When the binaries are missing the tests skip, unless ``CI=true`` or ``KF_REQUIRE_KUBE``
is set: then they fail, telling to run scripts/build-kube.sh first.
"""

from __future__ import annotations

import base64
import contextlib
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from konnectivity_fast.kube import KubeClient, load_config

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-kube.sh"
ISSUER = "https://kubernetes.default.svc.cluster.local"
# Bounds on start-up (a slow shared machine: kube-apiserver's post-start hooks take a
# few seconds) and on teardown.
ETCD_START_TIMEOUT = 60.0
APISERVER_START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
# Static tokens (--token-auth-file) for users that are not service accounts: token -> user.
STATIC_TOKENS = {"kf-plain-token": "alice", "kf-colon-token": "a:b:c:d"}


@dataclass(frozen=True)
class KubeCluster:
    server: str  # https://127.0.0.1:<port>
    kubeconfig: str  # admin kubeconfig (certificate data embedded)
    folder: Path
    ca_pem: bytes
    ca: trustme.CA

    def user_kubeconfig(self, name: str, groups: tuple[str, ...] = ()) -> str:
        """A kubeconfig with a client certificate for user ``name`` (no RBAC rights
        unless granted), written next to the admin one."""
        path = self.folder / f"{name}.kubeconfig"
        if not path.exists():
            cert = self.ca.issue_cert(
                f"{name}.users.test", common_name=name, organization_name=",".join(groups) or None
            )
            _write_kubeconfig(
                path,
                self.server,
                self.ca_pem,
                cert.cert_chain_pems[0].bytes(),
                cert.private_key_pem.bytes(),
            )
        return str(path)


def kube_version() -> str:
    """The Kubernetes release the tests use: ``KF_KUBE_VERSION`` if set (one that
    ``scripts/build-kube.sh <version>`` built), else the script's pinned default."""
    return os.environ.get("KF_KUBE_VERSION") or _script_value("DEFAULT_KUBE_VERSION")


def binaries_folder(*names: str) -> Path | None:
    """The folder scripts/build-kube.sh builds the chosen version into, once the
    binaries named (default: etcd and kube-apiserver) are there."""
    folder = ROOT / ".cache" / "kube" / kube_version() / "bin"
    if all((folder / name).is_file() for name in names or ("kube-apiserver", "etcd")):
        return folder
    return None


def _script_value(name: str) -> str:
    for line in BUILD_SCRIPT.read_text().splitlines():
        if line.startswith(f"{name}="):
            return line.split("=", 1)[1].split()[0]
    raise AssertionError(f"{name} not found in {BUILD_SCRIPT}")


def required() -> bool:
    """Missing binaries fail the tests (CI, or KF_REQUIRE_KUBE) instead of skipping them."""
    return os.environ.get("CI") == "true" or bool(os.environ.get("KF_REQUIRE_KUBE"))


@pytest.fixture(scope="session")
def kube_cluster(request: pytest.FixtureRequest) -> KubeCluster:
    cached = request.config.stash.get(_CLUSTER_KEY, None)
    if cached is not None:
        return cached
    folder = binaries_folder()
    if folder is None:
        message = "kube-apiserver/etcd not built: run scripts/build-kube.sh first"
        if required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    tmp = request.getfixturevalue("tmp_path_factory").mktemp("kube")
    stack = contextlib.ExitStack()
    request.config.add_cleanup(stack.close)
    cluster = stack.enter_context(_running_cluster(folder, tmp))
    request.config.stash[_CLUSTER_KEY] = cluster
    return cluster


_CLUSTER_KEY = pytest.StashKey[KubeCluster]()


@contextlib.contextmanager
def _running_cluster(bin_dir: Path, tmp: Path) -> Iterator[KubeCluster]:
    with running_etcd(bin_dir, tmp) as etcd_url:
        with running_apiserver(bin_dir, tmp, etcd_url) as cluster:
            yield cluster


@contextlib.contextmanager
def running_etcd(bin_dir: Path, tmp: Path) -> Iterator[str]:
    """etcd on 127.0.0.1 with its data in ``tmp/etcd``; yields its client URL. Several
    apiservers may share it, each with its own ``--etcd-prefix``."""
    etcd_port, peer_port = _free_ports(2)
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    with _process(
        [
            str(bin_dir / "etcd"),
            "--name=kf",
            f"--data-dir={tmp / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=kf=http://127.0.0.1:{peer_port}",
            "--log-level=warn",
            "--unsafe-no-fsync",
        ],
        tmp / "etcd.log",
    ) as proc:
        _wait_http(f"{etcd_url}/health", None, ETCD_START_TIMEOUT, tmp / "etcd.log", proc)
        yield etcd_url


@contextlib.contextmanager
def running_apiserver(
    bin_dir: Path,
    tmp: Path,
    etcd_url: str,
    *,
    ca: trustme.CA | None = None,
    bind: str = "127.0.0.1",
    extra_args: tuple[str, ...] = (),
    etcd_prefix: str = "/registry",
) -> Iterator[KubeCluster]:
    """kube-apiserver on ``bind`` (a free port) with its files in ``tmp``; ``extra_args``
    are appended to its command line (a later flag wins for single-valued ones)."""
    tmp.mkdir(parents=True, exist_ok=True)
    ca = ca or trustme.CA()
    names = dict.fromkeys(("127.0.0.1", bind, "localhost", "kubernetes", "kubernetes.default.svc"))
    serving = ca.issue_cert(*names)
    # Go refuses a certificate with an empty SAN extension (trustme's default without
    # identities), so client certificates get a name too.
    admin = ca.issue_cert(
        "kf-admin.users.test", common_name="kf-admin", organization_name="system:masters"
    )
    files = {
        "ca.pem": ca.cert_pem.bytes(),
        "serving.pem": serving.cert_chain_pems[0].bytes(),
        "serving.key": serving.private_key_pem.bytes(),
    }
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files["sa.key"] = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    files["sa.pub"] = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    files["tokens.csv"] = "".join(
        f"{token},{user},uid-{i}\n" for i, (token, user) in enumerate(STATIC_TOKENS.items())
    ).encode()
    for name, blob in files.items():
        (tmp / name).write_bytes(blob)
    (api_port,) = _free_ports(1, bind)
    server = f"https://{bind}:{api_port}"
    with _process(
        [
            str(bin_dir / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            f"--etcd-prefix={etcd_prefix}",
            f"--bind-address={bind}",
            f"--advertise-address={bind}",
            f"--secure-port={api_port}",
            f"--tls-cert-file={tmp / 'serving.pem'}",
            f"--tls-private-key-file={tmp / 'serving.key'}",
            f"--client-ca-file={tmp / 'ca.pem'}",
            f"--service-account-issuer={ISSUER}",
            f"--api-audiences={ISSUER}",
            f"--service-account-key-file={tmp / 'sa.pub'}",
            f"--service-account-signing-key-file={tmp / 'sa.key'}",
            f"--token-auth-file={tmp / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/24",
            # The "kubernetes" Service's endpoint may not be a loopback address.
            "--endpoint-reconciler-type=none",
            f"--cert-dir={tmp / 'apiserver-certs'}",
            "--profiling=false",
            "--v=1",
            *extra_args,
        ],
        tmp / "kube-apiserver.log",
    ) as proc:
        admin_ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
        admin.configure_cert(admin_ctx)
        _wait_http(
            f"{server}/readyz",
            admin_ctx,
            APISERVER_START_TIMEOUT,
            tmp / "kube-apiserver.log",
            proc,
        )
        kubeconfig = tmp / "admin.kubeconfig"
        _write_kubeconfig(
            kubeconfig,
            server,
            ca.cert_pem.bytes(),
            admin.cert_chain_pems[0].bytes(),
            admin.private_key_pem.bytes(),
        )
        yield KubeCluster(server, str(kubeconfig), tmp, ca.cert_pem.bytes(), ca)


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.contextmanager
def _process(argv: list[str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_http(
    url: str,
    ctx: ssl.SSLContext | None,
    timeout: float,
    log: Path,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            last = f"the process exited {proc.returncode}"
            break
        try:
            with urllib.request.urlopen(url, timeout=5, context=ctx) as response:
                if response.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise AssertionError(f"{url} not ready after {timeout} s ({last}); log tail:\n{tail}")


def _write_kubeconfig(path: Path, server: str, ca: bytes, cert: bytes, key: bytes) -> None:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    path.write_text(
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: kf\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority-data: {b64(ca)}\n"
        "contexts:\n"
        "- name: kf\n"
        "  context:\n"
        "    cluster: kf\n"
        "    user: kf\n"
        "current-context: kf\n"
        "users:\n"
        "- name: kf\n"
        "  user:\n"
        f"    client-certificate-data: {b64(cert)}\n"
        f"    client-key-data: {b64(key)}\n"
    )
    path.chmod(0o600)


async def create_namespace(client: KubeClient, prefix: str) -> str:
    """A new namespace named ``<prefix>-<random>``, so tests sharing the cluster never see
    each other's objects."""
    created = await client.request(
        "POST",
        "/api/v1/namespaces",
        body={"apiVersion": "v1", "kind": "Namespace", "metadata": {"generateName": f"{prefix}-"}},
    )
    return str(created["metadata"]["name"])


def admin_client(cluster: KubeCluster) -> KubeClient:
    """A client with the admin kubeconfig and no rate limit (tests make bursts of calls)."""
    return KubeClient(load_config(cluster.kubeconfig, qps=-1))


# A Lease's duration as upstream's servers write it.
LEASE_DURATION = 30


def micro_time(when: datetime) -> str:
    """Kubernetes' MicroTime, written independently of the code under test."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease(
    name: str,
    labels: dict[str, str],
    renewed: datetime | None = None,
    acquired: datetime | None = None,
    duration: int | None = LEASE_DURATION,
) -> dict[str, Any]:
    """A coordination.k8s.io/v1 Lease held by ``name``; None leaves a field out."""
    spec: dict[str, Any] = {"holderIdentity": name}
    if duration is not None:
        spec["leaseDurationSeconds"] = duration
    if renewed is not None:
        spec["renewTime"] = micro_time(renewed)
    if acquired is not None:
        spec["acquireTime"] = micro_time(acquired)
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
