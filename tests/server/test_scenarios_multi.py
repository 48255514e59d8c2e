"""Scenarios with several agents and tunnels at once, and the rarer packet sequences of
upstream's rules (pkg/server/server.go serveRecvFrontend, serveRecvBackend) and of our
differences (docs/differences.md): connectIDs that collide across agents, an agent's loss
closing exactly its own connections, a DIAL_RSP from the wrong agent, late error answers,
in-flight agent DATA after a frontend left, several dials on one stream, packets a peer
should not send, and an HTTP-CONNECT client's half-close.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import grpc.aio

from tests.support.agent_peer import (
    DialPolicy,
    ProxyStream,
    backend,
    close_req,
    close_rsp,
    data,
    dial_cls,
    dial_req,
    dial_rsp,
    drain,
    echo,
    ptype,
    wait_until,
)

from .conftest import Certs, RunFn, check_metrics, failures, packets, proxy_env
from .test_scenarios_grpc import UNREACHABLE, frontend_gone

RESPONSE_200 = b"HTTP/1.1 200 Connection Established\r\n\r\n"
DEST_HOST = ("destHost", "default")


async def echo_round(stream: ProxyStream, connect_id: int, payload: bytes) -> None:
    await stream.send(data(connect_id, payload))
    assert await stream.read_data(connect_id, len(payload)) == payload


def port_of(address: str) -> str:
    return address.rpartition(":")[2]


def test_same_connect_id_on_two_agents(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """Both agents number their connections from 1: two tunnels with connectID 1 stay
    apart; losing one agent closes exactly its tunnel, the other keeps flowing."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, strategies=DEST_HOST) as env,
            backend(echo) as echo_backend,
        ):
            port = port_of(echo_backend.address)
            agent_a = await env.agent(agent_id="a", identifiers="ipv4=127.0.0.1")
            agent_b = await env.agent(agent_id="b", identifiers="host=localhost")
            dialer = env.dialer()
            via_a, via_b = dialer.stream(), dialer.stream()
            assert await via_a.connect(f"127.0.0.1:{port}", 1) == 1
            assert await via_b.connect(f"localhost:{port}", 2) == 1
            assert len(agent_a.conns) == len(agent_b.conns) == 1
            for i in range(3):
                await echo_round(via_a, 1, b"A" * (100 + i))
                await echo_round(via_b, 1, b"B" * (200 + i))
            await agent_a.disconnect()
            rsp = await via_a.expect("CLOSE_RSP")
            assert (rsp.closeResponse.connectID, rsp.closeResponse.error) == (1, "")
            await echo_round(via_b, 1, b"still B")
            assert env.proxy.router.established_connections == 1
            await via_b.send(close_req(1))
            await via_b.expect("CLOSE_RSP")
            assert [ptype(p) for p in via_b.received].count("CLOSE_RSP") == 1
            for stream in (via_a, via_b):
                assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics({"established_connections": 0, "dial_duration_seconds_count": 2})

    arun(main())


def test_dial_rsp_from_the_wrong_agent(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """A DIAL_RSP for a dial sent to another agent does not complete it: it is unrecognized
    and its connection closed (CLOSE_REQ to the sender); the right agent's answer works."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, strategies=DEST_HOST) as env,
            backend(echo) as echo_backend,
        ):
            port = port_of(echo_backend.address)
            right = await env.agent(
                agent_id="right", identifiers="ipv4=127.0.0.1", policy=DialPolicy.HOLD
            )
            wrong = await env.agent(agent_id="wrong", identifiers="host=elsewhere")
            stream = env.dialer().stream()
            await stream.send(dial_req(f"127.0.0.1:{port}", 77))
            await right.wait_held()
            await wrong.send(dial_rsp(77, connect_id=5))
            await wrong.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 5)
            assert env.proxy.router.pending_dials == 1
            assert await right.answer(77) == 1
            rsp = await stream.expect("DIAL_RSP")
            assert (rsp.dialResponse.random, rsp.dialResponse.connectID) == (77, 1)
            await echo_round(stream, 1, b"right one")
            assert await stream.end() == grpc.StatusCode.OK
            await right.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 1)
            await frontend_gone(env)
            check_metrics({failures("unrecognized_response"): 1, "established_connections": 0})

    arun(main())


def test_late_error_answer_after_frontend_gave_up(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """A late DIAL_RSP carrying an error (connectID 0) is unrecognized and needs no
    CLOSE_REQ; the frontend hears nothing more."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env:
            agent = await env.agent(policy=DialPolicy.HOLD)
            stream = env.dialer().stream()
            await stream.send(dial_req(UNREACHABLE, 5))
            await agent.wait_held()
            await stream.send(dial_cls(5))
            await wait_until(lambda: env.proxy.router.pending_dials == 0, "dial dropped")
            await agent.answer(5, error="dial tcp 10.255.255.1:443: i/o timeout")
            # A round trip through the agent's stream: the answer was processed before it.
            await agent.send(data(42, b"probe"))
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 42)
            assert [p.closeRequest.connectID for p in agent.packets("CLOSE_REQ")] == [42]
            assert await stream.end() == grpc.StatusCode.OK
            assert stream.received == []
            check_metrics(
                {
                    failures("unrecognized_response"): 1,
                    failures("frontend_close"): 1,
                    failures("error_response"): None,
                }
            )

    arun(main())


