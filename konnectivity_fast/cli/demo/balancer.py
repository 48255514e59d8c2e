"""The local demo's load balancer, standing in for the one in front of proxy-server
replicas (HAProxy, a cloud LB): a TCP proxy choosing a backend per connection in round
robin, run as its own process, ``python -m konnectivity_fast.cli.demo.balancer``.

Agents know one address for every proxy-server replica; each connection through it may
land on another replica, and an agent keeps connecting until it holds one connection to
each (``serverid``/``servercount``). This is that address. It does not touch TLS: the
agents' mTLS goes through it unchanged.

One thread per direction per connection with blocking sockets (the demo has a handful of
long-lived connections, and the GIL is released while waiting and copying in the kernel).
A backend that refuses the connection is skipped for the next one in the rotation.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import socket
import sys
import threading
import time
from collections.abc import Sequence

# Bytes copied per recv: large reads keep the per-byte cost low on a bulk transfer.
COPY_BUFFER = 256 << 10
# Seconds to wait for a backend to accept before trying the next one.
CONNECT_TIMEOUT = 2.0


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then half-close the other side (TLS close_notify goes through)."""
    buf = bytearray(COPY_BUFFER)
    view = memoryview(buf)
    try:
        while n := src.recv_into(buf):
            dst.sendall(view[:n])
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class Balancer:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self._next = itertools.cycle(range(len(backends)))
        self._lock = threading.Lock()

    def _connect(self) -> socket.socket | None:
        for _ in self.backends:
            with self._lock:
                backend = self.backends[next(self._next)]
            try:
                return socket.create_connection(backend, timeout=CONNECT_TIMEOUT)
            except OSError:
                continue
        return None

    def relay(self, client: socket.socket) -> None:
        with client:
            upstream = self._connect()
            if upstream is None:
                return
            with upstream:
                upstream.settimeout(None)
                # Both legs: tunnels carry small frames that must not wait for an ACK.
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                back = threading.Thread(target=_pipe, args=(upstream, client), daemon=True)
                back.start()
                _pipe(client, upstream)
                back.join()

    def serve(self, listen: tuple[str, int], ttl: float) -> None:
        with socket.create_server(listen, reuse_port=False) as server:
            print(f"balancer on {listen[0]}:{listen[1]} -> {self.backends}", flush=True)
            deadline = time.monotonic() + ttl if ttl > 0 else None
            server.settimeout(1.0)
            while deadline is None or time.monotonic() < deadline:
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=self.relay, args=(client,), daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--backend", action="append", required=True, help="HOST:PORT (repeat)")
    parser.add_argument("--ttl", type=float, default=0.0, help="seconds to live (0: forever)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        Balancer([_address(b) for b in args.backend]).serve(_address(args.listen), args.ttl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
