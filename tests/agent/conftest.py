"""Fixtures: see tests/netsupport.py and tests/agent/support.py."""

from netsupport import Certs, RunFn, certs, run, sock_dir

__all__ = ["Certs", "RunFn", "certs", "run", "sock_dir"]
