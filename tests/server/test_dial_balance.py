"""Dials spread by load (``--dial-balance``, ``tunnel.balance``): an in-process
proxy-server with three independent agents takes 30 dials. With ``least-tunnels`` each
agent carries 10; without the switch the choice is upstream's random scan, draw for draw.
Plus the switch itself: a flag of ours, and a value we do not know stops the program at
start-up with a clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from random import Random

import pytest

from konnectivity_fast.cli.server_options import parse_args
from konnectivity_fast.wire.contract import DialBalance
from tests.support.agent_peer import backend, echo

from .conftest import Certs, RunFn, proxy_env

AGENTS = ("a", "b", "c")
DIALS = 30
SEED = 7  # proxy_env's Random(7)


def test_the_switch_is_a_flag_of_ours() -> None:
    assert parse_args([], environ={}).options.dial_balance == DialBalance.RANDOM
    options = parse_args(["--dial-balance=least-tunnels"], environ={}).options
    assert options.dial_balance == DialBalance.LEAST_TUNNELS
    assert options._check_extensions() is None
    wrong = parse_args(["--dial-balance=least"], environ={}).options
    assert wrong._check_extensions() == (
        "--dial-balance must be one of random, least-tunnels, got 'least'"
    )


def test_an_unknown_value_stops_the_program(sock_dir: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "konnectivity_fast.server",
            f"--uds-name={os.path.join(sock_dir, 'p.sock')}",
            "--server-port=0",
            "--dial-balance=fewest",
        ],
        check=False,
        capture_output=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 1
    assert b"--dial-balance must be one of random, least-tunnels, got 'fewest'" in proc.stderr


@pytest.mark.parametrize("mode", ["grpc", "http-connect"])
def test_least_tunnels_spreads_thirty_dials_ten_each(
    arun: RunFn, certs: Certs, sock_dir: str, mode: str
) -> None:
    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode=mode, dial_balance=DialBalance.LEAST_TUNNELS) as env,
            backend(echo) as echo_backend,
        ):
            agents = [await env.agent(agent_id=agent_id) for agent_id in AGENTS]
            if mode == "grpc":
                dialer = env.dialer()
                for random in range(1, DIALS + 1):
                    await dialer.stream().connect(echo_backend.address, random)
            else:
                for _ in range(DIALS):
                    tunnel = await env.http_connect(echo_backend.address)
                    status = await tunnel.reader.readuntil(b"\r\n\r\n")
                    assert status.startswith(b"HTTP/1.1 200"), status
            assert [len(agent.conns) for agent in agents] == [10, 10, 10]

    arun(main())


def test_without_the_switch_dials_are_upstreams_random_choice(
    arun: RunFn, certs: Certs, sock_dir: str
) -> None:
    """Upstream's scan starts at a random key (agents in arrival order) and takes the first
    non-draining stream: with nothing draining, the agent drawn, 30 times."""
    rng = Random(SEED)
    expected = Counter(AGENTS[rng.randrange(len(AGENTS))] for _ in range(DIALS))

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            agents = [await env.agent(agent_id=agent_id) for agent_id in AGENTS]
            dialer = env.dialer()
            for random in range(1, DIALS + 1):
                await dialer.stream().connect(echo_backend.address, random)
            got = {agent.agent_id: len(agent.conns) for agent in agents}
            assert got == {agent_id: expected[agent_id] for agent_id in AGENTS}
            assert sorted(got.values()) != [10, 10, 10]  # this seed is visibly uneven

    arun(main())
