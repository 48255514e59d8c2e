"""Upstream's v0.36.0 proxy-agent with our proxy-server offering node-to-cp.v1
(``--allowed-destination``): the agent advertises nothing, so its stream negotiates
nothing and forward tunnels work as always, in both frontend modes; the server's
node-to-cp metrics are shown (registered with the feature on) and count no dial, since an
upstream agent never asks for one. On the wire (test_extensions.py's TLS relay), the
upstream agent sees the same headers and packet types from our server with the feature on
as from upstream's server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.interop import test_extensions as wire
from tests.support.net import Certs
from tests.support.upstream import (
    LOOPBACK,
    Processes,
    Upstream,
    agent_args,
    agent_command,
    agent_ports,
    echo_server,
    run_goclient,
    scrape,
    server_args,
    server_command,
    server_ports,
    wait_for,
)

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries

DIALS = "konnectivity_fast_server_agent_dials_total"


@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
def test_upstream_agent_forward_tunnels_with_the_feature_on(
    mode: str, upstream: Upstream, certs: Certs, processes: Processes, sock_dir: str
) -> None:
    with echo_server() as echo_port:
        ports = server_ports()
        uds = os.path.join(sock_dir, "konnectivity.sock")
        args = server_args(uds, certs, ports, mode=mode)
        args += [f"--allowed-destination={LOOPBACK}:{echo_port}", "--allowed-destination=a:1"]
        server = processes.start("server", [*server_command("ours", upstream), *args])
        wait_for(server, ports.health, "/healthz", what="our proxy-server")
        aports = agent_ports()
        agent = processes.start(
            "agent", [*agent_command("upstream", upstream), *agent_args(certs, ports.agent, aports)]
        )
        wait_for(agent, aports.health, "/readyz", what="upstream proxy-agent")
        wait_for(server, ports.health, "/readyz", what="our proxy-server")
        code, result = run_goclient(
            upstream,
            f"-mode={mode}",
            f"-uds={uds}",
            f"-target={LOOPBACK}:{echo_port}",
            "-connections=3",
            "-rounds=3",
            "-size=100000",
        )
        assert (code, result["ok"]) == (0, True), result
        families = scrape(ports.health)
        assert DIALS in families
        assert set(families[DIALS].samples.values()) == {0.0}
        for name in (
            "konnectivity_fast_server_agent_dial_duration_seconds",
            "konnectivity_fast_server_agent_connections",
            "konnectivity_fast_server_agent_bytes_total",
        ):
            assert name in families


def test_upstream_agent_sees_nothing_new_on_the_wire(
    monkeypatch: pytest.MonkeyPatch,
    upstream: Upstream,
    certs: Certs,
    processes: Processes,
    tmp_path: Path,
) -> None:
    plain = wire.command

    def command(program: str, which: str, upstream: Upstream) -> list[str]:
        if which == "ours+n2cp":
            return [*server_command("ours", upstream), f"--allowed-destination={LOOPBACK}:6443"]
        return plain(program, which, upstream)

    monkeypatch.setattr(wire, "command", command)

    def run(server: str) -> wire.Seen:
        return wire.observe(
            server, "upstream", upstream=upstream, certs=certs, processes=processes, tmp=tmp_path
        )

    theirs, ours = run("upstream"), run("ours+n2cp")
    assert ours.response_keys == theirs.response_keys
    assert wire.MD_CAPABILITIES not in ours.response_keys
    assert ours.to_agent == theirs.to_agent
    assert ours.to_server == theirs.to_server
