"""Smoke test of the tunnel-listing benchmark's machinery (``bench/tunnel_listing.py``):
it builds both programs' state and lists it, with a few tunnels. No timing is asserted.

    .venv/bin/python -m pytest bench/test_tunnel_listing_smoke.py
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bench import tunnel_listing
from konnectivity_fast.agent.tunnel_list import tunnels_handler as agent_handler
from konnectivity_fast.server.tunnel_list import tunnels_handler as server_handler
from konnectivity_fast.transport.http import Request
from konnectivity_fast.wire.contract import ADMIN_TUNNELS_PATH


def test_the_built_state_lists_every_tunnel() -> None:
    async def main() -> None:
        proxy = tunnel_listing.build_server(300, 7, asyncio.get_running_loop())
        clients = tunnel_listing.build_agent(300, 3)
        request = Request("GET", ADMIN_TUNNELS_PATH, "limit=1000", {})
        for handler, peers in (
            (server_handler(proxy), "agents"),
            (agent_handler("a", clients), "servers"),
        ):
            status, _, body, _ = handler(request)
            document = json.loads(body)
            assert status == 200
            assert document["totals"]["tunnels"] == document["totals"]["listed"] == 300
            assert sum(p["tunnels"] for p in document[peers]) == 300
            moved = [r["bytes_up"] + r["bytes_down"] for r in document["tunnels"]]
            assert moved == sorted(moved, reverse=True)

    asyncio.run(main())


def test_the_command_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert tunnel_listing.main(["--tunnels", "200", "--agents", "5", "--repeat", "2"]) == 0
    out = capsys.readouterr().out
    assert "proxy-server ?sort=age" in out and "proxy-agent ?server=server-0" in out
