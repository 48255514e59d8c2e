"""Server peering's flags (``cli/peering.py``): off by default and refused without
``--enable-peer-forwarding``; ``--peer-endpoints`` parsed strictly; the peer TLS files
default to the ``--server-*`` ones; bad values are one clean start-up error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from konnectivity_fast.cli.server_options import ProxyRunOptions, parse_args
from konnectivity_fast.server.peering import (
    parse_peer_endpoints,
    peer_advertised,
    static_peers,
    union_peers,
)
from konnectivity_fast.wire.endpoints import Address
from tests.support.net import Certs, free_ports

WAIT_SECONDS = 30.0


@pytest.fixture
def pem(tmp_path: Path) -> str:
    path = tmp_path / "x.pem"
    path.write_text("not checked here: the listener loads it")
    return str(path)


def options(*args: str) -> ProxyRunOptions:
    return parse_args(["--uds-name=/tmp/x.sock", "--server-port=0", *args], environ={}).options


def test_peering_is_off_by_default() -> None:
    parsed = options()
    assert parsed.validate() is None
    assert not parsed.enable_peer_forwarding and parsed.peer_port == 0


@pytest.mark.parametrize(
    "flag", ["--peer-port=8133", "--peer-endpoints=s2=10.0.0.2:8133", "--peer-bind-address=::"]
)
def test_peer_flags_need_the_switch(flag: str) -> None:
    name = flag.partition("=")[0]
    assert options(flag).validate() == f"{name} needs --enable-peer-forwarding"


def test_tls_files_default_to_the_servers_and_are_required(pem: str) -> None:
    parsed = options("--enable-peer-forwarding")
    message = parsed.validate()
    assert message is not None and message.startswith("--enable-peer-forwarding needs --peer-cert")
    parsed = options(
        "--enable-peer-forwarding",
        f"--peer-cert={pem}",
        f"--peer-key={pem}",
        f"--peer-ca-cert={pem}",
        "--peer-port=8133",
        "--peer-endpoints=s1=10.0.0.1:8133,s2=[fd00::2]:8133",
    )
    assert parsed.validate() is None
    tcp = parse_args(
        [
            f"--server-cert={pem}",
            f"--server-key={pem}",
            f"--server-ca-cert={pem}",
            "--enable-peer-forwarding",
        ],
        environ={},
    ).options
    assert tcp.validate() is None
    assert (tcp.peer_cert, tcp.peer_key, tcp.peer_ca_cert) == (pem, pem, pem)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("s2", "'s2' is not <server id>=<host:port>"),
        ("=10.0.0.2:8133", "'=10.0.0.2:8133' is not <server id>=<host:port>"),
        ("s2=10.0.0.2", "'10.0.0.2' is not host:port ([ipv6]:port for IPv6)"),
        ("s2=10.0.0.2:0", "'10.0.0.2:0' has no valid port (1-65535)"),
        ("s2=a:1,s2=b:2", "server ID 's2' is listed twice"),
    ],
)
def test_bad_peer_endpoints(pem: str, value: str, error: str) -> None:
    parsed = options(
        "--enable-peer-forwarding",
        f"--peer-cert={pem}",
        f"--peer-key={pem}",
        f"--peer-ca-cert={pem}",
        f"--peer-endpoints={value}",
    )
    assert parsed.validate() == f"invalid --peer-endpoints: {error}"


def test_bad_peer_port(pem: str) -> None:
    parsed = options(
        "--enable-peer-forwarding",
        f"--peer-cert={pem}",
        f"--peer-key={pem}",
        f"--peer-ca-cert={pem}",
        "--peer-port=70000",
    )
    assert parsed.validate() == "--peer-port must be between 0 and 65535, got 70000"


def test_peer_sources_combine() -> None:
    assert parse_peer_endpoints(" s1=a:1 ,, s2=b:2") == {
        "s1": Address("a", 1),
        "s2": Address("b", 2),
    }
    first = static_peers({"s1": Address("a", 1)})
    second = static_peers({"s1": Address("x", 9), "s3": Address("c", 3)})
    assert union_peers(first, second)() == {"s1": Address("a", 1), "s3": Address("c", 3)}


def run_server(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    return subprocess.run(
        [sys.executable, "-m", "konnectivity_fast.server", *args],
        check=False,
        capture_output=True,
        timeout=WAIT_SECONDS,
        env=env,
    )


def test_bad_flag_value_is_one_clean_startup_error() -> None:
    done = run_server(
        "--uds-name=/tmp/kf-peering-never.sock",
        "--server-port=0",
        "--peer-endpoints=nonsense",
    )
    assert done.returncode == 1
    assert b"--peer-endpoints needs --enable-peer-forwarding" in done.stderr
    assert b"Traceback" not in done.stderr


def test_unreadable_peer_certificate_is_one_clean_startup_error(
    tmp_path: Path, pem: str, certs: Certs
) -> None:
    agent, admin, health = free_ports(3)
    done = run_server(
        f"--uds-name={tmp_path / 'f.sock'}",
        "--server-port=0",
        f"--cluster-cert={certs.server_cert}",
        f"--cluster-key={certs.server_key}",
        f"--agent-port={agent}",
        f"--admin-port={admin}",
        f"--health-port={health}",
        "--enable-peer-forwarding",
        f"--peer-cert={pem}",
        f"--peer-key={pem}",
        f"--peer-ca-cert={certs.ca}",
    )
    assert done.returncode == 1, done.stderr
    assert b"failed to run the peer server: failed to load X509 key pair" in done.stderr
    assert b"Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "published"),
    [
        ([], None),
        (["--peer-port=8133"], None),  # bound to every address: nothing to publish
        (["--peer-port=8133", "--peer-bind-address=10.0.0.2"], Address("10.0.0.2", 8133)),
        (["--peer-bind-address=10.0.0.2"], None),  # no listener
    ],
)
def test_published_peer_endpoint(pem: str, args: list[str], published: Address | None) -> None:
    parsed = options(
        "--enable-peer-forwarding",
        f"--peer-cert={pem}",
        f"--peer-key={pem}",
        f"--peer-ca-cert={pem}",
        *args,
    )
    assert parsed.validate() is None
    assert peer_advertised(parsed) == published
