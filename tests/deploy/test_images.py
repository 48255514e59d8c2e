"""The built proxy-server and proxy-agent images (deploy/images/build.sh), run from their own
root filesystems as a container runtime would run them (see tests/deploy/images.py): their
configuration (entrypoints /proxy-server and /proxy-agent, non-root, the compiled core
required), ``--help`` of each, the compiled core loading the image's own libnghttp2 on a
read-only root, and a server and an agent from the images carrying tunneled requests to a
backend on loopback (HTTP-CONNECT over the server's Unix socket, in a folder bound into the
server's root like a shared volume)."""

from __future__ import annotations

import contextlib
import http.client
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import nsclient  # a standalone HTTP-CONNECT client
from tests.support.net import Certs, certs, free_ports

from .images import IMAGES, Bundle, ensure_built, running, unpack

__all__ = ["certs"]

pytestmark = pytest.mark.timeout(1500)

LOOPBACK = "127.0.0.1"
# Bound on one short program run (--help, an import check) and on waiting for a program.
RUN_SECONDS = 60
WAIT_SECONDS = 60.0
POLL_SECONDS = 0.1
BACKEND = Path(__file__).resolve().parents[1] / "support" / "backend.py"
# Where the volumes are bound inside the images.
CERTS_DIR = "/etc/konnectivity"
SOCKET_DIR = "/run/konnectivity"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    ensure_built()
    return {name: unpack(name, tmp_path_factory.mktemp(name)) for name in IMAGES}


def run_in(bundle: Bundle, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bundle.command(argv), capture_output=True, text=True, timeout=RUN_SECONDS, check=False
    )


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_for(what: str, predicate: object, proc: subprocess.Popen[bytes], log: Path) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} waiting for {what}:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            if predicate():
                return
        time.sleep(POLL_SECONDS)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")


@pytest.mark.parametrize("name", IMAGES)
def test_image_configuration(bundles: dict[str, Bundle], name: str) -> None:
    bundle = bundles[name]
    assert bundle.args == [f"/{name}"]  # upstream's manifests and k0s's DaemonSet rely on it
    assert (bundle.uid, bundle.gid) == (65534, 65534)
    assert bundle.env_map["KONNECTIVITY_FAST_REQUIRE_COMPILED"] == "1"
    # No shell and no package manager at run time; the preStop `sleep` is there.
    for absent in ("bin/sh", "usr/bin/dash", "usr/bin/bash", "usr/bin/dpkg", "usr/bin/apt"):
        assert not (bundle.rootfs / absent).exists(), absent
    assert (bundle.rootfs / "usr/bin/sleep").is_file()


