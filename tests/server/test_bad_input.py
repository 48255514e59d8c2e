"""Bad input on every listener of the proxy-server: a clear error or a close for the bad
peer, nothing for anyone else (docs/architecture.md, "Bad input").

Each test starts one in-process ``ProxyServer`` with all its listeners (``abuse``), an
echoing grpcio agent and two healthy tunnels (gRPC and HTTP-CONNECT) echoing in the
background. It then abuses the listeners and checks, for each abusive peer, a clear error or
a close; then that the healthy tunnels kept flowing and a new dial works
(``unaffected``), and that the process's fds and the router's state are back to what they
were (``no_leak``). The process not crashing is implied by all of that.

Valid peers are grpcio; packets are made with the official protobuf runtime; bad bytes come
from raw sockets.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import grpc
import grpc.aio
import pytest
import trustme

from konnectivity_fast.server import http_connect
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import http as transport_http

from .abuse import (
    ADDRESS,
    CLOSE_REQ,
    CLOSE_RSP,
    DATA,
    DIAL_CLS,
    DIAL_REQ,
    DIAL_RSP,
    DRAIN,
    LOOPBACK,
    MAX_MESSAGE,
    PEER_TIMEOUT,
    AbusedServer,
    Exchange,
    GrpcioAgent,
    abused_server,
    bounded,
    client_tls,
    close_writer,
    grpcio_dial,
    packet,
    parse,
    raw_exchange,
)
from .conftest import Certs, RunFn

pytestmark = pytest.mark.timeout(90)


GARBAGE = bytes(range(256)) * 4 + b"\r\n\r\n"
HTTP1_GET = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The response Go's dialer error gives for a CONNECT to an address without a port (the agent
#: reports it, the server maps it to 502: pkg/server/server.go mapDialErrorToHTTPStatus).
NO_PORT_502 = (
    b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"dial tcp: address 10.0.0.1: missing port in address"
)


def tls_targets(env: AbusedServer) -> dict[str, tuple[str, int]]:
    """The TLS listeners by name (host, port)."""
    return {
        "grpc-frontend-mtls": (LOOPBACK, env.grpc_tls),
        "http-connect-mtls": (LOOPBACK, env.http_tls),
        "agent-mtls": (LOOPBACK, env.agent_mtls),
        "agent-tls": (LOOPBACK, env.agent_tls),
    }


def grpc_targets(env: AbusedServer) -> dict[str, tuple[str | tuple[str, int], Any]]:
    """The gRPC listeners by name: (target, TLS context for a valid client or None)."""
    h2 = client_tls(env.certs, alpn=["h2"])
    return {
        "grpc-frontend-uds": (env.grpc_uds, None),
        "grpc-frontend-mtls": ((LOOPBACK, env.grpc_tls), h2),
        "agent-mtls": ((LOOPBACK, env.agent_mtls), h2),
        "agent-tls": ((LOOPBACK, env.agent_tls), h2),
    }


async def eventually(predicate: Any, what: str) -> None:
    """Wait (bounded) until ``predicate()`` holds."""
    for _ in range(int(PEER_TIMEOUT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def checked(env: AbusedServer, abuse: Any) -> None:
    """Run ``abuse(env)``, then check the healthy tunnels and that nothing leaked."""
    fds, state = env.baseline()
    await abuse(env)
    await env.no_leak(fds, state)
    await env.unaffected()
    bad = env.tracebacks.found
    assert not bad, f"{len(bad)} tracebacks logged by the server, first: {bad[:3]}"


# --- raw bytes ------------------------------------------------------------------------------


def test_garbage_bytes_every_listener(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """Plain garbage (ending in a blank line) to every listener, TLS ones included, and
    garbage inside a valid mTLS session to the TLS listeners: each peer is closed, HTTP
    listeners answer 400 first."""

    async def abuse(env: AbusedServer) -> None:
        plain: dict[str, str | tuple[str, int]] = {
            "grpc-frontend-uds": env.grpc_uds,
            "http-connect-uds": env.http_uds,
            "health": (LOOPBACK, env.health),
            **tls_targets(env),
        }
        results = await asyncio.gather(*(raw_exchange(t, GARBAGE) for t in plain.values()))
        for name, result in zip(plain, results, strict=True):
            assert result.closed, f"{name}: not closed, got {result.reply[:200]!r}"
            if name in ("http-connect-uds", "health"):
                assert result.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), name
            else:
                assert not result.reply.startswith(b"HTTP/"), (name, result.reply[:100])
        inside = {
            name: (target, client_tls(certs, alpn=["http/1.1" if "http" in name else "h2"]))
            for name, target in tls_targets(env).items()
        }
        results = await asyncio.gather(
            *(raw_exchange(t, GARBAGE, tls=ctx) for t, ctx in inside.values())
        )
        for name, result in zip(inside, results, strict=True):
            assert result.closed, f"{name} (in TLS): not closed, got {result.reply[:200]!r}"
            if name.startswith("http"):
                assert result.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), name

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_http1_request_to_grpc_listeners(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """An HTTP/1.1 request (and an HTTP/2 preface followed by HTTP/1 text) on each gRPC
    listener is not answered as HTTP/1; the connection is closed, as grpc-go does."""

    async def abuse(env: AbusedServer) -> None:
        targets = grpc_targets(env)
        for payload in (HTTP1_GET, H2_PREFACE + HTTP1_GET):
            results = await asyncio.gather(
                *(raw_exchange(t, payload, tls=ctx) for t, ctx in targets.values())
            )
            for name, result in zip(targets, results, strict=True):
                assert result.closed, f"{name}: not closed after {payload!r}"
                assert not result.reply.startswith(b"HTTP/1"), (name, result.reply[:100])

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_connect_without_port_and_malformed_targets(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A CONNECT without a port is passed to the agent unvalidated (upstream's
    pkg/server/tunnel.go Tunnel.ServeHTTP dials r.Host as it is): its dial error comes back
    as 502. Request lines Go cannot parse get 400. On both HTTP-CONNECT listeners."""
    no_port = b"CONNECT 10.0.0.1 HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n"
    malformed = [
        b"CONNECT  HTTP/1.1\r\n\r\n",  # no target
        b"CONNECT 10.0.0.1:443\r\n\r\n",  # no version
        b"CONNECT 10.0.0.1:443 HTTP/1.1 extra\r\n\r\n",
        b"CONNECT 10.0.0.1:443 HTTP/1.1\r\nno colon here\r\n\r\n",
    ]

    async def abuse(env: AbusedServer) -> None:
        http = client_tls(certs, alpn=["http/1.1"])
        targets: list[tuple[str | tuple[str, int], ssl.SSLContext | None]] = [
            (env.http_uds, None),
            ((LOOPBACK, env.http_tls), http),
        ]
        for target, ctx in targets:
            result = await raw_exchange(target, no_port, tls=ctx)
            assert result.closed and result.reply == NO_PORT_502, (target, result)
            for request in malformed:
                result = await raw_exchange(target, request, tls=ctx)
                assert result.closed, (target, request, result)
                assert result.reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (
                    target,
                    request,
                    result.reply,
                )
        assert env.agent is not None
        dialled = [p.dialRequest.address for p in env.agent.received if p.type == DIAL_REQ]
        assert dialled.count("10.0.0.1") == 2

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


