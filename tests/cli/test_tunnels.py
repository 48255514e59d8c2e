"""``konnectivity-fast tunnels`` (``cli/tunnels.py``): units, the table it renders from
both programs' listings (built by the programs' own listing code), fetching from an admin
port (a stdlib HTTP server in a thread here), errors, and ``--watch``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from random import Random
from typing import Any

import pytest

from konnectivity_fast.cli import tunnels
from konnectivity_fast.cli.main import main as kf_main
from konnectivity_fast.server.proxy import ProxyServer
from konnectivity_fast.server.tunnel_list import server_listing
from konnectivity_fast.server.worker_view import merge_listings
from konnectivity_fast.tunnel import AgentIdentifiers, FrontendMode
from konnectivity_fast.tunnel.listing import TunnelQuery
from konnectivity_fast.wire.contract import TunnelSort
from konnectivity_fast.wire.packets import DialRequest, DialResponse, Packet, PacketType

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


def test_human_bytes() -> None:
    cases = {0: "0B", 1023: "1023B", KIB: "1.0KiB", 1536: "1.5KiB", 15 * KIB: "15KiB"}
    cases |= {340 * MIB: "340MiB", 3 * GIB + 300 * MIB: "3.3GiB", 5 << 50: "5.0PiB"}
    assert {n: tunnels.human_bytes(n) for n in cases} == cases


def test_human_age() -> None:
    cases = {0.4: "0s", 45: "45s", 192: "3m12s", 3600 + 300: "1h5m", 3 * 86400 + 4 * 3600: "3d4h"}
    assert {s: tunnels.human_age(s) for s in cases} == cases


# --- documents from the programs' own code ---------------------------------------------------


def server_document(**query: Any) -> dict[str, Any]:
    """A proxy-server with agents "node-a" (2 tunnels) and "node-b" (1), built through
    the router, listed by ``server_listing``."""
    loop = asyncio.new_event_loop()
    try:
        proxy = ProxyServer(server_id="srv-1", rng=Random(1), loop=loop)
        router = proxy.router
        backends = {
            agent: router.add_backend(agent, AgentIdentifiers()) for agent in ("node-a", "node-b")
        }
        plan = [("node-a", "10.0.0.1:10250", 5 * MIB, 200), ("node-a", "10.0.0.2:443", 10, 20)]
        plan.append(("node-b", "10.96.0.1:443", 2 * KIB, 3 * GIB))
        for random, (agent, address, up, down) in enumerate(plan, 1):
            mode = FrontendMode.GRPC if random != 2 else FrontendMode.HTTP_CONNECT
            frontend = router.add_frontend(mode)
            backend = backends[agent]
            router.backend_managers.backend = lambda _a, b=backend: b  # type: ignore[method-assign]
            if mode is FrontendMode.GRPC:
                request = Packet(PacketType.DIAL_REQ, DialRequest("tcp", address, random))
                router.receive_from_frontend(frontend, request, 100.0 - random * 60)
                dial = random
            else:
                router.dial_http_connect(frontend, address, 100.0 - random * 60)
                (dial,) = frontend.dials
            answer = Packet(PacketType.DIAL_RSP, DialResponse(connect_id=random, random=dial))
            router.receive_from_agent(backend, answer, 100.0)
            frontend.bytes_up, frontend.bytes_down = up, down
        return server_listing(proxy, TunnelQuery(**query), 300.0)
    finally:
        loop.close()


AGENT_DOCUMENT: dict[str, Any] = {
    "program": "proxy-agent",
    "agent_id": "node-a",
    "sort": "age",
    "limit": 100,
    "server": None,
    "totals": {
        "tunnels": 1,
        "pending_dials": 1,
        "servers": 2,
        "bytes_up": 10,
        "bytes_down": 20,
        "matched": 1,
        "listed": 1,
    },
    "servers": [
        {"server_id": "s1", "tunnels": 1, "pending_dials": 1, "paused": True, "draining": False},
        {"server_id": "s2", "tunnels": 0, "pending_dials": 0, "paused": False, "draining": True},
    ],
    "tunnels": [
        {
            "connection_id": 7,
            "server_id": "s1",
            "destination": "127.0.0.1:8080",
            "bytes_up": 10,
            "bytes_down": 20,
            "buffered": 3 * MIB,
            "paused": True,
            "holding": True,
            "window": 256 * KIB,
            "age_seconds": 4000.5,
        }
    ],
}


def columns(lines: list[str]) -> list[int]:
    """Where each column of the header line starts."""
    header = lines[0]
    return [i for i, c in enumerate(header) if c != " " and (i == 0 or header[i - 1] == " ")]


def test_server_table() -> None:
    text = tunnels.render(server_document())
    head, peers, blank, *table = text.splitlines()
    assert head == (
        "proxy-server srv-1: 3 tunnels on 2 agents, 0 pending dials; "
        "up 5.0MiB, down 3.0GiB; by bytes, 3 of 3 shown"
    )
    assert peers == "agents: node-a 2, node-b 1"
    assert blank == ""
    assert table[0].split() == [
        "CONN", "AGENT", "DESTINATION", "FRONTEND", "UP", "DOWN", "BUFFERED", "STATE",
        "WINDOW", "AGE",
    ]  # fmt: skip
    starts = columns(table)
    for line in table[1:]:  # every cell starts under its column's title
        for start in starts[1:]:
            assert line[start - 1] == " " and line[start] != " ", line
    rows = [line.split() for line in table[1:]]
    assert rows == [
        ["3", "node-b", "10.96.0.1:443", "grpc", "2.0KiB", "3.0GiB", "0B", "-", "-", "6m20s"],
        ["1", "node-a", "10.0.0.1:10250", "grpc", "5.0MiB", "200B", "0B", "-", "-", "4m20s"],
        ["2", "node-a", "10.0.0.2:443", "http-connect", "10B", "20B", "0B", "-", "-", "5m20s"],
    ]


def test_server_with_workers_table_names_each_rows_worker() -> None:
    """A ``--workers`` host's listing (server/worker_view.py ``merge_listings``): one
    table, a WORKER column, the workers counted in the header."""
    one, two = server_document(), server_document()
    one["server_id"], two["server_id"] = "srv-0", "srv-1"
    document = merge_listings([one, two], TunnelQuery(limit=4), "srv")
    head, peers, _, titles, *rows = tunnels.render(document).splitlines()
    assert head == (
        "proxy-server srv: 6 tunnels on 2 agents, 0 pending dials; "
        "up 10MiB, down 6.0GiB; by bytes, 4 of 6 shown; 2 workers"
    )
    assert peers == "agents: node-a 4, node-b 2"
    assert titles.split()[:3] == ["CONN", "WORKER", "AGENT"]
    assert [row.split()[:3] for row in rows] == [
        ["3", "srv-0", "node-b"],
        ["3", "srv-1", "node-b"],
        ["1", "srv-0", "node-a"],
        ["1", "srv-1", "node-a"],
    ]


def test_server_table_by_age_and_filtered() -> None:
    text = tunnels.render(server_document(sort=TunnelSort.AGE, limit=2, peer="node-a"))
    head, peers, _, _, *rows = text.splitlines()
    assert head.endswith("by age, 2 of 2 shown (agent node-a)")
    assert peers == "agents: node-a 2"
    assert [row.split()[0] for row in rows] == ["2", "1"]  # oldest first


def test_agent_table() -> None:
    text = tunnels.render(AGENT_DOCUMENT)
    head, peers, _, title, row = text.splitlines()
    assert head == (
        "proxy-agent node-a: 1 tunnel via 2 servers, 1 pending dial; up 10B, down 20B; "
        "by age, 1 of 1 shown"
    )
    assert peers == "servers: s1 1 (paused), s2 0 (draining)"
    assert title.split() == [
        "CONN", "SERVER", "DESTINATION", "UP", "DOWN", "BUFFERED", "STATE", "WINDOW", "AGE"
    ]  # fmt: skip
    assert row.split() == [
        "7", "s1", "127.0.0.1:8080", "10B", "20B", "3.0MiB", "paused,holding", "256KiB", "1h6m"
    ]  # fmt: skip


def test_empty_listing_and_many_peers() -> None:
    document = json.loads(json.dumps(AGENT_DOCUMENT))
    document["tunnels"] = []
    document["servers"] = [
        {"server_id": f"s{i}", "tunnels": 0, "paused": False, "draining": False}
        for i in range(tunnels.MAX_PEERS_SHOWN + 3)
    ]
    document["totals"]["servers"] = len(document["servers"])
    lines = tunnels.render(document).splitlines()
    assert lines[1].endswith(", +3 more")
    assert lines[-1] == "no open tunnels"


# --- fetching ---------------------------------------------------------------------------------


class Admin:
    """A stand-in admin port: answers the listing path with ``document`` (or ``status``
    and ``body``), records the queries."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = server_document()
        self.status = 200
        self.body = b""
        self.paths: list[str] = []
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                admin.paths.append(self.path)
                if not self.path.startswith("/debug/tunnels"):
                    self._send(404, b"404 page not found\n")
                elif admin.status != 200:
                    self._send(admin.status, admin.body)
                else:
                    self._send(200, json.dumps(admin.document).encode())

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def admin() -> Iterator[Admin]:
    stand_in = Admin()
    thread = threading.Thread(target=stand_in.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stand_in
    finally:
        stand_in.server.shutdown()
        stand_in.server.server_close()
        thread.join()


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = kf_main(["tunnels", *argv])
    return code, out.getvalue(), err.getvalue()


def test_prints_the_table(admin: Admin) -> None:
    code, out, _ = run_cli(f"--admin={admin.address}", "--sort=age", "--limit=5", "--agent=a b")
    assert code == 0
    assert out == tunnels.render(admin.document)
    assert admin.paths == ["/debug/tunnels?sort=age&limit=5&agent=a+b"]


def test_refusals_are_reported(admin: Admin) -> None:
    admin.status, admin.body = 400, b"invalid sort 'x': want bytes or age\n"
    code, out, err = run_cli(f"--admin={admin.address}")
    assert (code, out) == (1, "")
    assert "400 invalid sort 'x': want bytes or age" in err
    admin.status = 200
    code, _, err = run_cli(f"--admin=http://{admin.address}/metrics-not-here")
    assert code == 1 and "is it a konnectivity-fast admin port?" in err
    admin.document = {"unexpected": True}
    code, _, err = run_cli(f"--admin={admin.address}")
    assert code == 1 and "not a tunnel listing" in err


def test_an_unreachable_admin_port(unused_port: int) -> None:
    code, _, err = run_cli(f"--admin=127.0.0.1:{unused_port}")
    assert code == 1 and "refused" in err.lower()


def test_bad_options_are_refused() -> None:
    for argv in (["--limit=-1"], ["--sort=size"], []):
        with pytest.raises(SystemExit) as exc:
            run_cli(*argv) if argv == [] else run_cli("--admin=x:1", *argv)
        assert exc.value.code == 2


def test_watch_refreshes_until_its_count(admin: Admin) -> None:
    naps: list[float] = []
    parser_args = ["tunnels", f"--admin={admin.address}", "--watch", "--count=3"]
    out = io.StringIO()
    code = tunnels.main(parse(parser_args), out=out, sleep=naps.append)
    assert code == 0 and naps == [tunnels.WATCH_INTERVAL] * 2
    assert out.getvalue().count("proxy-server srv-1:") == 3
    assert len(admin.paths) == 3


def test_watch_survives_a_failed_fetch_and_ends_on_ctrl_c(admin: Admin) -> None:
    def nap(seconds: float) -> None:
        if admin.status == 200:
            admin.status, admin.body = 500, b"boom"
        else:
            raise KeyboardInterrupt

    out = io.StringIO()
    code = tunnels.main(
        parse(["tunnels", f"--admin={admin.address}", "--watch"]), out=out, sleep=nap
    )
    text = out.getvalue()
    assert code == 0
    assert "proxy-server srv-1:" in text and "500 boom" in text and text.endswith("\n")


def parse(argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    tunnels.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
