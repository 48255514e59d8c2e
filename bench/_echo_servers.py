"""The two echo servers of the benchmark, one per process, both on uvloop over a Unix socket.

``python -m bench._echo_servers ours|grpcio --path SOCK`` listens, prints ``READY <pid>``
and serves until SIGTERM (or until its parent dies: see ``_echo_proc``).

- ``ours``: ``konnectivity_fast.transport.grpc.serve``; the handler echoes each message as
  it is received (``send`` then ``drain``, the idiom a real service uses).
- ``grpcio``: ``grpc.aio.server`` with a generic bidi handler and no (de)serializers, so
  messages are raw bytes and protobuf plays no part. ``--grpcio-style`` picks the async
  generator handler (``gen``, the default and the idiomatic one) or explicit
  ``context.read()``/``context.write()`` (``rw``).

Both serve ``PATH``; any other method is UNIMPLEMENTED.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import uvloop

SERVICE = "bench.Echo"
METHOD = "Echo"
PATH = f"/{SERVICE}/{METHOD}"
# Messages up to this size are accepted by both servers (the benchmark sends at most 32 KiB).
MAX_MESSAGE = 4 << 20


async def _wait_for_term() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _ready() -> None:
    sys.stdout.write(f"READY {os.getpid()}\n")
    sys.stdout.flush()


async def serve_ours(path: str, style: str) -> None:
    from konnectivity_fast.transport import grpc as kgrpc
    from konnectivity_fast.wire.errors import StatusCode

    async def echo(call: kgrpc.GrpcCall) -> None:
        if call.path != PATH:
            raise kgrpc.GrpcError(StatusCode.UNIMPLEMENTED, f"unknown method {call.path}")
        while (msg := await call.recv()) is not None:
            call.send(msg)
            await call.drain()

    class CallbackEcho:
        """The callback style (no task per call) that the proxy's frontends use."""

        def open_call(self, call: kgrpc.GrpcCall) -> CallbackEcho:
            if call.path != PATH:
                call.finish(StatusCode.UNIMPLEMENTED, f"unknown method {call.path}")
            return self

        def on_message(self, call: kgrpc.GrpcCall, message: bytes) -> None:
            call.send(message)

        def on_end(self, call: kgrpc.GrpcCall) -> None:
            call.finish(StatusCode.OK)

        def on_closed(self, call: kgrpc.GrpcCall, error_code: int) -> None:
            pass

    handler: kgrpc.Handler = CallbackEcho() if style == "callback" else echo
    server = await kgrpc.serve(handler, path=path)
    _ready()
    try:
        await _wait_for_term()
    finally:
        server.close()
        await server.wait_closed(timeout=1.0)


async def serve_grpcio(path: str, style: str) -> None:
    import grpc  # type: ignore[import-untyped, unused-ignore]
    import grpc.aio  # type: ignore[import-untyped, unused-ignore]

    async def echo_gen(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for msg in requests:
            yield msg

    async def echo_rw(requests: Any, context: Any) -> None:
        while (msg := await context.read()) is not grpc.aio.EOF:
            await context.write(msg)

    behaviour = echo_gen if style == "gen" else echo_rw
    handler = grpc.stream_stream_rpc_method_handler(behaviour)  # no (de)serializers: bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),)
    )
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    _ready()
    try:
        await _wait_for_term()
    finally:
        await server.stop(grace=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["ours", "grpcio"])
    parser.add_argument("--path", required=True, help="Unix socket to listen on")
    parser.add_argument("--grpcio-style", choices=["gen", "rw"], default="gen")
    parser.add_argument("--ours-style", choices=["callback", "task"], default="callback")
    args = parser.parse_args(argv)
    if args.kind == "ours":
        uvloop.run(serve_ours(args.path, args.ours_style))
    else:
        uvloop.run(serve_grpcio(args.path, args.grpcio_style))


if __name__ == "__main__":
    main()
