"""Fixtures: a real kube-apiserver (tests/kubesupport.py) and the socket fixtures of
tests/netsupport.py."""

import kubesupport
from netsupport import Certs, RunFn, certs, run

kube_cluster = kubesupport.kube_cluster

__all__ = ["Certs", "RunFn", "certs", "kube_cluster", "run"]
