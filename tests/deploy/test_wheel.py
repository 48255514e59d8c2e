"""The installable wheel (``make wheel``, scripts/wheel.sh): built with the pinned libnghttp2
compiled in and repaired to a manylinux tag, installed with pip into a fresh virtualenv,
its programs run from there and carry a tunnel.

What proves it needs no libnghttp2 on the machine: the installed core names no
``libnghttp2`` among the libraries it needs (ELF ``NEEDED``), none is mapped into the running
programs, and the core reports the pinned release, not the system's (Debian 12's is 1.52).
The virtualenv gets the wheel's dependencies from the package index, as a user's would.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import nsclient  # a standalone HTTP-CONNECT client
from tests.support.net import Certs, certs, free_ports

from .test_images import BACKEND, LOOPBACK, http_get, wait_for

__all__ = ["certs"]

ROOT = Path(__file__).resolve().parents[2]
WHEEL_SCRIPT = ROOT / "scripts" / "wheel.sh"
FETCH_SCRIPT = ROOT / "scripts" / "fetch-nghttp2.sh"
# A cold build compiles libnghttp2 and the core (a few minutes on two shared cores), and
# the virtualenv downloads uvloop and cryptography from the index.
BUILD_SECONDS = 1200
INSTALL_SECONDS = 600
RUN_SECONDS = 60

pytestmark = pytest.mark.timeout(BUILD_SECONDS + INSTALL_SECONDS + 300)


def pinned_version() -> str:
    found = re.search(r"^readonly NGHTTP2_VERSION=(\S+)$", FETCH_SCRIPT.read_text(), re.M)
    assert found, "no NGHTTP2_VERSION in scripts/fetch-nghttp2.sh"
    return found.group(1)


def clean_env() -> dict[str, str]:
    """This environment without anything pointing Python at the checkout or its venv."""
    drop = ("PYTHON", "VIRTUAL_ENV", "KF_", "KONNECTIVITY_FAST_PURE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed by pip; its folder."""
    built = subprocess.run(
        ["bash", str(WHEEL_SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_SECONDS,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-6000:]
    wheel = Path(built.stdout.strip().splitlines()[-1])
    assert re.search(r"manylinux_\d+_\d+_x86_64", wheel.name), wheel.name
    folder = tmp_path_factory.mktemp("wheel") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, timeout=RUN_SECONDS)
    installed = subprocess.run(
        [str(folder / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=INSTALL_SECONDS,
        check=False,
        env=clean_env(),
        cwd=folder,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    return folder


def run_venv(venv: Path, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
        env=clean_env(),
        cwd=venv,
    )


@pytest.mark.parametrize(
    ("program", "flag"), [("proxy-server", "--uds-name"), ("proxy-agent", "--proxy-server-host")]
)
def test_installed_programs_answer_help(venv: Path, program: str, flag: str) -> None:
    done = run_venv(venv, [program, "--help"])
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout


def test_installed_core_carries_the_pinned_libnghttp2(venv: Path) -> None:
    probe = (
        "import konnectivity_fast, konnectivity_fast._wire as w\n"
        "print(konnectivity_fast.__file__)\nprint(w.__file__)\nprint(w.libnghttp2_version())\n"
        "maps = open('/proc/self/maps').read()\nprint('libnghttp2' in maps)\n"
    )
    done = run_venv(venv, ["python", "-c", probe])
    assert done.returncode == 0, done.stderr
    package, core, version, mapped = done.stdout.split("\n")[:4]
    assert package.startswith(str(venv)) and core.startswith(str(venv))
    assert version == pinned_version()
    assert mapped == "False"
    needed = subprocess.run(
        ["readelf", "-d", core], capture_output=True, text=True, timeout=RUN_SECONDS, check=True
    ).stdout
    libraries = re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", needed)
    assert not [lib for lib in libraries if "nghttp2" in lib], libraries
    licence = Path(core).parent / "NGHTTP2-COPYING"
    assert "Tatsuhiro Tsujikawa" in licence.read_text()


@contextlib.contextmanager
def running(argv: list[str], log: Path, cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env(), cwd=cwd
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def test_installed_programs_carry_a_tunnel(venv: Path, certs: Certs, tmp_path: Path) -> None:
    agent_port, health, admin, agent_health, agent_admin, backend_port = free_ports(6)
    uds = tmp_path / "konnectivity-server.socket"
    server_args = [
        f"--uds-name={uds}",
        "--server-port=0",
        "--mode=http-connect",
        f"--cluster-cert={certs.server_cert}",
        f"--cluster-key={certs.server_key}",
        f"--cluster-ca-cert={certs.ca}",
        f"--agent-bind-address={LOOPBACK}",
        f"--agent-port={agent_port}",
        f"--health-bind-address={LOOPBACK}",
        f"--health-port={health}",
        f"--admin-bind-address={LOOPBACK}",
        f"--admin-port={admin}",
        "--server-id=wheel-server",
        "--server-count=1",
    ]
    agent_args = [
        f"--ca-cert={certs.ca}",
        f"--agent-cert={certs.client_cert}",
        f"--agent-key={certs.client_key}",
        f"--proxy-server-host={LOOPBACK}",
        f"--proxy-server-port={agent_port}",
        f"--health-server-host={LOOPBACK}",
        f"--health-server-port={agent_health}",
        f"--admin-server-port={agent_admin}",
        "--agent-id=wheel-agent",
        "--agent-identifiers=host=127.0.0.1",
        "--sync-interval=200ms",
    ]
    backend_argv = [
        sys.executable,
        str(BACKEND),
        f"--host={LOOPBACK}",
        f"--port={backend_port}",
        "--name=loopback-backend",
        "--ttl=600",
    ]
    with contextlib.ExitStack() as stack:
        backend_log = tmp_path / "backend.log"
        backend = stack.enter_context(running(backend_argv, backend_log, tmp_path))
        server_log = tmp_path / "server.log"
        server = stack.enter_context(
            running([str(venv / "bin" / "proxy-server"), *server_args], server_log, tmp_path)
        )
        wait_for(
            "server /healthz", lambda: http_get(health, "/healthz")[0] == 200, server, server_log
        )
        agent_log = tmp_path / "agent.log"
        agent = stack.enter_context(
            running([str(venv / "bin" / "proxy-agent"), *agent_args], agent_log, tmp_path)
        )
        wait_for(
            "agent /readyz", lambda: http_get(agent_health, "/readyz")[0] == 200, agent, agent_log
        )
        wait_for(
            "server /readyz", lambda: http_get(health, "/readyz")[0] == 200, server, server_log
        )
        wait_for("backend", lambda: "listening" in backend_log.read_text(), backend, backend_log)
        for proc in (server, agent):
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            assert f"{venv}/lib/" in maps and "libnghttp2" not in maps
        target = f"{LOOPBACK}:{backend_port}"
        sock = nsclient.open_tunnel(str(uds), target, timeout=30)
        with sock:
            status, body = nsclient.request(sock, "GET", "/whoami")
        assert (status, body) == (200, b"loopback-backend 127.0.0.1")
        payload = random.Random(15).randbytes(4 << 20)
        sock = nsclient.open_tunnel(str(uds), target, timeout=30)
        with sock:
            status, body = nsclient.request(sock, "POST", "/echo", payload)
        assert status == 200
        assert body == payload
        status, text = http_get(agent_health, "/metrics")
        assert status == 200
        assert b"konnectivity_network_proxy_agent_open_server_connections 1" in text
