"""A konnectivity-client (grpc-go) that closes its tunnel normally ends with a GOAWAY
(NO_ERROR, "client transport shutdown") whose last-stream-id is 1, an id the client
itself opened: grpc-go's habit. nghttp2 on the server side finds that id invalid (a
client's GOAWAY may only name server-initiated, even streams) and answers GOAWAY
PROTOCOL_ERROR. Upstream's server (grpc-go) takes the same GOAWAY silently, so ours must not
log "peer violated the protocol" or record an error for every tunnel kube-apiserver closes.

The engine tells a leaving peer's GOAWAY apart from a protocol violation
(csrc/h2_connection.pxi ``H2Connection._on_invalid_frame``); this test keeps it so, for
both servers.
"""

from __future__ import annotations

import pytest

from tests.support.net import Certs
from tests.support.upstream import LOOPBACK, Processes, Upstream

from .support import Tools, echo_server, goclient, start_topology

TUNNELS = 20
VIOLATION = "peer violated the protocol"

pytestmark = pytest.mark.timeout(2700)  # the first use builds the Go tools


@pytest.mark.parametrize("server", ["upstream", "ours"])
def test_normal_client_close_is_not_a_protocol_violation(
    server: str,
    *,
    upstream: Upstream,
    tools: Tools,
    certs: Certs,
    processes: Processes,
    sock_dir: str,
) -> None:
    top = start_topology(
        server=server,
        agent="upstream",
        mode="grpc",
        transport="uds",
        upstream=upstream,
        certs=certs,
        processes=processes,
        sock_dir=sock_dir,
        agent_count=1,
    )
    with echo_server() as port:
        code, result = goclient(
            tools.goclient,
            "-mode=grpc",
            *top.frontend,
            f"-target={LOOPBACK}:{port}",
            f"-connections={TUNNELS}",
            "-hold=1s",  # time for each tunnel's transport to close before the exit
        )
    assert (code, result["ok"]) == (0, True), result
    processes.stop_all()
    lines = [line for line in processes.log("server").splitlines() if VIOLATION in line]
    assert not lines, f"{len(lines)} of {TUNNELS} normal closes logged as violations: {lines[0]}"
