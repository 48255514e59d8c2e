"""Fixtures: a real kube-apiserver (tests/support/kubeapi.py) and the socket fixtures of
tests/support/net.py."""

from tests.support import kubeapi
from tests.support.net import Certs, RunFn, certs, run

kube_cluster = kubeapi.kube_cluster

__all__ = ["Certs", "RunFn", "certs", "kube_cluster", "run"]