# --- packets from a frontend ----------------------------------------------------------------


async def read_packet(call: Any) -> Any:
    message = await asyncio.wait_for(call.read(), PEER_TIMEOUT)
    assert message is not grpc.aio.EOF, "the server ended the stream"
    return parse(message)


async def half_close_ok(call: Any) -> list[Any]:
    """Half-close, read what is left, and check the server ended the stream OK (upstream's
    ProxyServer.Proxy returns nil on the client's EOF)."""
    await call.done_writing()
    rest = []
    while (message := await asyncio.wait_for(call.read(), PEER_TIMEOUT)) is not grpc.aio.EOF:
        rest.append(parse(message))
    assert await asyncio.wait_for(call.code(), PEER_TIMEOUT) == grpc.StatusCode.OK
    return rest


def frontend_channels(env: AbusedServer) -> dict[str, grpc.aio.Channel]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=env.certs.ca_pem,
        private_key=env.certs.client_key_pem,
        certificate_chain=env.certs.client_cert_pem,
    )
    return {
        "uds": grpc.aio.insecure_channel(f"unix:{env.grpc_uds}"),
        "mtls": grpc.aio.secure_channel(
            f"{LOOPBACK}:{env.grpc_tls}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ),
    }


def test_mismatched_packets_from_a_frontend(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """Packets whose type does not match their payload, empty packets and unknown types on
    ``/ProxyService/Proxy`` (UDS and mTLS): read as zero-valued payloads or ignored (upstream
    crashes: serveRecvFrontend reads payloads without checking them), the stream stays
    usable, and the client's half-close ends it OK."""

    async def abuse(env: AbusedServer) -> None:
        assert env.agent is not None
        for name, channel in frontend_channels(env).items():
            proxy = channel.stream_stream("/ProxyService/Proxy")
            # DATA carrying a dialRequest, before any dial: a DATA with connectID 0.
            call = proxy()
            await call.write(packet(DATA, dialRequest={"address": ADDRESS, "random": 5}))
            p = await read_packet(call)
            assert (p.type, p.closeResponse.connectID, p.closeResponse.error) == (
                CLOSE_RSP,
                0,
                "backend not initialized",
            ), (name, p)
            await half_close_ok(call)

            # An empty Packet reads as DIAL_REQ{} (random 0, no address): the agent's dial
            # fails and its error comes back.
            call = proxy()
            await call.write(b"")
            p = await read_packet(call)
            assert p.type == DIAL_RSP and p.dialResponse.random == 0, (name, p)
            assert "missing port" in p.dialResponse.error, (name, p)
            await half_close_ok(call)

            # Payload-less and unknown packets are ignored; a real dial then works.
            call = proxy()
            for junk in (
                packet(CLOSE_RSP),
                packet(DIAL_RSP),
                packet(DRAIN),
                packet(DIAL_CLS),
                packet(99, data={"connectID": 1, "data": b"x"}),
                packet(DIAL_RSP, dialResponse={"random": 1, "connectID": 1}),
                packet(CLOSE_RSP, closeResponse={"connectID": 1}),
            ):
                await call.write(junk)
            random = env.next_random()
            await call.write(
                packet(
                    DIAL_REQ, dialRequest={"protocol": "tcp", "address": ADDRESS, "random": random}
                )
            )
            p = await read_packet(call)
            assert p.type == DIAL_RSP and p.dialResponse.random == random, (name, p)
            assert p.dialResponse.error == "", (name, p)
            cid = p.dialResponse.connectID
            # Now a DATA carrying a closeRequest: connectID 0, ignored.
            await call.write(packet(DATA, closeRequest={"connectID": cid}))
            await call.write(packet(DATA, data={"connectID": cid, "data": b"still here"}))
            p = await read_packet(call)
            assert (p.type, p.data.connectID, p.data.data) == (DATA, cid, b"still here"), p
            # CLOSE_REQ with no payload: CLOSE_REQ{0} to the agent, which does not know it
            # (its CLOSE_RSP{0} is dropped); the stream stops processing, as after any
            # CLOSE_REQ (as upstream's serveRecvFrontend), and its half-close closes its
            # connection.
            await call.write(packet(CLOSE_REQ))
            await call.write(packet(DATA, data={"connectID": cid, "data": b"dropped"}))
            rest = await half_close_ok(call)
            assert all(p.type == CLOSE_RSP for p in rest), rest
            await eventually(lambda c=cid: c not in env.agent.connections, name)

            # A message that is not a Packet: INTERNAL for that stream only.
            call = proxy()
            await call.write(b"\xff\xff\xff\xff")
            assert await asyncio.wait_for(call.code(), PEER_TIMEOUT) == (
                grpc.StatusCode.INTERNAL
            ), name
            details = await call.details()
            assert details.startswith("grpc: failed to unmarshal the received message"), details
            await channel.close()

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_data_for_unknown_connect_id_from_a_frontend(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """DATA before any dial gets ``backend not initialized``; DATA with a second connectID
    gets ``mismatched connection IDs`` for both (upstream's serveRecvFrontend, DATA case).
    Neither touches the healthy tunnels."""

    async def abuse(env: AbusedServer) -> None:
        assert env.channel is not None
        proxy = env.channel.stream_stream("/ProxyService/Proxy")
        call = proxy()
        await call.write(packet(DATA, data={"connectID": 12345, "data": b"x"}))
        p = await read_packet(call)
        assert (p.type, p.closeResponse.connectID, p.closeResponse.error) == (
            CLOSE_RSP,
            12345,
            "backend not initialized",
        )
        await half_close_ok(call)

        call, cid = await grpcio_dial(env.channel, env.next_random())
        await call.write(packet(DATA, data={"connectID": cid, "data": b"mine"}))
        p = await read_packet(call)
        assert (p.type, p.data.data) == (DATA, b"mine")
        await call.write(packet(DATA, data={"connectID": 999_999, "data": b"not mine"}))
        got = [await read_packet(call), await read_packet(call)]
        assert [(p.type, p.closeResponse.connectID, p.closeResponse.error) for p in got] == [
            (CLOSE_RSP, 999_999, "mismatched connection IDs"),
            (CLOSE_RSP, cid, "mismatched connection IDs"),
        ]
        await half_close_ok(call)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_data_with_another_tunnels_connect_id_is_not_delivered(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """A frontend stream that dialled, then sends DATA with the connectID of *another*
    stream's connection (on the same agent), must not inject bytes into that tunnel. Upstream
    forwards such DATA unchecked (serveRecvFrontend); konnectivity-client only ever uses the
    connectID of its own DIAL_RSP, so refusing it costs nothing and keeps tunnels apart."""

    async def abuse(env: AbusedServer) -> None:
        assert env.channel is not None and env.agent is not None
        victim, victim_cid = await grpcio_dial(env.channel, env.next_random())
        intruder, _ = await grpcio_dial(env.channel, env.next_random())
        await intruder.write(packet(DATA, data={"connectID": victim_cid, "data": b"INJECTED"}))
        # The intruder gets an error or nothing; its half-close is handled after the DATA.
        await half_close_ok(intruder)
        assert b"INJECTED" not in env.agent.data_for(victim_cid), (
            "DATA from one frontend stream reached another stream's connection"
        )
        await half_close_ok(victim)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


# --- packets from an agent ------------------------------------------------------------------


async def bad_agent_call(env: AbusedServer, agent_id: str) -> tuple[grpc.aio.Channel, Any]:
    creds = grpc.ssl_channel_credentials(
        root_certificates=env.certs.ca_pem,
        private_key=env.certs.client_key_pem,
        certificate_chain=env.certs.client_cert_pem,
    )
    channel = grpc.aio.secure_channel(
        f"{LOOPBACK}:{env.agent_mtls}",
        creds,
        options=[("grpc.ssl_target_name_override", "localhost")],
    )
    call = channel.stream_stream("/AgentService/Connect")(metadata=(("agentid", agent_id),))
    await asyncio.wait_for(call.initial_metadata(), PEER_TIMEOUT)
    return channel, call


def test_mismatched_packets_from_an_agent(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """An agent stream sending payload-less, mismatched, unknown and misdirected packets:
    ignored, or answered with CLOSE_REQ where the server must tell the agent a connection is
    unknown (DATA for an unknown connectID, a successful DIAL_RSP nobody waits for). DATA
    using the healthy tunnel's connectID from another agent stream does not reach it. A
    message that is not a Packet ends that agent stream with INTERNAL."""

    async def abuse(env: AbusedServer) -> None:
        assert env.agent is not None
        healthy_cids = list(env.agent.connections)
        channel, call = await bad_agent_call(env, "bad-agent")
        try:
            junk = [
                packet(DATA),
                packet(CLOSE_RSP),
                packet(DIAL_RSP),
                packet(DIAL_CLS),
                packet(DRAIN, data={"connectID": 3}),
                packet(DIAL_REQ),
                packet(CLOSE_REQ, closeRequest={"connectID": 1}),
                packet(77),
                packet(DATA, dialResponse={"random": 1, "connectID": 9}),
                packet(CLOSE_RSP, closeResponse={"connectID": healthy_cids[0]}),
            ]
            for message in junk:
                await call.write(message)
            # A successful DIAL_RSP for an unknown random: CLOSE_REQ{7} back.
            await call.write(packet(DIAL_RSP, dialResponse={"random": 424242, "connectID": 7}))
            p = await read_packet(call)
            assert (p.type, p.closeRequest.connectID) == (CLOSE_REQ, 7), p
            # DATA for connectIDs this stream does not have, including the healthy ones of
            # the other agent stream: CLOSE_REQ for each, nothing reaches the tunnels.
            for cid in [555, *healthy_cids]:
                await call.write(packet(DATA, data={"connectID": cid, "data": b"INJECTED"}))
                p = await read_packet(call)
                assert (p.type, p.closeRequest.connectID) == (CLOSE_REQ, cid), p
            # A message that is not a Packet: INTERNAL, the stream is gone from routing.
            await call.write(b"\x0a\xff")
            code = await asyncio.wait_for(call.code(), PEER_TIMEOUT)
            assert code == grpc.StatusCode.INTERNAL, (code, await call.details())
            assert all(b.agent_id != "bad-agent" for b in env.proxy.router.backends.values())
        finally:
            await channel.close()

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)
            assert env.agent is not None
            for cid in env.agent.connections:
                assert b"INJECTED" not in env.agent.data_for(cid)

    run(bounded(main()))


# --- oversize messages ----------------------------------------------------------------------


def test_oversize_messages(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """A message of 4 MiB + 1 fails its stream with RESOURCE_EXHAUSTED (grpc-go's default
    receive limit, server.go defaultServerMaxReceiveMessageSize) on the frontend (UDS and
    mTLS) and on the agent listener; a message of exactly 4 MiB passes."""

    async def abuse(env: AbusedServer) -> None:
        for name, channel in frontend_channels(env).items():
            proxy = channel.stream_stream("/ProxyService/Proxy")
            call, cid = await grpcio_dial(channel, env.next_random())
            header = packet(DATA, data={"connectID": cid, "data": b""})
            # The largest DATA that fits: 4 MiB in all (tag, length varints included).
            body = b"y" * (MAX_MESSAGE - len(header) - 8)
            message = packet(DATA, data={"connectID": cid, "data": body})
            message = packet(
                DATA, data={"connectID": cid, "data": body + b"y" * (MAX_MESSAGE - len(message))}
            )
            assert len(message) == MAX_MESSAGE
            await call.write(message)
            got = 0
            while got < MAX_MESSAGE - 16:
                p = await read_packet(call)
                got += len(p.data.data)
            await half_close_ok(call)

            call = proxy()
            await call.write(b"\x20\x04" + b"z" * (MAX_MESSAGE - 1))  # 4 MiB + 1
            code = await asyncio.wait_for(call.code(), PEER_TIMEOUT)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, code)
            await channel.close()
        channel, call = await bad_agent_call(env, "big-agent")
        await call.write(b"\x20\x04" + b"z" * (MAX_MESSAGE - 1))
        code = await asyncio.wait_for(call.code(), PEER_TIMEOUT)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, code
        assert all(b.agent_id != "big-agent" for b in env.proxy.router.backends.values())
        await channel.close()

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


# --- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A client certificate from another CA, and that CA: (cert, key, ca)."""
    d = tmp_path_factory.mktemp("stranger")
    ca = trustme.CA()
    cert = ca.issue_cert("stranger.example")
    paths = (str(d / "cert.pem"), str(d / "key.pem"), str(d / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    ca.cert_pem.write_to_path(paths[2])
    return paths


def test_bad_tls(run: RunFn, sock_dir: str, certs: Certs, stranger: tuple[str, str, str]) -> None:
    """On the mTLS listeners a client without a certificate, or with one from another CA, is
    refused in the handshake and served nothing; a client that does not trust the server
    leaves. The agent listener without ``--cluster-ca-cert`` asks for no certificate."""
    strange_cert, strange_key, strange_ca = stranger

    def contexts(alpn: str) -> dict[str, ssl.SSLContext]:
        no_cert = client_tls(certs, alpn=[alpn], client_cert=False)
        wrong_ca = client_tls(certs, alpn=[alpn], client_cert=False)
        wrong_ca.load_cert_chain(strange_cert, strange_key)
        distrust = client_tls(None, alpn=[alpn], ca=strange_ca)
        distrust.load_cert_chain(certs.client_cert, certs.client_key)
        return {
            "no client cert": no_cert,
            "client cert from another CA": wrong_ca,
            "server not trusted": distrust,
        }

    async def abuse(env: AbusedServer) -> None:
        for name, target in tls_targets(env).items():
            request = (
                b"CONNECT " + ADDRESS.encode() + b" HTTP/1.1\r\n\r\n"
                if name.startswith("http")
                else H2_PREFACE
            )
            for what, ctx in contexts("http/1.1" if name.startswith("http") else "h2").items():
                if name == "agent-tls" and what != "server not trusted":
                    # No certificate requested (token-auth mode): the handshake succeeds and
                    # the server answers the preface with its SETTINGS frame.
                    result = await raw_exchange(target, request, tls=ctx, timeout=0.5)
                    assert not result.error and result.reply[3:4] == b"\x04", (name, what, result)
                    continue
                result = await raw_exchange(target, request, tls=ctx)
                assert result.closed, (name, what, result)
                assert result.reply == b"", (name, what, result)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_alpn(run: RunFn, sock_dir: str, certs: Certs) -> None:
    """gRPC TLS listeners close a client that negotiated no ALPN protocol (grpc-go >= 1.67),
    or only ``http/1.1``; the HTTP-CONNECT listener serves HTTP/1.1 with or without ALPN."""

    async def abuse(env: AbusedServer) -> None:
        grpc_tls = {k: v for k, v in tls_targets(env).items() if not k.startswith("http")}
        for alpn in (None, ["http/1.1"]):
            ctx = client_tls(certs, alpn=alpn)
            for name, target in grpc_tls.items():
                result = await raw_exchange(target, H2_PREFACE, tls=ctx)
                assert result.closed and result.reply == b"", (name, alpn, result)
        request = b"CONNECT " + ADDRESS.encode() + b" HTTP/1.1\r\n\r\n"
        for alpn in (None, ["http/1.1"], ["konnectivity", "http/1.1"]):
            ctx = client_tls(certs, alpn=alpn)
            result = await raw_exchange(
                (LOOPBACK, env.http_tls), request, tls=ctx, stop_after=b"\r\n\r\n"
            )
            assert result.reply == b"HTTP/1.1 200 Connection Established\r\n\r\n", (alpn, result)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


# --- slow and idle peers --------------------------------------------------------------------

#: The header and handshake timeouts, shortened for the test (the real ones are 60 s and
#: 120 s; the abuse must not depend on their exact length).
SHORT_TIMEOUT = 0.5


async def drip(target: str | tuple[str, int], data: bytes, tls: Any = None) -> Exchange:
    """Send ``data`` a byte at a time, about every 20 ms (a slowloris), until the server
    closes or ``SHORT_TIMEOUT * 8`` passes."""
    loop = asyncio.get_running_loop()
    if isinstance(target, str):
        reader, writer = await asyncio.open_unix_connection(target)
    else:
        reader, writer = await asyncio.open_connection(
            *target, ssl=tls, server_hostname="localhost" if tls else None
        )
    deadline = loop.time() + SHORT_TIMEOUT * 8
    closed, reply = False, b""
    try:
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.02)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                closed = True
                break
            reply += chunk or b""
            if loop.time() > deadline:
                break
    except (ConnectionError, OSError, ssl.SSLError):
        closed = True
    finally:
        await close_writer(writer)
    return Exchange(reply, closed)


def test_slowloris_http_headers(
    run: RunFn, sock_dir: str, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP-CONNECT and health listeners close a client whose request headers are not
    complete within the header timeout (``ReadHeaderTimeout``), however slowly it trickles
    them, and a client that sends nothing at all."""
    monkeypatch.setattr(http_connect, "READ_HEADER_TIMEOUT", SHORT_TIMEOUT)
    monkeypatch.setattr(transport_http, "READ_HEADER_TIMEOUT", SHORT_TIMEOUT)
    slow = b"CONNECT " + ADDRESS.encode() + b" HTTP/1.1\r\n" + b"X-Slow: a\r\n" * 200

    async def abuse(env: AbusedServer) -> None:
        http = client_tls(certs, alpn=["http/1.1"])
        targets: dict[str, tuple[str | tuple[str, int], Any]] = {
            "http-connect-uds": (env.http_uds, None),
            "http-connect-mtls": ((LOOPBACK, env.http_tls), http),
            "health": ((LOOPBACK, env.health), None),
        }
        results = await asyncio.gather(
            *(
                raw_exchange(t, b"", tls=ctx, timeout=SHORT_TIMEOUT * 8)
                for t, ctx in targets.values()
            ),
            *(drip(t, slow, ctx) for t, ctx in targets.values()),
        )
        n = len(targets)
        for name, idle, slow_one in zip(targets, results[:n], results[n:], strict=True):
            assert idle.closed, f"{name}: an idle client was not closed"
            assert slow_one.closed, f"{name}: a slowloris client was not closed"
            assert not slow_one.reply.startswith(b"HTTP/1.1 200"), name

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_idle_connections_on_grpc_listeners_time_out(
    run: RunFn, sock_dir: str, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc-go gives a new connection ``ConnectionTimeout`` (120 s) to finish the TLS
    handshake and the HTTP/2 preface, then closes it. Our gRPC listeners must too (the
    constant ``transport.grpc.CONNECTION_TIMEOUT``, shortened here): a peer that connects and
    sends nothing, stops in the middle of the preface, or finishes TLS and then sends nothing
    is closed. Established connections (the healthy tunnels) are not."""
    monkeypatch.setattr(kgrpc, "CONNECTION_TIMEOUT", SHORT_TIMEOUT, raising=False)

    async def abuse(env: AbusedServer) -> None:
        targets = grpc_targets(env)
        cases = []
        for name, (target, ctx) in targets.items():
            cases.append((f"{name}: nothing", raw_exchange(target, b"", timeout=5)))
            cases.append(
                (
                    f"{name}: half a preface",
                    raw_exchange(target, H2_PREFACE[:10], tls=ctx, timeout=5),
                )
            )
            if ctx is not None:
                cases.append(
                    (f"{name}: TLS, then nothing", raw_exchange(target, b"", tls=ctx, timeout=5))
                )
        results = await asyncio.gather(*(coro for _, coro in cases))
        not_closed = [name for (name, _), r in zip(cases, results, strict=True) if not r.closed]
        assert not not_closed, f"not closed by the server: {not_closed}"
        await asyncio.sleep(SHORT_TIMEOUT * 2)  # longer than the timeout: tunnels still flow

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_agent_and_frontend_listeners_survive_abrupt_resets(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """Peers that reset (SO_LINGER 0) right after connecting, mid-handshake and mid-call are
    cleaned up with no effect on the healthy tunnels."""

    async def abuse(env: AbusedServer) -> None:
        import socket
        import struct

        linger = struct.pack("ii", 1, 0)
        for port in (env.grpc_tls, env.http_tls, env.agent_mtls, env.agent_tls, env.health):
            for data in (b"", b"\x16\x03\x01\x00\xff\x01", GARBAGE):
                s = socket.create_connection((LOOPBACK, port))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                if data:
                    s.sendall(data)
                s.close()
        # Whole requests to the HTTP listeners, reset before the answer is written.
        for target in ((LOOPBACK, env.health), env.http_uds):
            for request in (b"GET /healthz HTTP/1.1\r\n\r\n", GARBAGE, HTTP1_GET):
                for _ in range(20):
                    family = socket.AF_UNIX if isinstance(target, str) else socket.AF_INET
                    with socket.socket(family) as s:
                        s.connect(target)
                        if family == socket.AF_INET:
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                        s.sendall(request)
                await asyncio.sleep(0.05)
        # An agent that resets its connection while registered.
        agent = GrpcioAgent(f"{LOOPBACK}:{env.agent_mtls}", env.certs, agent_id="reset-agent")
        await agent.start()
        await agent.close()
        for _ in range(200):
            if all(b.agent_id != "reset-agent" for b in env.proxy.router.backends.values()):
                break
            await asyncio.sleep(0.01)
        assert all(b.agent_id != "reset-agent" for b in env.proxy.router.backends.values())

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))


def test_garbage_is_closed_quickly_not_at_the_timeout(
    run: RunFn, sock_dir: str, certs: Certs
) -> None:
    """Bad bytes get their close at once (well before any timeout), and many such peers in
    parallel do not slow the healthy tunnels down to a stop."""

    async def abuse(env: AbusedServer) -> None:
        targets: list[str | tuple[str, int]] = [
            env.grpc_uds,
            env.http_uds,
            (LOOPBACK, env.agent_mtls),
        ]
        # Not random bytes: those may start a valid SSLv2-style record header, and a TLS
        # server rightly waits for the rest of the record (until the handshake timeout).
        results = await asyncio.gather(
            *(raw_exchange(t, GARBAGE, timeout=PEER_TIMEOUT) for t in targets * 50)
        )
        assert all(r.closed for r in results)

    async def main() -> None:
        async with abused_server(sock_dir, certs) as env:
            await checked(env, abuse)

    run(bounded(main()))
