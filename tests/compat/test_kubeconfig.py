"""Kubeconfig booleans as client-go reads them, against upstream v0.36.0's binary side by
side: ``insecure-skip-tls-verify`` written in each YAML 1.1 spelling (``yes``, ``On``,
``Y``...), quoted, or as a number.

Each agent (upstream's and ours, ``--count-server-leases --kubeconfig=...``) lists Leases
from a TLS server whose certificate no CA in the kubeconfig vouches for. What that server
sees tells how the flag was read: an HTTP request (verification skipped), a refused
handshake (verified), or nothing because the program refused the kubeconfig, in which case
its ``Error:`` line is compared.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from tests.support.net import Certs, agent_loopback_args
from tests.support.upstream import LOOPBACK, Processes, Upstream, agent_command

pytestmark = pytest.mark.timeout(600)  # the first use builds the upstream binaries

# How long a program has to list Leases (or refuse its kubeconfig): start-up plus one try.
OUTCOME_SECONDS = 20.0
POLL_SECONDS = 0.05
LEASE_LIST = (
    b'{"kind":"LeaseList","apiVersion":"coordination.k8s.io/v1",'
    b'"metadata":{"resourceVersion":"1"},"items":[]}'
)
# Spelling -> what upstream's agent does with it: skip verification, verify, or refuse
# the kubeconfig (go-yaml v2 reads only its 22 spellings as booleans).
SPELLINGS = {
    **dict.fromkeys(["yes", "Y", "On", "TRUE"], "request"),
    **dict.fromkeys(["n", "OFF", "No", "false"], "handshake refused"),
    **dict.fromkeys(['"yes"', "'true'", "1", "yEs"], "Error: "),
}


@dataclass
class ApiServer:
    """A TLS listener standing in for kube-apiserver: it records, per connection, whether a
    request arrived or the client refused the handshake, and answers an empty LeaseList."""

    port: int = 0
    seen: list[str] = field(default_factory=list)


def _serve(listener: socket.socket, ctx: ssl.SSLContext, api: ApiServer) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    line = tls.recv(4096).split(b"\r\n", 1)[0]
                    api.seen.append("request" if line else "nothing")
                    tls.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nConnection: close\r\n\r\n"
                        % len(LEASE_LIST)
                        + LEASE_LIST
                    )
            except (ssl.SSLError, OSError):
                api.seen.append("handshake refused")


@contextlib.contextmanager
def api_server() -> Iterator[ApiServer]:
    ca = trustme.CA()  # trusted by nobody: only skipping verification gets through
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(LOOPBACK).configure_cert(ctx)
    listener = socket.create_server((LOOPBACK, 0))
    api = ApiServer(listener.getsockname()[1])
    thread = threading.Thread(target=_serve, args=(listener, ctx, api), daemon=True)
    thread.start()
    try:
        yield api
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone does not)
        listener.close()
        thread.join(timeout=10)


def kubeconfig(path: Path, port: int, value: str) -> str:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters:\n- name: c\n  cluster:\n"
        f"    server: https://{LOOPBACK}:{port}\n    insecure-skip-tls-verify: {value}\n"
        "contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n"
        "users:\n- name: u\n  user:\n    token: abc\n"
    )
    return str(path)


def outcome(processes: Processes, name: str, argv: list[str], api: ApiServer) -> str:
    """How the program read the flag: "request", "handshake refused" or its Error line."""
    proc = processes.start(name, argv)
    try:
        deadline = time.monotonic() + OUTCOME_SECONDS
        while time.monotonic() < deadline:
            if api.seen:
                return api.seen[0]
            if proc.poll() is not None:
                log = processes.log(name).splitlines()
                errors = [line for line in log if line.startswith("Error: ")]
                return errors[0] if errors else f"exited {proc.returncode}"
            time.sleep(POLL_SECONDS)
        return "no outcome"
    finally:  # the outcome is known: no need for upstream's drain on SIGTERM
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("case", SPELLINGS.items(), ids=list(SPELLINGS))
def test_insecure_skip_tls_verify_like_upstream(
    upstream: Upstream, processes: Processes, certs: Certs, tmp_path: Path, case: tuple[str, str]
) -> None:
    value, expected = case
    results = {}
    for which in ("upstream", "ours"):
        with api_server() as api:
            config = kubeconfig(tmp_path / f"{which}.yaml", api.port, value)
            argv = [
                *agent_command(which, upstream),
                *agent_loopback_args(),
                f"--ca-cert={certs.ca}",
                "--count-server-leases",
                f"--kubeconfig={config}",
            ]
            result = outcome(processes, which, argv, api)
        results[which] = result.replace(config, "KUBECONFIG")
    assert results["upstream"].startswith(expected), results
    assert results["ours"] == results["upstream"]
