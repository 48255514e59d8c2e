"""Session fixtures of the Kubernetes end-to-end tests (see support.py for the topology):
``k8s`` is the shared harness (worker namespace, PKI, fake kubelet, one kube-apiserver
at a time with the egress selector); ``harness`` is a per-test copy whose processes are
stopped after the test, their logs printed (pytest shows them when a test fails)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kubeapi import binaries_folder, required
from tests.support.upstream import Upstream, upstream

from .support import (
    KUBELET_PORT,
    ROOT,
    ApiServers,
    Harness,
    free_ports,
    make_pki,
    wait,
    worker_namespace,
)

__all__ = ["harness", "k8s", "upstream"]


@pytest.fixture(scope="session")
def k8s(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Harness]:
    bin_dir = binaries_folder("kube-apiserver", "etcd", "kubectl")
    if bin_dir is None:
        message = "kube-apiserver/etcd/kubectl not built: run scripts/build-kube.sh"
        if required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    folder = tmp_path_factory.mktemp("k8s")
    # Unix socket paths must be short (108 bytes); pytest's tmp_path can be longer.
    sock_dir = tempfile.mkdtemp(prefix="kf-k8s-")
    with worker_namespace() as worker:
        pki = make_pki(folder, worker)
        (frontend_port,) = free_ports(1)
        uds = f"{sock_dir}/konnectivity.sock"
        kubelet_log = (folder / "fake-kubelet.log").open("wb")
        kubelet = subprocess.Popen(
            worker.cmd(
                [
                    sys.executable,
                    "-m",
                    "tests.apiserver_egress.fake_kubelet",
                    worker.kubelet_ip,
                    str(KUBELET_PORT),
                    pki.kubelet_cert,
                    pki.kubelet_key,
                ]
            ),
            stdin=subprocess.DEVNULL,
            cwd=ROOT,  # the import root of ``-m tests...``
            stdout=kubelet_log,
            stderr=subprocess.STDOUT,
        )
        apiservers = None
        try:
            wait(lambda: _kubelet_up(worker.cmd, worker.kubelet_ip), "the fake kubelet", kubelet)
            apiservers = ApiServers(
                bin_dir, folder, pki, worker, uds=uds, frontend_port=frontend_port
            )
            yield Harness(worker, pki, upstream, uds, frontend_port, folder, apiservers)
        finally:
            if apiservers is not None:
                apiservers.close()
            kubelet.terminate()
            try:
                kubelet.wait(10)
            except subprocess.TimeoutExpired:
                kubelet.kill()
                kubelet.wait()
            kubelet_log.close()
            shutil.rmtree(sock_dir, ignore_errors=True)


def _kubelet_up(cmd: object, ip: str) -> bool:
    assert callable(cmd)
    done = subprocess.run(
        cmd(["curl", "-sk", "--max-time", "2", f"https://{ip}:{KUBELET_PORT}/healthz"]),
        capture_output=True,
        timeout=10,
        check=False,
    )
    return done.stdout == b"ok"


@pytest.fixture
def harness(k8s: Harness, tmp_path: Path) -> Iterator[Harness]:
    h = dataclasses.replace(k8s, folder=tmp_path)
    yield h
    h.procs.stop_all()
    print(h.procs.report())
