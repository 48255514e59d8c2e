"""``proxy-agent``'s error reporting, as upstream's cobra command and main do it: every
error prints ``Error: <err>`` then the usage on stderr, logs the klog line
``error: <err>`` and exits 1 (tests/compat/test_cli_errors.py compares with upstream's
binary; these run without it). And start-up with ``--count-server-leases`` while the API
server cannot be reached: no health server yet, and the agent still stops on signals."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.net import agent_loopback_args

from .conftest import Certs
from .support import LOOPBACK
from .test_app import free_ports, get

pytestmark = pytest.mark.timeout(120)

RUN_SECONDS = 30
KLOG_ERROR = re.compile(r"^E\d{4} [\d:.]+ +\d+ [^\]]+\] (.*)$")
AGENT = [sys.executable, "-m", "konnectivity_fast.agent"]


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the agent; it must exit 1 reporting exactly one error: that error's text."""
    done = subprocess.run(
        [*AGENT, *agent_loopback_args(), *args],
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
        env=env,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("Error: ")]
    assert len(errors) == 1, done.stderr[-2000:]
    message = lines[errors[0]].removeprefix("Error: ")
    assert lines[errors[0] + 1] == "Usage:"
    assert any(line.startswith("      --ca-cert string") for line in lines), "no flag usages"
    logged = [m.group(1) for line in lines if (m := KLOG_ERROR.match(line))]
    assert logged == [f"error: {message}"]
    return message


def test_parse_error() -> None:
    assert refused("--sync-interval=5").startswith('invalid argument "5" for "--sync-interval"')


def test_validation_error() -> None:
    assert refused("--server-count-source=foo") == (
        "failed to validate agent options with --server-count-source must be one of "
        "'', 'default', 'max', got foo"
    )


def test_no_ca_cert() -> None:
    assert refused() == (
        "failed to run proxy connection with failed to read CA cert : read .: is a directory"
    )


def test_ca_cert_without_certificates(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert refused(f"--ca-cert={junk}") == (
        "failed to run proxy connection with failed to append CA cert to the cert pool"
    )


def test_key_pair_without_pem(certs: Certs, tmp_path: Path) -> None:
    junk = tmp_path / "junk.key"
    junk.write_text("nothing\n")
    message = refused(
        f"--ca-cert={certs.ca}", f"--agent-cert={certs.client_cert}", f"--agent-key={junk}"
    )
    assert message == (
        f"failed to run proxy connection with failed to load X509 key pair "
        f"{certs.client_cert} and {junk}: tls: failed to find any PEM data in key input"
    )


def test_lease_counting_without_a_cluster(certs: Certs) -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no KUBERNETES_SERVICE_HOST: not in a cluster
    assert refused(f"--ca-cert={certs.ca}", "--count-server-leases", env=env) == (
        "failed to run proxy connection with failed to load in cluster kubernetes client "
        "config: unable to load in-cluster configuration, KUBERNETES_SERVICE_HOST and "
        "KUBERNETES_SERVICE_PORT must be defined"
    )


def test_bad_kubeconfig_comes_after_the_ca(certs: Certs, tmp_path: Path) -> None:
    bad = tmp_path / "bad.kubeconfig"
    bad.write_text("just text\n")
    # The CA is checked first, as upstream builds the TLS configuration first.
    assert "failed to read CA cert" in refused("--count-server-leases", f"--kubeconfig={bad}")
    assert refused(
        f"--ca-cert={certs.ca}", "--count-server-leases", f"--kubeconfig={bad}"
    ).startswith("failed to run proxy connection with failed to load kubernetes client config: ")


def test_unreachable_api_blocks_start_until_stopped(certs: Certs, tmp_path: Path) -> None:
    (closed,) = free_ports(1)
    kubeconfig = tmp_path / "closed.kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters:\n- name: k\n  cluster:\n    server: https://{LOOPBACK}:{closed}\n"
        "contexts:\n- name: c\n  context:\n    cluster: k\n    user: u\n"
        "users:\n- name: u\n  user:\n    token: t\n"
    )
    args = [*AGENT, *agent_loopback_args(), f"--ca-cert={certs.ca}", "--count-server-leases"]
    health = int(args[len(AGENT) + 3].rsplit("=", 1)[1])
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*args, f"--kubeconfig={kubeconfig}", "--logtostderr=true"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Wait for two failed lists: the agent is up and retrying.
        failure_text = "Could not list leases"
        for _ in range(RUN_SECONDS * 10):
            if log.read_text().count(failure_text) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.1)
        text = log.read_text()
        assert proc.poll() is None, text
        assert text.count(failure_text) >= 2, text
        with pytest.raises(OSError):
            get(health, "/healthz")  # no health server before the lease cache syncs
        proc.send_signal(signal.SIGTERM)  # drain
        # One at a time: two signals in a row may be seen as one.
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
