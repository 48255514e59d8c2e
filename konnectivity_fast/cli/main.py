"""``konnectivity-fast``: tools that upstream's binaries lack.

``konnectivity-fast demo``  runs a gRPC ``/ProxyService/Proxy`` exchange over a Unix socket
                            through our HTTP/2 engine, printing each Packet, then measures
                            DATA echo throughput for a few seconds.
``konnectivity-fast version`` prints the version, the codec in use and the compiled core's
                            source digest.
``konnectivity-fast tunnels`` shows a proxy-server's or proxy-agent's open tunnels, read
                            from its admin port (``cli/tunnels.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from konnectivity_fast import IMPLEMENTATION, __version__
from konnectivity_fast.cli import tunnels
from konnectivity_fast.transport import grpc as kgrpc
from konnectivity_fast.wire import (
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Packet,
    PacketType,
)
from konnectivity_fast.wire.codec import decode_packet, encode_packet, peek_data
from konnectivity_fast.wire.contract import (
    IMPLEMENTED_EXTENSIONS,
    PROXY_PATH,
    capabilities_metadata,
)

# The demo's throughput phase: bounded in time and in bytes in flight.
DEMO_SECONDS = 3.0
DEMO_PAYLOAD = 32 * 1024
DEMO_WINDOW = 64  # messages in flight


async def _demo_server(call: kgrpc.GrpcCall) -> None:
    """A toy proxy: accepts any dial as connectID 1, echoes DATA, answers CLOSE_REQ."""
    while (msg := await call.recv()) is not None:
        view = peek_data(msg)
        if view is not None:
            call.send(msg)  # DATA: forward the received bytes unchanged
            continue
        pkt = decode_packet(msg)
        if pkt.type == PacketType.DIAL_REQ and isinstance(pkt.payload, DialRequest):
            reply = Packet(
                PacketType.DIAL_RSP, DialResponse(connect_id=1, random=pkt.payload.random)
            )
        elif pkt.type == PacketType.CLOSE_REQ and isinstance(pkt.payload, CloseRequest):
            reply = Packet(PacketType.CLOSE_RSP, CloseResponse(connect_id=pkt.payload.connect_id))
        else:
            continue
        call.send(encode_packet(reply))


def _show(pkt: Packet) -> str:
    name = PacketType(pkt.type).name if pkt.type in PacketType._value2member_map_ else pkt.type
    return f"{name} {pkt.payload}"


async def _demo() -> None:
    with tempfile.TemporaryDirectory(prefix="kf-demo-") as d:
        path = os.path.join(d, "proxy.sock")
        server = await kgrpc.serve(_demo_server, path=path)
        proto = await kgrpc.connect(path=path)
        # A frontend client advertises the extensions it offers, as every client of ours
        # does (the demo's toy server answers none of them).
        call = proto.start_call(PROXY_PATH, capabilities_metadata(IMPLEMENTED_EXTENSIONS))
        script = [
            Packet(PacketType.DIAL_REQ, DialRequest("tcp", "10.0.0.1:10250", 42)),
            Packet(PacketType.DATA, Data(1, data=b"GET /healthz HTTP/1.1\r\n\r\n")),
            Packet(PacketType.CLOSE_REQ, CloseRequest(1)),
        ]
        print(f"konnectivity-fast {__version__} ({IMPLEMENTATION} codec), gRPC over {path}")
        for pkt in script:
            wire = encode_packet(pkt)
            call.send(wire)
            print(f"  -> {_show(pkt)}  [{len(wire)} bytes: {wire[:24].hex(' ')}]")
            reply = await call.recv()
            assert reply is not None
            print(f"  <- {_show(decode_packet(reply))}")
        await _throughput(call)
        call.done_writing()
        await call.wait_status()
        await proto.aclose()
        server.close()
        await server.wait_closed()


async def _throughput(call: kgrpc.GrpcCall) -> None:
    payload = os.urandom(DEMO_PAYLOAD)
    msg = encode_packet(Packet(PacketType.DATA, Data(1, data=payload)))
    sent = received = 0
    start = time.perf_counter()
    deadline = start + DEMO_SECONDS
    cpu0 = time.process_time()
    while time.perf_counter() < deadline:
        while sent - received < DEMO_WINDOW:
            call.send(msg)
            sent += 1
        echoed = await call.recv()
        if echoed != msg:
            raise SystemExit("demo: echoed DATA differs from what was sent")
        received += 1
    while received < sent:
        await call.recv()
        received += 1
    secs = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    mb = received * len(msg) / secs / 1e6
    print(
        f"DATA echo, {DEMO_PAYLOAD // 1024} KiB packets, client and server in one process: "
        f"{received / secs:,.0f} packets/s, {mb:,.0f} MB/s each way, "
        f"{cpu / received * 1e6:.1f} µs CPU per round trip"
    )


def _version() -> None:
    from konnectivity_fast._compiled import require_compiled

    require_compiled()
    from konnectivity_fast._wire import SOURCE_DIGEST

    print(f"konnectivity-fast {__version__}")
    print(f"codec: {IMPLEMENTATION}; compiled core sources {SOURCE_DIGEST}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="konnectivity-fast",
        description="Tools beside the proxy-server and proxy-agent drop-ins.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a Proxy-service exchange and a DATA echo measurement")
    sub.add_parser("version", help="version, codec and build information")
    tunnels.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "tunnels":
        return tunnels.main(args)
    if args.command == "version":
        _version()
        return 0
    import uvloop

    uvloop.run(_demo())
    return 0


if __name__ == "__main__":
    sys.exit(main())
