"""The ``proxy-agent`` program with node-to-control-plane flags, as a process: the k0s
fork's command line starts it, its extension metrics appear only then, a client on the
local port is reset at once while no capable server is held, the first SIGTERM closes
the listener first, and a local port in use fails start-up with a clear message."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.net import free_ports

from .conftest import Certs
from .support import LOOPBACK
from .test_app import WAIT, agent_process, get, wait_for

pytestmark = pytest.mark.timeout(120)


def metrics_text(port: int) -> str:
    return get(port, "/metrics")[2].decode()


def reset_at_once(port: int) -> None:
    start = time.monotonic()
    # The reset may come before connect() has returned: it is that quick.
    with pytest.raises(ConnectionResetError):
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            data = sock.recv(1)
            pytest.fail(f"read {data!r}, not a reset")
    assert time.monotonic() - start < 1.0


def test_k0s_command_line_no_server_metrics_and_drain(certs: Certs, tmp_path: Path) -> None:
    closed, local = free_ports(2)
    with agent_process(
        certs,
        tmp_path,
        closed,
        "--feature-gates=NodeToMasterTraffic=true",
        f"--bind-address={LOOPBACK}",
        f"--apiserver-port-mapping={local}:localhost:6443",
    ) as agent:
        text = metrics_text(agent.health)
        assert "konnectivity_fast_agent_capable_servers 0" in text
        reset_at_once(local)
        wait_for(
            lambda: (
                f'konnectivity_fast_agent_local_connections_total{{local_port="{local}",'
                'result="no_server"} 1' in metrics_text(agent.health)
            ),
            "the no_server count",
        )
        agent.proc.proc.send_signal(signal.SIGTERM)  # drain: the listener closes first
        wait_for(lambda: _refused(local), "the listener to close")
        assert agent.proc.proc.poll() is None
        agent.proc.proc.send_signal(signal.SIGTERM)
        assert agent.proc.proc.wait(timeout=WAIT) == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_gate_false_listens_on_nothing_and_shows_no_metric(certs: Certs, tmp_path: Path) -> None:
    closed, local = free_ports(2)
    with agent_process(
        certs,
        tmp_path,
        closed,
        "--feature-gates=NodeToMasterTraffic=false",
        f"--apiserver-port-mapping={local}:localhost:6443",
    ) as agent:
        assert "konnectivity_fast_agent_" not in metrics_text(agent.health)
        assert _refused(local)


def test_local_port_in_use_fails_start(certs: Certs) -> None:
    closed, health, admin, port = free_ports(4)  # a local port must be 1024-49151
    with socket.socket() as taken:
        taken.bind((LOOPBACK, port))
        taken.listen()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "konnectivity_fast.agent",
                f"--ca-cert={certs.ca}",
                f"--proxy-server-port={closed}",
                f"--health-server-port={health}",
                f"--admin-server-port={admin}",
                f"--apiserver-port-mapping={port}:127.0.0.1:6443",
            ],
            capture_output=True,
            timeout=WAIT,
            check=False,
        )
    assert done.returncode == 1
    assert (
        f"Error: failed to run proxy connection with failed to start listening with "
        f"listen tcp 127.0.0.1:{port}: bind: address already in use"
    ) in done.stderr.decode()
