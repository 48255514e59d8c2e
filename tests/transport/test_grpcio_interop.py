"""Our HTTP/2 + gRPC engine against grpcio, an independent gRPC implementation, both ways.

A grpcio asyncio client calls an echo service built on our server role, and our client role
calls a grpcio echo server: messages of every size up to the 4 MiB limit, 100 concurrent
streams on one connection, cancellation from either side, metadata both ways, and a message
one byte over the limit rejected with RESOURCE_EXHAUSTED. Over a Unix socket (h2c) and over
TCP with TLS (ALPN h2, client certificates). Each test runs on uvloop and the stdlib loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.transport import tls
from konnectivity_fast.wire.errors import StatusCode

from .conftest import Certs, RunFn

SERVICE = "konnectivity.test.Echo"
METHOD = "Echo"
PATH = f"/{SERVICE}/{METHOD}"
LIMIT = 4 * 1024 * 1024
SIZES = [0, 1, 1024, 32 * 1024, 1024 * 1024, LIMIT]
CANCEL_ME = b"please-cancel"


@dataclass
class Endpoint:
    """Where a server listens, and how a client reaches it."""

    uds: str | None = None
    port: int | None = None
    certs: Certs | None = None

    @property
    def grpc_target(self) -> str:
        return f"unix:{self.uds}" if self.uds else f"localhost:{self.port}"


@pytest.fixture(params=["uds", "tls"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---- our server, grpcio client ---------------------------------------------------------


@dataclass
class EchoLog:
    """What our echo handler saw, for assertions."""

    metadata: list[list[tuple[str, str]]] = field(default_factory=list)
    closed_codes: list[int] = field(default_factory=list)


def make_echo_handler(seen: EchoLog) -> kgrpc.Handler:
    async def handler(call: kgrpc.GrpcCall) -> None:
        if call.path != PATH:
            raise kgrpc.GrpcError(StatusCode.UNIMPLEMENTED, f"unknown method {call.path}")
        seen.metadata.append(call.metadata)
        agent = dict(call.metadata).get("agentid", "")
        call.send_headers([("serverid", "server-1"), ("servercount", "3"), ("echo-agent", agent)])
        while (msg := await call.recv()) is not None:
            if msg == CANCEL_ME:
                call.cancel()
                break
            call.send(msg)
            await call.drain()
        # The stream closes only after this handler returns (the trailers go out then).
        call.closed.add_done_callback(lambda f: seen.closed_codes.append(f.result()))

    return handler


@contextlib.asynccontextmanager
async def our_server(
    kind: str, sock_dir: str, certs: Certs, seen: EchoLog
) -> AsyncIterator[Endpoint]:
    handler = make_echo_handler(seen)
    if kind == "uds":
        path = os.path.join(sock_dir, "s.sock")
        server = await kgrpc.serve(handler, path=path)
        ep = Endpoint(uds=path)
    else:
        ctx = tls.server_context(certs.server_cert, certs.server_key, certs.ca)
        server = await kgrpc.serve(handler, host="127.0.0.1", port=0, ssl=ctx)
        ep = Endpoint(port=server.sockets[0].getsockname()[1], certs=certs)
    try:
        yield ep
    finally:
        server.close()
        await server.wait_closed()


def grpcio_channel(ep: Endpoint) -> grpc.aio.Channel:
    options = [("grpc.max_receive_message_length", LIMIT)]
    if ep.certs is None:
        return grpc.aio.insecure_channel(ep.grpc_target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ep.certs.ca_pem,
        private_key=ep.certs.client_key_pem,
        certificate_chain=ep.certs.client_cert_pem,
    )
    return grpc.aio.secure_channel(ep.grpc_target, creds, options=options)


def stub(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(PATH)  # no serializers: raw bytes


def test_grpcio_client_echo_sizes(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    seen = EchoLog()

    async def main() -> None:
        async with our_server(transport_kind, sock_dir, certs, seen) as ep:
            async with grpcio_channel(ep) as channel:
                call = stub(channel)(
                    metadata=(("agentid", "agent-7"), ("agentidentifiers", "host=a"))
                )
                headers = dict(await call.initial_metadata())
                for size in SIZES:
                    payload = os.urandom(size)
                    await call.write(payload)
                    assert await call.read() == payload, size
                await call.done_writing()
                assert await call.read() is grpc.aio.EOF
                assert await call.code() == grpc.StatusCode.OK
        assert headers["serverid"] == "server-1"
        assert headers["servercount"] == "3"
        assert headers["echo-agent"] == "agent-7"
        assert ("agentidentifiers", "host=a") in seen.metadata[0]

    run(main())


def test_grpcio_client_100_concurrent_streams(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    seen = EchoLog()

    async def one(channel: grpc.aio.Channel, i: int) -> int:
        call = stub(channel)()
        for j in range(10):
            msg = f"{i}:{j}".encode() * (1 + i)
            await call.write(msg)
            assert await call.read() == msg
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        return i

    async def main() -> None:
        async with our_server(transport_kind, sock_dir, certs, seen) as ep:
            async with grpcio_channel(ep) as channel:
                done = await asyncio.gather(*(one(channel, i) for i in range(100)))
        assert sorted(done) == list(range(100))
        assert len(seen.metadata) == 100

    run(main())


def test_grpcio_client_cancels(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    seen = EchoLog()

    async def main() -> None:
        async with our_server(transport_kind, sock_dir, certs, seen) as ep:
            async with grpcio_channel(ep) as channel:
                call = stub(channel)()
                await call.write(b"hello")
                assert await call.read() == b"hello"
                call.cancel()
                for _ in range(200):
                    if seen.closed_codes:
                        break
                    await asyncio.sleep(0.01)
        assert seen.closed_codes == [8]  # RST_STREAM CANCEL reached our handler

    run(main())


def test_our_server_cancels(run: RunFn, transport_kind: str, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with our_server(transport_kind, sock_dir, certs, EchoLog()) as ep:
            async with grpcio_channel(ep) as channel:
                call = stub(channel)()
                await call.write(CANCEL_ME)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.CANCELLED

    run(main())


def test_grpcio_client_message_over_limit(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with our_server(transport_kind, sock_dir, certs, EchoLog()) as ep:
            async with grpcio_channel(ep) as channel:
                call = stub(channel)()
                await call.write(b"x" * (LIMIT + 1))
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call.read()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert err.value.details() == (
                    f"grpc: received message larger than max ({LIMIT + 1} vs. {LIMIT})"
                )
                # The connection survives: a new call on it works.
                again = stub(channel)()
                await again.write(b"ok")
                assert await again.read() == b"ok"
                await again.done_writing()
                assert await again.code() == grpc.StatusCode.OK

    run(main())


def test_grpcio_client_unknown_method(run: RunFn, sock_dir: str, certs: Certs) -> None:
    async def main() -> None:
        async with our_server("uds", sock_dir, certs, EchoLog()) as ep:
            async with grpcio_channel(ep) as channel:
                call = channel.stream_stream("/No/Such")()
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.UNIMPLEMENTED

    run(main())


# ---- grpcio server, our client ---------------------------------------------------------


@dataclass
class ServerLog:
    metadata: list[tuple[str, str]] = field(default_factory=list)
    outcome: list[str] = field(default_factory=list)


async def grpcio_echo(request_iterator: Any, context: Any, log: ServerLog) -> AsyncIterator[bytes]:
    log.metadata = list(context.invocation_metadata())
    await context.send_initial_metadata((("serverid", "grpcio-1"), ("servercount", "2")))
    try:
        async for msg in request_iterator:
            if msg == CANCEL_ME:
                await context.abort(grpc.StatusCode.CANCELLED, "server cancelled")
            if msg == b"too-big":
                yield b"y" * (LIMIT + 1)
                continue
            yield msg
    except BaseException as exc:
        log.outcome.append(type(exc).__name__)
        raise
    log.outcome.append("ended")


@contextlib.asynccontextmanager
async def grpcio_server(
    kind: str, sock_dir: str, certs: Certs, log: ServerLog
) -> AsyncIterator[Endpoint]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT)])

    async def handler(request_iterator: Any, context: Any) -> AsyncIterator[bytes]:
        async for msg in grpcio_echo(request_iterator, context, log):
            yield msg

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {METHOD: grpc.stream_stream_rpc_method_handler(handler)}
            ),
        )
    )
    if kind == "uds":
        path = os.path.join(sock_dir, "g.sock")
        server.add_insecure_port(f"unix:{path}")
        ep = Endpoint(uds=path)
    else:
        creds = grpc.ssl_server_credentials(
            [(certs.server_key_pem, certs.server_cert_pem)],
            root_certificates=certs.ca_pem,
            require_client_auth=True,
        )
        port = server.add_secure_port("127.0.0.1:0", creds)
        ep = Endpoint(port=port, certs=certs)
    await server.start()
    try:
        yield ep
    finally:
        await server.stop(None)


async def our_client(ep: Endpoint) -> kgrpc.GrpcProtocol:
    if ep.uds:
        return await kgrpc.connect(path=ep.uds)
    assert ep.certs is not None
    ctx = tls.client_context(
        ep.certs.ca, ep.certs.client_cert, ep.certs.client_key, extra_alpn=["konnectivity-test"]
    )
    return await kgrpc.connect(host="127.0.0.1", port=ep.port, ssl=ctx, server_hostname="localhost")


def test_our_client_echo_sizes(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    log = ServerLog()

    async def main() -> None:
        async with grpcio_server(transport_kind, sock_dir, certs, log) as ep:
            proto = await our_client(ep)
            call = proto.start_call(PATH, [("agentid", "agent-9"), ("authorization", "Bearer t0k")])
            headers = dict(await call.headers_received)
            for size in SIZES:
                payload = os.urandom(size)
                call.send(payload)
                assert await call.recv() == payload, size
            call.done_writing()
            assert await call.recv() is None
            assert await call.wait_status() == StatusCode.OK
            await proto.aclose()
        assert headers["serverid"] == "grpcio-1"
        assert headers["servercount"] == "2"
        assert ("agentid", "agent-9") in log.metadata
        assert ("authorization", "Bearer t0k") in log.metadata

    run(main())


def test_our_client_100_concurrent_streams(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    async def one(proto: kgrpc.GrpcProtocol, i: int) -> int:
        call = proto.start_call(PATH)
        for j in range(10):
            msg = f"{i}:{j}".encode() * (1 + i)
            call.send(msg)
            assert await call.recv() == msg
        call.done_writing()
        assert await call.recv() is None
        assert await call.wait_status() == StatusCode.OK
        return i

    async def main() -> None:
        async with grpcio_server(transport_kind, sock_dir, certs, ServerLog()) as ep:
            proto = await our_client(ep)
            done = await asyncio.gather(*(one(proto, i) for i in range(100)))
            await proto.aclose()
        assert sorted(done) == list(range(100))

    run(main())


def test_our_client_cancels(run: RunFn, transport_kind: str, sock_dir: str, certs: Certs) -> None:
    """The grpcio server must see our RST_STREAM CANCEL as it sees grpcio's own client
    cancelling: its handler stops, either by the request stream ending or by its task being
    cancelled (which of the two depends on where the handler was; both are seen with
    grpcio's own client). That it is a CANCEL on the wire is pinned by the next test."""
    theirs, ours = ServerLog(), ServerLog()

    async def wait_outcome(log: ServerLog) -> None:
        for _ in range(500):
            if log.outcome:
                return
            await asyncio.sleep(0.01)

    async def main() -> None:
        async with grpcio_server(transport_kind, sock_dir, certs, theirs) as ep:
            async with grpcio_channel(ep) as channel:
                ref = stub(channel)()
                await ref.write(b"hi")
                assert await ref.read() == b"hi"
                ref.cancel()
                await wait_outcome(theirs)
        async with grpcio_server(transport_kind, sock_dir, certs, ours) as ep:
            proto = await our_client(ep)
            call = proto.start_call(PATH)
            call.send(b"hi")
            assert await call.recv() == b"hi"
            call.cancel()
            assert await call.wait_status() == StatusCode.CANCELLED
            await wait_outcome(ours)
            await proto.aclose()
        stopped = {"ended", "CancelledError"}
        assert len(theirs.outcome) == 1 and theirs.outcome[0] in stopped, theirs.outcome
        assert len(ours.outcome) == 1 and ours.outcome[0] in stopped, ours.outcome

    run(main())


def test_our_client_cancel_reaches_our_server(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    seen = EchoLog()

    async def main() -> None:
        async with our_server(transport_kind, sock_dir, certs, seen) as ep:
            proto = await our_client(ep)
            call = proto.start_call(PATH)
            call.send(b"hi")
            assert await call.recv() == b"hi"
            call.cancel()
            assert await call.wait_status() == StatusCode.CANCELLED
            for _ in range(200):
                if seen.closed_codes:
                    break
                await asyncio.sleep(0.01)
            await proto.aclose()
        assert seen.closed_codes == [8]  # RST_STREAM CANCEL

    run(main())


def test_grpcio_server_cancels(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with grpcio_server(transport_kind, sock_dir, certs, ServerLog()) as ep:
            proto = await our_client(ep)
            call = proto.start_call(PATH)
            call.send(CANCEL_ME)
            assert await call.recv() is None
            assert await call.wait_status() == StatusCode.CANCELLED
            assert call.message == "server cancelled"
            await proto.aclose()

    run(main())


def test_our_client_sends_over_limit(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with grpcio_server(transport_kind, sock_dir, certs, ServerLog()) as ep:
            proto = await our_client(ep)
            call = proto.start_call(PATH)
            call.send(b"x" * (LIMIT + 1))
            assert await call.wait_status() == StatusCode.RESOURCE_EXHAUSTED
            assert "larger than max" in call.message
            await proto.aclose()

    run(main())


def test_our_client_receives_over_limit(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    async def main() -> None:
        async with grpcio_server(transport_kind, sock_dir, certs, ServerLog()) as ep:
            proto = await our_client(ep)
            call = proto.start_call(PATH)
            call.send(b"too-big")
            assert await call.wait_status() == StatusCode.RESOURCE_EXHAUSTED
            assert (
                call.message == f"grpc: received message larger than max ({LIMIT + 1} vs. {LIMIT})"
            )
            # Only that call failed: the connection carries a new one.
            again = proto.start_call(PATH)
            again.send(b"still here")
            assert await again.recv() == b"still here"
            again.done_writing()
            assert await again.wait_status() == StatusCode.OK
            await proto.aclose()

    run(main())


# ---- callback-style service ------------------------------------------------------------


class CallbackEcho:
    """An echo in callback style (no task per call), as the proxy's frontends are built."""

    def __init__(self) -> None:
        self.closed: list[int] = []

    def open_call(self, call: kgrpc.GrpcCall) -> CallbackEcho:
        call.send_headers([("serverid", "callback")])
        return self

    def on_message(self, call: kgrpc.GrpcCall, message: bytes) -> None:
        call.send(message)

    def on_end(self, call: kgrpc.GrpcCall) -> None:
        call.finish(StatusCode.OK)

    def on_closed(self, call: kgrpc.GrpcCall, error_code: int) -> None:
        self.closed.append(error_code)


def test_callback_service_with_grpcio_client(
    run: RunFn, transport_kind: str, sock_dir: str, certs: Certs
) -> None:
    service = CallbackEcho()

    async def main() -> None:
        if transport_kind == "uds":
            path = os.path.join(sock_dir, "cb.sock")
            server = await kgrpc.serve(service, path=path)
            ep = Endpoint(uds=path)
        else:
            ctx = tls.server_context(certs.server_cert, certs.server_key, certs.ca)
            server = await kgrpc.serve(service, host="127.0.0.1", port=0, ssl=ctx)
            ep = Endpoint(port=server.sockets[0].getsockname()[1], certs=certs)
        try:
            async with grpcio_channel(ep) as channel:
                call = stub(channel)()
                assert dict(await call.initial_metadata())["serverid"] == "callback"
                for size in SIZES:
                    payload = os.urandom(size)
                    await call.write(payload)
                    assert await call.read() == payload, size
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
                cancelled = stub(channel)()
                await cancelled.write(b"x")
                assert await cancelled.read() == b"x"
                cancelled.cancel()
                for _ in range(200):
                    if len(service.closed) == 2:
                        break
                    await asyncio.sleep(0.01)
        finally:
            server.close()
            await server.wait_closed()
        assert service.closed == [0, 8]

    run(main())
