"""Extension negotiation on the server's gRPC frontend (konnectivity_fast/wire/contract.py,
"Extension negotiation"): a ``Proxy`` stream's ``kf-capabilities`` is answered, in its
response headers, with the subset this server offers too, and that subset is kept on the
``Frontend`` record; nothing is answered when the subset is empty. The agent side
(``Connect``) is tested with our agent in tests/agent/test_extensions.py.

No extension is implemented yet, so the server is given tokens of the test's own."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import AsyncIterator

import pytest

from konnectivity_fast.server import PROXY_PATH, ProxyServer, ServerHandle, start
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.tunnel import ERR_NO_AGENT, Frontend
from konnectivity_fast.wire.codec import decode_packet, encode_packet
from konnectivity_fast.wire.contract import MD_CAPABILITIES, ExtensionSet
from konnectivity_fast.wire.packets import DialRequest, DialResponse, Packet, PacketType

from .conftest import Certs, RunFn

pytestmark = pytest.mark.timeout(60)

TEST = "test.v1"
OTHER = "other.v1"

# (what the frontend advertises, what the server offers, what both must keep)
CASES = {
    "both": ((f"{TEST}, {OTHER}",), {TEST}, {TEST}),
    "server-offers-none": ((TEST,), set(), set()),
    "frontend-offers-none": ((), {TEST}, set()),
}


@contextlib.asynccontextmanager
async def frontend_of(
    sock_dir: str, certs: Certs, extensions: ExtensionSet
) -> AsyncIterator[tuple[ProxyServer, str]]:
    proxy = ProxyServer(server_id="s1", rng=random.Random(1), extensions=extensions)
    uds = os.path.join(sock_dir, "frontend.sock")
    handle: ServerHandle = await start(
        proxy,
        uds_path=uds,
        agent_host="127.0.0.1",
        agent_port=0,
        cert_file=certs.server_cert,
        key_file=certs.server_key,
        client_ca_file=certs.ca,
    )
    try:
        yield proxy, uds
    finally:
        await handle.close()


def only_frontend(proxy: ProxyServer) -> Frontend:
    (frontend,) = proxy.router.frontends.values()
    return frontend


@pytest.mark.parametrize("case", CASES)
def test_proxy_stream_negotiation(run: RunFn, sock_dir: str, certs: Certs, case: str) -> None:
    advertised, offered, kept = CASES[case]

    async def main() -> None:
        async with frontend_of(sock_dir, certs, frozenset(offered)) as (proxy, uds):
            proto = await kgrpc.connect(path=uds)
            try:
                metadata = [(MD_CAPABILITIES, value) for value in advertised]
                call = proto.start_call(PROXY_PATH, metadata)
                dial = DialRequest("tcp", "10.0.0.1:443", 7)
                call.send(encode_packet(Packet(PacketType.DIAL_REQ, dial)))
                message = await call.recv()  # no agent: the server answers at once
                assert message is not None
                answer = decode_packet(message).payload
                assert isinstance(answer, DialResponse) and answer.error == ERR_NO_AGENT
                assert only_frontend(proxy).extensions == kept
                echoed = [value for key, value in call.metadata if key == MD_CAPABILITIES]
                assert echoed == ([",".join(sorted(kept))] if kept else [])
                call.done_writing()
                await call.wait_status()
            finally:
                await proto.aclose()

    run(main())
