"""Fixtures: the upstream Go peers (tests/upstream.py) and certificates (tests/netsupport.py)."""

from netsupport import Certs, certs, sock_dir
from upstream import Processes, Upstream, processes, upstream

__all__ = ["Certs", "Processes", "Upstream", "certs", "processes", "sock_dir", "upstream"]
