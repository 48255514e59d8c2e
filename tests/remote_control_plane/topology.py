"""Network namespaces for the remote-control-plane end-to-end test, made and removed by it.

::

    w1 (10.231.11.2) --veth-- [10.231.11.1          ]
                              [   lb (HAProxy)      10.231.1.1] --veth-- cp (10.231.1.2)
    w2 (10.231.12.2) --veth-- [10.231.12.1          ]

``lb`` forwards nothing (``ip_forward=0`` and an nftables rule dropping every forwarded
packet): HAProxy, a full proxy, is the only way from a worker to the control plane, and
nothing in ``cp`` can reach a worker except through the agents' tunnels. Each namespace has
only its connected /24: no default routes.

Safety: the root namespace routes private addresses off the machine, so ``up()`` first adds
an ``unreachable`` route for the whole test subnet there (kept until ``down()``): a mistake
fails locally. Nothing here sends to a namespace address from the root namespace: every
client runs inside a namespace through ``ip netns exec``. Namespace names are global to the
machine: runs are serialized with a lock file (held while the topology exists; whatever
else a run shares on the machine, such as its log folder, must be used under it too), and
leftovers of a killed run are removed
before a new topology is made.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.231.0.0/16"
PREFIX = "kfe2e-"
LOCK_FILE = "/tmp/konnectivity-fast-e2e-netns.lock"
# Bound on waiting for another run (another checkout on the machine) to finish with the
# namespaces: about two runs of the test.
LOCK_WAIT_SECONDS = 240.0
# Bound on one `ip`/`nft` command and on one short probe run inside a namespace.
COMMAND_SECONDS = 20.0
# The in-namespace HTTP probe (standard library only): prints status and body as JSON.
_HTTP_PROBE = r"""
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=float(sys.argv[4]))
try:
    conn.request("GET", sys.argv[3])
    resp = conn.getresponse()
    print(json.dumps({"status": resp.status, "body": resp.read().decode(errors="replace")}))
except OSError as exc:
    print(json.dumps({"status": 0, "body": "", "error": repr(exc)}))
"""
# A TCP connect attempt inside a namespace: prints "connected" or the error.
_CONNECT_PROBE = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])).close()
    print("connected")
except OSError as exc:
    print(repr(exc))
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=COMMAND_SECONDS, check=check
    )


@dataclass(frozen=True)
class Namespace:
    """One network namespace of the topology and its address on its link."""

    name: str
    address: str

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, *argv: str, timeout: float = COMMAND_SECONDS) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def http_get(self, port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str]:
        """GET from inside this namespace (a status of 0 means no answer)."""
        timeout = 5.0
        proc = self.run(
            sys.executable, "-I", "-c", _HTTP_PROBE, host, str(port), path, str(timeout)
        )
        if proc.returncode != 0:
            return 0, proc.stderr
        result = json.loads(proc.stdout)
        return int(result["status"]), str(result["body"])

    def try_connect(self, host: str, port: int, timeout: float = 3.0) -> str:
        """A plain TCP connect from inside this namespace: "connected" or the error."""
        proc = self.run(sys.executable, "-I", "-c", _CONNECT_PROBE, host, str(port), str(timeout))
        return proc.stdout.strip() or proc.stderr.strip()


@dataclass
class Topology:
    cp: Namespace
    lb: Namespace
    w1: Namespace
    w2: Namespace
    # lb's address on each link, by the namespace on the other end.
    lb_address: dict[str, str] = field(default_factory=dict)
    # Each namespace's link device, by namespace name (the end inside it).
    device: dict[str, str] = field(default_factory=dict)

    @property
    def namespaces(self) -> list[Namespace]:
        return [self.cp, self.lb, self.w1, self.w2]

    def set_link(self, ns: Namespace, up: bool) -> None:
        sh("ip", "-n", ns.name, "link", "set", self.device[ns.name], "up" if up else "down")


_NFT_RULES = """
table inet kfe2e {
  chain forward_filter {
    type filter hook forward priority filter; policy drop;
  }
}
"""


def _names() -> dict[str, str]:
    return {role: f"{PREFIX}{role}" for role in ("cp", "lb", "w1", "w2")}


def down() -> None:
    """Remove the namespaces (their veths and nft tables go with them) and the guard."""
    for name in _names().values():
        sh("ip", "netns", "del", name, check=False)
    sh("ip", "route", "del", "unreachable", SUBNET, check=False)


def up() -> Topology:
    names = _names()
    down()  # leftovers of a killed run
    # The guard first: from here on, a test address used in the root namespace fails here.
    sh("ip", "route", "add", "unreachable", SUBNET)
    topo = Topology(
        cp=Namespace(names["cp"], "10.231.1.2"),
        lb=Namespace(names["lb"], "10.231.1.1"),
        w1=Namespace(names["w1"], "10.231.11.2"),
        w2=Namespace(names["w2"], "10.231.12.2"),
    )
    for ns in topo.namespaces:
        sh("ip", "netns", "add", ns.name)
        sh("ip", "-n", ns.name, "link", "set", "lo", "up")
    links = [(topo.cp, "10.231.1.1"), (topo.w1, "10.231.11.1"), (topo.w2, "10.231.12.1")]
    for i, (ns, lb_addr) in enumerate(links):
        inside, outside = f"kfe{i}-in", f"kfe{i}-lb"
        # Both ends created directly in their namespaces: no device ever in the root one.
        sh(
            "ip",
            "link",
            "add",
            inside,
            "netns",
            ns.name,
            "type",
            "veth",
            "peer",
            "name",
            outside,
            "netns",
            topo.lb.name,
        )
        sh("ip", "-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", inside)
        sh("ip", "-n", topo.lb.name, "addr", "add", f"{lb_addr}/24", "dev", outside)
        sh("ip", "-n", ns.name, "link", "set", inside, "up")
        sh("ip", "-n", topo.lb.name, "link", "set", outside, "up")
        topo.lb_address[ns.name] = lb_addr
        topo.device[ns.name] = inside
    sh("ip", "netns", "exec", topo.lb.name, "sysctl", "-qw", "net.ipv4.ip_forward=0")
    proc = subprocess.run(
        ["ip", "netns", "exec", topo.lb.name, "nft", "-f", "-"],
        input=_NFT_RULES,
        capture_output=True,
        text=True,
        timeout=COMMAND_SECONDS,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nft failed: {proc.stderr}")
    return topo


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """The namespaces, for the duration of the block; removed however the block ends."""
    Path(LOCK_FILE).touch()
    with open(LOCK_FILE) as lock:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"another end-to-end run held {LOCK_FILE} for {LOCK_WAIT_SECONDS} s"
                    ) from None
                time.sleep(0.5)
        try:
            yield up()
        finally:
            down()


def root_route(address: str) -> str:
    """Where the root namespace would send ``address`` (nothing is sent)."""
    return sh("ip", "route", "get", address, check=False).stdout.strip() or "unreachable"


def is_root() -> bool:
    return os.geteuid() == 0
