"""Our proxy-server in this process, as the in-process tests run it: the agent port on
127.0.0.1 (mTLS with the test CA's certificates), the frontend on a Unix socket named after
the server in ``sock_dir``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from konnectivity_fast.server import ProxyServer, ServerHandle, start
from tests.support.net import Certs

LOOPBACK = "127.0.0.1"


def uds_path(sock_dir: str, proxy: ProxyServer) -> str:
    return os.path.join(sock_dir, f"{proxy.server_id}.sock")


@contextlib.asynccontextmanager
async def serving(
    proxy: ProxyServer, sock_dir: str, certs: Certs, agent_port: int = 0
) -> AsyncIterator[ServerHandle]:
    """``proxy`` listening until the block ends; the handle gives its ports."""
    handle = await start(
        proxy,
        uds_path=uds_path(sock_dir, proxy),
        agent_host=LOOPBACK,
        agent_port=agent_port,
        cert_file=certs.server_cert,
        key_file=certs.server_key,
        client_ca_file=certs.ca,
    )
    assert handle.agent_port is not None
    try:
        yield handle
    finally:
        await handle.close()
