"""Chaos with ``proxy-server --workers`` (server/workers.py): a worker killed with -9 while
it carries tunnels. Its tunnels end with a prefix of the data, the other worker's carry on
byte-exact, the supervisor starts it again, the agent returns to it, and new tunnels work
through the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tests.support.procs import child_pids

from .checks import alive
from .conftest import LONG, Chaos
from .programs import Program, ServerSpec, start_agent, start_server
from .traffic import Source, Transfer, download, http_tunnel, random_blob, read_to_end

pytestmark = pytest.mark.timeout(600 if LONG else 200)

WORKERS = 2
TUNNELS = 8
#: Bytes each tunnel carries; each reader takes ``HEAD`` of it, then pauses until the kill.
#: More than the proxy holds for a paused reader (its flow.v1 window and the sockets'
#: buffers), so that every tunnel is still open when the worker dies.
BLOB = (256 if LONG else 48) << 20
HEAD = 1 << 20
READY_BACKENDS = "konnectivity_network_proxy_server_ready_backend_connections"


def workers_of(server: Program) -> list[int]:
    return child_pids(server.pid)


async def rows_by_worker(server: Program) -> dict[str, int]:
    """Open tunnels per worker, from the host's tunnel listing."""
    status, body = await server.get("/debug/tunnels?limit=1000", server.admin)
    assert status == 200, body[:300]
    counts: dict[str, int] = {}
    document = json.loads(body)
    assert document["workers_unanswered"] == 0, document
    for row in document["tunnels"]:
        counts[row["server_id"]] = counts.get(row["server_id"], 0) + 1
    return counts


def test_kill9_worker_mid_transfer(chaos: Chaos) -> None:
    async def main() -> None:
        blob = random_blob(BLOB)
        source = chaos.closing(await Source(blob).start())
        # flow.v1: each paused reader holds only its own window, never its neighbours (without
        # it, the first paused tunnel would hold its agent's stream until the stall timeout).
        flow = "--enable-tunnel-flow-control"
        extra = (f"--workers={WORKERS}", "--server-id=host", flow)
        spec = ServerSpec("ours", chaos.certs, chaos.workdir, mode="http-connect", extra=extra)
        server = chaos.keep(await start_server(spec))
        agent_port = spec.ports.agent
        chaos.keep(await start_agent("ours", chaos.certs, chaos.workdir, agent_port, "n1", flow))
        await server.wait_metric(READY_BACKENDS, WORKERS)
        tunnels = [await http_tunnel(spec.uds, source.address) for _ in range(TUNNELS)]
        heads = [await reader.readexactly(HEAD) for reader, _ in tunnels]
        assert all(head == blob[:HEAD] for head in heads)
        by_worker = await rows_by_worker(server)
        assert sum(by_worker.values()) == TUNNELS, by_worker
        victim_id = max(by_worker, key=by_worker.__getitem__)  # the busier worker
        victim_pid = workers_of(server)[int(victim_id.rsplit("-", 1)[1])]
        os.kill(victim_pid, signal.SIGKILL)
        ends: list[Transfer] = await asyncio.gather(*(read_to_end(r, w) for r, w in tunnels))
        whole = [HEAD + len(end.data) == BLOB and end.ended == "eof" for end in ends]
        for head, end in zip(heads, ends, strict=True):
            data = head + end.data
            assert data == blob[: len(data)], "a tunnel delivered corrupted bytes"
        # Exactly the survivor's tunnels completed; the victim's were cut.
        assert sum(whole) == TUNNELS - by_worker[victim_id], (by_worker, [e.ended for e in ends])
        # The supervisor starts the worker again; the agent connects to it; the host is ready.
        await server.wait_metric(READY_BACKENDS, WORKERS)
        await server.wait_for("/readyz")
        assert victim_pid not in workers_of(server) and len(workers_of(server)) == WORKERS
        for _ in range(2 * WORKERS):
            again = await download(spec.uds, source.address)
            assert (again.sha256, again.ended) == (source.sha256, "eof")
        alive(server)
        assert "exited with code -9" in server.log()
        chaos.note(
            f"kill -9 of worker {victim_id} carrying {by_worker[victim_id]} of {TUNNELS} "
            f"tunnels: those cut with intact prefixes, the other {sum(whole)} complete "
            f"({BLOB >> 20} MiB each, byte-exact); worker back, agent on it, new tunnels ok"
        )

    chaos.run(main())
