"""Extension negotiation between our agent and our server (both in process), and against a
scripted server: what each side advertises, and the set each keeps per stream
(konnectivity_fast/wire/contract.py, "Extension negotiation").

No extension is implemented yet, so both programs are given tokens of the test's own; the
default offer is checked to send nothing at all."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from konnectivity_fast.agent.client import AgentClient
from konnectivity_fast.agent.endpoint import EndpointPool
from konnectivity_fast.server import ProxyServer
from konnectivity_fast.tunnel import Backend
from konnectivity_fast.wire.contract import MD_CAPABILITIES, NO_EXTENSIONS, ExtensionSet
from tests.support.inproc import serving

from .conftest import Certs, RunFn
from .fake_server import fake_server
from .support import agent_config

pytestmark = pytest.mark.timeout(60)

TEST = "test.v1"
OTHER = "other.v1"
THIRD = "third.v1"


@contextlib.asynccontextmanager
async def our_server(
    sock_dir: str, certs: Certs, extensions: ExtensionSet
) -> AsyncIterator[tuple[ProxyServer, int]]:
    proxy = ProxyServer(server_id="s1", rng=random.Random(1), extensions=extensions)
    async with serving(proxy, sock_dir, certs) as handle:
        assert handle.agent_port is not None
        yield proxy, handle.agent_port


def only_backend(proxy: ProxyServer) -> Backend:
    (backend,) = proxy.router.backends.values()
    return backend


def keys(metadata: list[tuple[str, str]]) -> list[str]:
    return [key for key, _ in metadata]


# (what the agent offers, what the server offers, what both must keep)
CASES = {
    "both": ({TEST}, {TEST}, {TEST}),
    "overlap": ({TEST, OTHER}, {TEST, THIRD}, {TEST}),
    "server-offers-none": ({TEST}, set(), set()),
    "agent-offers-none": (set(), {TEST}, set()),
    "neither": (set(), set(), set()),
}


@pytest.mark.parametrize("case", CASES)
def test_negotiated_set_is_kept_on_both_ends(
    run: RunFn, sock_dir: str, certs: Certs, case: str
) -> None:
    agent_offers, server_offers, negotiated = CASES[case]

    async def main() -> None:
        async with our_server(sock_dir, certs, frozenset(server_offers)) as (proxy, port):
            config = agent_config(certs, port, extensions=frozenset(agent_offers))
            client = AgentClient(config, EndpointPool())
            await client.connect()
            try:
                assert client.extensions == negotiated
                backend = only_backend(proxy)
                assert backend.extensions == negotiated
                # The request carries the key only when the agent offers something...
                request = backend.conn.metadata
                assert (MD_CAPABILITIES in keys(request)) == bool(agent_offers)
                # ...and the response only when something was accepted.
                assert client.call is not None
                response = client.call.metadata
                assert (MD_CAPABILITIES in keys(response)) == bool(negotiated)
                assert {"serverid", "servercount"} <= set(keys(response))
            finally:
                client.close()

    run(main())


def test_default_offer_sends_no_capabilities(run: RunFn, certs: Certs) -> None:
    async def main() -> None:
        async with fake_server(certs) as fake:
            client = AgentClient(agent_config(certs, fake.port), EndpointPool())
            await client.connect()
            client.close()
            sent = keys(fake.metadata[0])
            assert "agentid" in sent
            assert not [key for key in sent if key.startswith("kf-")]
            assert client.extensions == NO_EXTENSIONS

    run(main())


def test_agent_ignores_extensions_it_did_not_offer(run: RunFn, certs: Certs) -> None:
    # A server answering with more than was asked for cannot switch anything on.
    headers = [("serverid", "f"), ("servercount", "1"), (MD_CAPABILITIES, f"{OTHER}, {TEST}")]

    async def main() -> None:
        async with fake_server(certs, headers=headers) as fake:
            config = agent_config(certs, fake.port, extensions=frozenset({TEST}))
            client = AgentClient(config, EndpointPool())
            await client.connect()
            client.close()
            assert (MD_CAPABILITIES, TEST) in fake.metadata[0]
            assert client.extensions == {TEST}

    run(main())


def test_offered_tokens_are_checked(certs: Certs) -> None:
    with pytest.raises(ValueError, match="invalid extension token"):
        agent_config(certs, 1, extensions=frozenset({"Not A Token"}))
