"""Fixtures: the upstream Go peers (tests/support/upstream.py) and certificates
(tests/support/net.py)."""

from tests.support.net import Certs, certs, sock_dir
from tests.support.upstream import Processes, Upstream, processes, upstream

__all__ = ["Certs", "Processes", "Upstream", "certs", "processes", "sock_dir", "upstream"]