def test_agent_data_in_flight_after_frontend_left(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """A frontend cancels its stream: the agent gets one CLOSE_REQ; DATA it had in flight for
    that connection before the CLOSE_RSP is dropped, not answered with more CLOSE_REQs."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env:
            agent = await env.agent(policy=DialPolicy.HOLD, answer_close=False)
            stream = env.dialer().stream()
            await stream.send(dial_req(UNREACHABLE, 9))
            await agent.wait_held()
            await agent.answer(9, connect_id=3)  # a success without a real endpoint
            await stream.expect("DIAL_RSP")
            stream.cancel()
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 3)
            for i in range(3):
                await agent.send(data(3, b"in flight %d" % i))
            await agent.send(close_rsp(3, "Unknown connectID"))
            await agent.send(data(4, b"really unknown"))
            await agent.wait_packet("CLOSE_REQ", lambda p: p.closeRequest.connectID == 4)
            assert [p.closeRequest.connectID for p in agent.packets("CLOSE_REQ")] == [3, 4]
            await frontend_gone(env)
            check_metrics({"established_connections": 0, packets("from_agent", "DATA"): 4})

    arun(main())


def test_two_dials_on_one_stream(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """As upstream's serveRecvFrontend: a second DIAL_REQ on a stream is served too;
    frontend DATA may use only the first connectID it used; the stream's end closes both
    connections."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            agent = await env.agent()
            stream = env.dialer().stream()
            first = await stream.connect(echo_backend.address, 1)
            second = await stream.connect(echo_backend.address, 2)
            assert (first, second) == (1, 2)
            await echo_round(stream, first, b"first")
            assert env.proxy.router.established_connections == 2
            assert await stream.end() == grpc.StatusCode.OK
            await wait_until(lambda: len(agent.packets("CLOSE_REQ")) == 2, "two CLOSE_REQs")
            assert sorted(p.closeRequest.connectID for p in agent.packets("CLOSE_REQ")) == [1, 2]
            await frontend_gone(env)
            await wait_until(lambda: not agent.conns, "agent endpoints closed")
            check_metrics({"established_connections": 0, "dial_duration_seconds_count": 2})

    arun(main())


def test_packets_peers_should_not_send(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """DIAL_RSP, CLOSE_RSP and DRAIN from a frontend, DIAL_REQ and CLOSE_REQ from an agent:
    ignored; an empty DATA from the frontend is forwarded as it is; the tunnel still works."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            agent = await env.agent()
            stream = env.dialer().stream()
            connect_id = await stream.connect(echo_backend.address, 1)
            await stream.send(dial_rsp(1, 1))
            await stream.send(close_rsp(connect_id))
            await stream.send(drain())
            await agent.send(dial_req("10.0.0.1:1", 99))
            await agent.send(close_req(connect_id))
            await stream.send(data(connect_id, b""))
            await echo_round(stream, connect_id, b"after the noise")
            assert [p.data.data for p in agent.packets("DATA")] == [b"", b"after the noise"]
            assert [ptype(p) for p in agent.received] == ["DIAL_REQ", "DATA", "DATA"]
            assert [ptype(p) for p in stream.received] == ["DIAL_RSP", "DATA"]
            assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics(
                {
                    packets("from_client", "DIAL_RSP"): 1,
                    packets("from_client", "DRAIN"): 1,
                    packets("from_agent", "DIAL_REQ"): 1,
                    packets("from_agent", "CLOSE_REQ"): 1,
                    packets("to_agent", "DATA"): 2,
                }
            )

    arun(main())


def test_http_half_close_is_a_close(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """HTTP-CONNECT has no half-close: the client's EOF closes the tunnel (CLOSE_REQ to the
    agent) and the client then reads EOF."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect") as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent()
            tunnel = await env.http_connect(echo_backend.address)
            assert await tunnel.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            tunnel.writer.write(b"last words")
            assert await tunnel.reader.readexactly(10) == b"last words"
            tunnel.writer.write_eof()
            await agent.wait_packet("CLOSE_REQ")
            assert await tunnel.reader.read() == b""
            await wait_until(lambda: not env.proxy.router.frontends, "tunnel removed")
            check_metrics({"http_connections": 0, "established_connections": 0})

    arun(main())