@pytest.mark.parametrize(
    ("name", "flag"), [("proxy-server", "--uds-name"), ("proxy-agent", "--proxy-server-host")]
)
def test_entrypoint_help(bundles: dict[str, Bundle], name: str, flag: str) -> None:
    proc = subprocess.run(
        bundles[name].entrypoint(["--help"]),
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert flag in proc.stdout
    assert proc.stdout.startswith("Usage:") or "Usage:" in proc.stdout


def test_compiled_core_with_the_images_libnghttp2(bundles: dict[str, Bundle]) -> None:
    bundle = bundles["proxy-server"]
    probe = (
        "import konnectivity_fast._compiled as c, konnectivity_fast._wire\n"
        "maps = open('/proc/self/maps').read().split()\n"
        "print(c.IMPLEMENTATION)\n"
        "print(sorted({p for p in maps if 'libnghttp2' in p}))\n"
    )
    proc = run_in(bundle, ["/usr/bin/python3", "-I", "-c", probe])
    assert proc.returncode == 0, proc.stderr
    implementation, libs = proc.stdout.splitlines()
    assert implementation == "compiled"
    assert libs.startswith("['/usr/lib/x86_64-linux-gnu/libnghttp2.so.14"), libs
    # The root is read-only and nothing writes byte code: start-up needs no writable root.
    proc = run_in(bundle, ["/usr/bin/python3", "-I", "-c", "open('/probe', 'w')"])
    assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr
    proc = run_in(bundle, ["/usr/bin/sleep", "0.1"])
    assert proc.returncode == 0, proc.stderr


def test_server_and_agent_images_carry_a_tunnel(
    bundles: dict[str, Bundle], certs: Certs, tmp_path: Path
) -> None:
    # Volumes: the certificates (read by the image's user) and the socket folder.
    cert_dir = tmp_path / "certs"
    cert_dir.mkdir(mode=0o755)
    for src in (certs.ca, certs.server_cert, certs.server_key, certs.client_cert, certs.client_key):
        shutil.copy(src, cert_dir / Path(src).name)
        (cert_dir / Path(src).name).chmod(0o644)
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    sock_dir.chmod(0o777)
    agent_port, health, admin, agent_health, agent_admin, backend_port = free_ports(6)
    c = CERTS_DIR
    server_args = [
        f"--uds-name={SOCKET_DIR}/konnectivity-server.socket",
        "--delete-existing-uds-file",
        "--server-port=0",
        "--mode=http-connect",
        f"--cluster-cert={c}/{Path(certs.server_cert).name}",
        f"--cluster-key={c}/{Path(certs.server_key).name}",
        f"--cluster-ca-cert={c}/{Path(certs.ca).name}",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={agent_port}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-port={admin}",
        "--server-id=image-server",
        "--server-count=1",
    ]
    agent_args = [
        f"--ca-cert={c}/{Path(certs.ca).name}",
        f"--agent-cert={c}/{Path(certs.client_cert).name}",
        f"--agent-key={c}/{Path(certs.client_key).name}",
        f"--proxy-server-host={LOOPBACK}",
        f"--proxy-server-port={agent_port}",
        f"--health-server-host={LOOPBACK}",
        f"--health-server-port={agent_health}",
        f"--admin-server-port={agent_admin}",
        "--agent-id=image-agent",
        "--agent-identifiers=host=127.0.0.1",
        "--sync-interval=200ms",
    ]
    server_binds = {cert_dir: CERTS_DIR, sock_dir: SOCKET_DIR}
    with contextlib.ExitStack() as stack:
        backend_log = tmp_path / "backend.log"
        backend = stack.enter_context(
            running(
                [
                    sys.executable,
                    str(BACKEND),
                    f"--host={LOOPBACK}",
                    f"--port={backend_port}",
                    "--name=loopback-backend",
                    "--ttl=600",
                ],
                backend_log,
            )
        )
        server_log = tmp_path / "server.log"
        server = stack.enter_context(
            running(bundles["proxy-server"].entrypoint(server_args, server_binds), server_log)
        )
        wait_for(
            "server /healthz", lambda: http_get(health, "/healthz")[0] == 200, server, server_log
        )
        agent_log = tmp_path / "agent.log"
        agent = stack.enter_context(
            running(bundles["proxy-agent"].entrypoint(agent_args, {cert_dir: CERTS_DIR}), agent_log)
        )
        wait_for(
            "agent /readyz", lambda: http_get(agent_health, "/readyz")[0] == 200, agent, agent_log
        )
        wait_for(
            "server /readyz", lambda: http_get(health, "/readyz")[0] == 200, server, server_log
        )
        wait_for("backend", lambda: "listening" in backend_log.read_text(), backend, backend_log)
        uds = str(sock_dir / "konnectivity-server.socket")
        target = f"{LOOPBACK}:{backend_port}"
        sock = nsclient.open_tunnel(uds, target, timeout=30)
        with sock:
            status, body = nsclient.request(sock, "GET", "/whoami")
        assert (status, body) == (200, b"loopback-backend 127.0.0.1")
        payload = random.Random(7).randbytes(4 << 20)
        sock = nsclient.open_tunnel(uds, target, timeout=30)
        with sock:
            status, body = nsclient.request(sock, "POST", "/echo", payload)
        assert status == 200
        assert body == payload
        # Metrics of both programs, as Prometheus scrapes them.
        status, text = http_get(admin, "/metrics")
        assert status == 200 and b"konnectivity_network_proxy_server_" in text
        status, text = http_get(agent_health, "/metrics")
        assert status == 200
        assert b"konnectivity_network_proxy_agent_open_server_connections 1" in text
