"""Fixtures: see tests/support/net.py."""

from tests.support.net import Certs, RunFn, certs, run, sock_dir

__all__ = ["Certs", "RunFn", "certs", "run", "sock_dir"]