def test_http_agent_loss_closes_only_its_tunnels(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """Two agents with a tunnel each: losing one closes its tunnel only."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", strategies=DEST_HOST) as env,
            backend(echo) as echo_backend,
        ):
            port = port_of(echo_backend.address)
            agent_a = await env.agent(agent_id="a", identifiers="ipv4=127.0.0.1")
            await env.agent(agent_id="b", identifiers="host=localhost")
            via_a = await env.http_connect(f"127.0.0.1:{port}")
            via_b = await env.http_connect(f"localhost:{port}")
            for tunnel in (via_a, via_b):
                assert await tunnel.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            await agent_a.disconnect()
            assert await via_a.reader.read() == b""
            via_b.writer.write(b"b lives")
            assert await via_b.reader.readexactly(7) == b"b lives"
            await via_b.close()
            await wait_until(lambda: not env.proxy.router.frontends, "tunnels removed")
            check_metrics({"http_connections": 0, "established_connections": 0})

    arun(main())


def test_server_closes_with_live_tunnels(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """The server's listeners close while a tunnel is established and a dial is pending:
    the frontend stream and the agent stream end, nothing is left behind."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            agent = await env.agent(policies={UNREACHABLE: DialPolicy.HOLD})
            dialer = env.dialer()
            established, pending = dialer.stream(), dialer.stream()
            connect_id = await established.connect(echo_backend.address, 1)
            await echo_round(established, connect_id, b"before")
            await pending.send(dial_req(UNREACHABLE, 2))
            await agent.wait_held()
            await env.handle.close()
            for stream in (established, pending):
                # Either the tunnel's end arrives first (CLOSE_RSP / DIAL_RSP), or the
                # connection goes first (UNAVAILABLE); the stream ends either way.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    while (packet := await stream.recv()) is not None:
                        assert ptype(packet) in {"CLOSE_RSP", "DIAL_RSP"}, packet
            await wait_until(lambda: agent.status is not None, "agent stream ended")
            await wait_until(
                lambda: not env.proxy.router.frontends and not env.proxy.router.backends,
                "router empty",
            )
            check_metrics(
                {
                    'grpc_connections{service_method="Proxy"}': 0,
                    'grpc_connections{service_method="Connect"}': 0,
                    "established_connections": 0,
                    "pending_backend_dials": 0,
                }
            )

    arun(main())


def test_http_pipelined_megabytes_during_dial(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """Megabytes pipelined after the CONNECT headers while the dial is pending (reading
    pauses past its limit) all reach the backend, in order, once the dial succeeds."""
    payload = bytes(range(251)) * (3 * 1024 * 1024 // 251)

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect") as env,
            backend(echo) as echo_backend,
        ):
            agent = await env.agent(policy=DialPolicy.HOLD)
            tunnel = await env.http_connect(echo_backend.address, pipelined=payload)
            (random,) = await agent.wait_held()
            await agent.answer(random)
            assert await tunnel.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            assert await tunnel.reader.readexactly(len(payload)) == payload
            await tunnel.close()
            await wait_until(lambda: not env.proxy.router.frontends, "tunnel removed")
            check_metrics({"http_connections": 0, "established_connections": 0})

    arun(main())


def test_stalled_agent_does_not_block_other_agents(
    arun: RunFn, certs: Certs, sock_dir: str
) -> None:
    """An agent that stops reading holds up only its own tunnels: with 4 frontends pushing
    into it until they are paused, a tunnel through another agent carries 8 MiB both ways
    and new dials to that agent work."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, strategies=DEST_HOST) as env,
            backend(echo) as echo_backend,
        ):
            port = port_of(echo_backend.address)
            stalled = await env.agent(agent_id="stalled", identifiers="ipv4=127.0.0.1")
            await env.agent(agent_id="healthy", identifiers="host=localhost")
            dialer = env.dialer()
            stuck = [dialer.stream() for _ in range(4)]
            ids = [await s.connect(f"127.0.0.1:{port}", 10 + i) for i, s in enumerate(stuck)]
            stalled.stall()
            chunk = b"\1" * (256 << 10)
            blocked = [0] * len(stuck)

            async def push(i: int) -> None:
                while True:
                    await stuck[i].send(data(ids[i], chunk))
                    blocked[i] += 1

            loop = asyncio.get_running_loop()
            pushers = [loop.create_task(push(i)) for i in range(len(stuck))]
            try:
                (server_side,) = [
                    b for b in env.proxy.router.backends.values() if b.agent_id == "stalled"
                ]
                await wait_until(
                    lambda: server_side.conn.outbound_pending() >= 4 * len(chunk),
                    "the stalled agent's stream is backed up",
                )
                live = dialer.stream()
                connect_id = await live.connect(f"localhost:{port}", 99)
                payload = bytes(range(256)) * (8 << 12)

                async def send_all() -> None:
                    for i in range(0, len(payload), len(chunk)):
                        await live.send(data(connect_id, payload[i : i + len(chunk)]))

                sender = loop.create_task(send_all())
                assert await live.read_data(connect_id, len(payload)) == payload
                await sender
                for i in range(5):
                    fresh = dialer.stream()
                    fresh_id = await fresh.connect(f"localhost:{port}", 200 + i)
                    await echo_round(fresh, fresh_id, b"new dial %d" % i)
                    assert await fresh.end() == grpc.StatusCode.OK
                assert await live.end() == grpc.StatusCode.OK
            finally:
                for task in pushers:
                    task.cancel()
                for task in pushers:
                    with contextlib.suppress(BaseException):
                        await task

    arun(main())


def test_dial_ids(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """A dial ID may be reused once its dial is over; while it is pending, another stream's
    DIAL_REQ with it is refused ("dial ID already in use") instead of taking it over."""

    async def main() -> None:
        async with proxy_env(certs, sock_dir) as env, backend(echo) as echo_backend:
            agent = await env.agent(policies={UNREACHABLE: DialPolicy.HOLD})
            dialer = env.dialer()
            for _ in range(2):
                stream = dialer.stream()
                assert await stream.connect(echo_backend.address, 5) > 0
                assert await stream.end() == grpc.StatusCode.OK
            owner, intruder = dialer.stream(), dialer.stream()
            await owner.send(dial_req(UNREACHABLE, 6))
            await agent.wait_held()
            rsp = await intruder.dial(echo_backend.address, 6)
            assert (rsp.dialResponse.random, rsp.dialResponse.error) == (
                6,
                "dial ID already in use",
            )
            assert await agent.answer(6, address=echo_backend.address) > 0
            won = await owner.expect("DIAL_RSP")
            assert won.dialResponse.random == 6 and not won.dialResponse.error
            for stream in (owner, intruder):
                assert await stream.end() == grpc.StatusCode.OK
            await frontend_gone(env)
            check_metrics({"pending_backend_dials": 0, "established_connections": 0})

    arun(main())


def test_dial_timeout_spares_established_tunnels(arun: RunFn, certs: Certs, sock_dir: str) -> None:
    """--backend-dial-timeout bounds dials only: a tunnel older than the timeout, in either
    mode, still flows after another dial timed out."""

    async def main() -> None:
        async with (
            proxy_env(certs, sock_dir, mode="http-connect", dial_timeout=0.2) as env,
            backend(echo) as echo_backend,
        ):
            await env.agent(policies={UNREACHABLE: DialPolicy.HOLD})
            old = await env.http_connect(echo_backend.address)
            assert await old.reader.readexactly(len(RESPONSE_200)) == RESPONSE_200
            late = await env.http_connect(UNREACHABLE)
            assert (await late.reader.read()).startswith(b"HTTP/1.1 504 Gateway Timeout")
            old.writer.write(b"still here")
            assert await old.reader.readexactly(10) == b"still here"
            await old.close()
            await wait_until(lambda: not env.proxy.router.frontends, "tunnels removed")
            check_metrics({failures("backend_dial_timeout"): 1, "established_connections": 0})

    arun(main())
