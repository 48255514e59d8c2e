"""Fixtures of the command-line tests that run programs (the demo, the doctor): upstream's
Go programs (tests/support/upstream.py), certificates and short socket folders
(tests/support/net.py)."""

from tests.support.net import Certs, certs, sock_dir
from tests.support.upstream import Processes, Upstream, processes, upstream

__all__ = ["Certs", "Processes", "Upstream", "certs", "processes", "sock_dir", "upstream"]
