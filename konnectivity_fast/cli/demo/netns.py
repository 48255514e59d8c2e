"""Network namespaces for ``konnectivity-fast demo --topology=remote``: the control plane
and two workers on separate networks, joined only by HAProxy.

::

    w1 (10.232.11.2) --veth-- [10.232.11.1          ]
                              [   lb (HAProxy)      10.232.1.1] --veth-- cp (10.232.1.2)
    w2 (10.232.12.2) --veth-- [10.232.12.1          ]

``lb`` forwards nothing (``ip_forward=0``, and each namespace knows only its own /24): a
worker reaches the control plane only through HAProxy, and nothing in ``cp`` can open a
connection to a worker; kube-apiserver's requests reach the workers only through the
agents' tunnels, which the agents dial out.

Safety (this machine's own network namespace routes private addresses off the machine):
an ``unreachable`` route for the whole ``SUBNET`` is added first and kept until
``down()``, so an address of the demo used by mistake from the root namespace fails here
instead of leaving the machine; the demo itself never sends to those addresses from the
root namespace (it reaches the servers through their Unix sockets, which are files, and
reads the programs' endpoints from inside their namespaces). Namespace names are global:
a namespace of ours that holds no process is a leftover of a killed run and is removed;
one that holds processes belongs to a running demo, which is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

__all__ = [
    "PREFIX",
    "SUBNET",
    "NetnsError",
    "Network",
    "busy_namespaces",
    "down",
    "missing_requirements",
    "up",
]

SUBNET = "10.232.0.0/16"
PREFIX = "kfdemo-"
ROLES = ("cp", "lb", "w1", "w2")
# Bound on one `ip` command.
COMMAND_SECONDS = 20.0


class NetnsError(Exception):
    """Setting the namespaces up failed; the text says which command and why."""


@dataclass(frozen=True)
class Network:
    """The namespaces' names and addresses."""

    cp: str = f"{PREFIX}cp"
    lb: str = f"{PREFIX}lb"
    w1: str = f"{PREFIX}w1"
    w2: str = f"{PREFIX}w2"
    cp_address: str = "10.232.1.2"
    lb_cp_address: str = "10.232.1.1"
    # Worker namespace -> (its address, lb's address on its link).
    worker_addresses: tuple[tuple[str, str, str], ...] = (
        (f"{PREFIX}w1", "10.232.11.2", "10.232.11.1"),
        (f"{PREFIX}w2", "10.232.12.2", "10.232.12.1"),
    )

    @property
    def names(self) -> list[str]:
        return [self.cp, self.lb, self.w1, self.w2]


def missing_requirements() -> list[str]:
    """What this machine lacks for the remote topology (empty: nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (network namespaces need it: run with sudo)")
    for tool, package in (("ip", "iproute2"), ("haproxy", "haproxy")):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` (Debian package {package})")
    return missing


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _existing() -> set[str]:
    out = _ip("netns", "list", check=False).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def busy_namespaces(net: Network) -> list[str]:
    """Our namespaces that exist and hold processes (a running or kept demo)."""
    busy = []
    for name in sorted(_existing() & set(net.names)):
        if _ip("netns", "pids", name, check=False).stdout.split():
            busy.append(name)
    return busy


def down(net: Network) -> None:
    """Remove the namespaces (their links go with them) and the guard route."""
    for name in net.names:
        _ip("netns", "del", name, check=False)
    _ip("route", "del", "unreachable", SUBNET, check=False)


def up(net: Network) -> None:
    """Make the namespaces; raises ``NetnsError`` (after removing what was made)."""
    down(net)  # leftovers of a killed run (busy ones were refused by the caller)
    try:
        _ip("route", "add", "unreachable", SUBNET)  # the guard first
        for name in net.names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        links = [(net.cp, net.cp_address, net.lb_cp_address)]
        links += list(net.worker_addresses)
        for i, (name, address, lb_address) in enumerate(links):
            inside, outside = f"kfd{i}-in", f"kfd{i}-lb"
            # Both ends made inside their namespaces: no device ever in the root one.
            _ip("link", "add", inside, "netns", name, "type", "veth",
                "peer", "name", outside, "netns", net.lb)  # fmt: skip
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", inside)
            _ip("-n", net.lb, "addr", "add", f"{lb_address}/24", "dev", outside)
            _ip("-n", name, "link", "set", inside, "up")
            _ip("-n", net.lb, "link", "set", outside, "up")
        done = subprocess.run(
            ["ip", "netns", "exec", net.lb, "sysctl", "-qw", "net.ipv4.ip_forward=0"],
            capture_output=True, text=True, timeout=COMMAND_SECONDS, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise NetnsError(f"sysctl in {net.lb}: {done.stderr.strip()}")
    except (NetnsError, OSError, subprocess.TimeoutExpired):
        down(net)
        raise


def haproxy_config(net: Network, servers: list[tuple[str, str, int]], port: int) -> str:
    """HAProxy in ``lb``: the agents' address on each worker link, round robin over the
    servers' agent ports ((name, address, port) each)."""
    binds = "\n".join(f"    bind {lb}:{port}" for _, _, lb in net.worker_addresses)
    pool = "\n".join(
        f"    server {name} {address}:{agent_port} check inter 500ms fall 2 rise 1"
        for name, address, agent_port in servers
    )
    return (
        "global\n    maxconn 1000\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 1h\n"
        "    timeout server 1h\n    timeout tunnel 1h\n"
        f"frontend agents\n{binds}\n    default_backend proxy_servers\n"
        f"backend proxy_servers\n    balance roundrobin\n{pool}\n"
    )
