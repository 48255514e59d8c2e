"""The agent imports only what runs (issue 15 item 4; docs/architecture.md, "The agent's
imports"): every module stays resident for the life of the process, and the agent is the
program run on every node, under upstream's 30 MiB memory limit.

The real ``proxy-agent`` is run until its health server answers (start-up is over: flags,
klog, the allocator settings, TLS, the first connection attempts), then stopped with two
SIGTERMs; at exit it writes the names in ``sys.modules``. None of ``HEAVY`` may be among
them. ``--count-server-leases`` is the one feature that brings the Kubernetes client in.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.net import agent_loopback_args

from .conftest import Certs
from .test_app import get

pytestmark = pytest.mark.timeout(120)

RUN_SECONDS = 30

#: Module -> why the agent must not load it by default.
HEAVY = {
    "konnectivity_fast.kube.client": "the Kubernetes client: only with --count-server-leases",
    "konnectivity_fast.kube.config": "kubeconfig loading: only with --count-server-leases",
    "konnectivity_fast.agent.leases": "lease counting: only with --count-server-leases",
    "konnectivity_fast.tunnel.router": "the proxy-server's routing state",
    "konnectivity_fast.tunnel.backends": "the proxy-server's strategies",
    "konnectivity_fast.server": "the other program",
    "konnectivity_fast.cli.server_options": "the other program's flags",
    "konnectivity_fast.cli.demo": "the demo",
    "konnectivity_fast.cli.doctor": "the doctor",
    "email": "email.utils (HTTP dates): about 1 MiB; transport/http.py formats its own",
    "ctypes": "the allocator calls go through the compiled core (csrc/process.pxi)",
    "uuid": "imports platform and more; the agent ID is made by goparse.new_uuid",
    "tempfile": "only for klog's files under --log-dir",
    "getpass": "only for klog's file names",
    "json": "only when /debug/tunnels is asked for",
    "http.client": "no HTTP client in the agent",
    "urllib.request": "no HTTP client in the agent",
    "yaml": "no YAML in the agent",
    "grpc": "the engine is ours",
    "google.protobuf": "the codec is ours",
}

# Runs the real program, then writes sys.modules at interpreter exit.
RUNNER = """
import atexit, os, sys

def _dump():
    with open(os.environ["KF_MODULES_OUT"], "w") as f:
        f.write("\\n".join(sorted(sys.modules)))

atexit.register(_dump)
from konnectivity_fast.cli.proxy_agent import main

sys.exit(main(sys.argv[1:]))
"""


def agent_modules(certs: Certs, tmp_path: Path, *extra: str) -> set[str]:
    out = tmp_path / "modules.txt"
    log = tmp_path / "agent.log"
    args = agent_loopback_args()
    health = int(next(a for a in args if a.startswith("--health-server-port=")).split("=")[1])
    env = {**os.environ, "KF_MODULES_OUT": str(out)}
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER, *args, f"--ca-cert={certs.ca}", *extra],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        for _ in range(RUN_SECONDS * 10):
            if proc.poll() is not None:
                break
            try:
                if get(health, "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)  # drain
        for _ in range(RUN_SECONDS * 10):
            if "draining" in log.read_text():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # stop
        assert proc.wait(RUN_SECONDS) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return set(out.read_text().split())


def loaded(modules: set[str], name: str) -> bool:
    return name in modules or any(m.startswith(name + ".") for m in modules)


def test_the_running_agent_loads_no_heavy_module(certs: Certs, tmp_path: Path) -> None:
    modules = agent_modules(certs, tmp_path)
    assert "konnectivity_fast.agent.client" in modules  # it did run
    found = {name: why for name, why in HEAVY.items() if loaded(modules, name)}
    assert found == {}


def test_importing_the_agent_loads_no_heavy_module() -> None:
    """The same at import, in a fresh interpreter: what a test or a tool embedding the
    agent pays."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nimport konnectivity_fast.cli.proxy_agent\n"
            "print('\\n'.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=True,
    )
    modules = set(done.stdout.split())
    found = {name: why for name, why in HEAVY.items() if loaded(modules, name)}
    assert found == {}
