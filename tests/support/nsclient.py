"""A frontend client of a proxy-server in HTTP-CONNECT mode over its Unix socket, written with
the standard library only (an independent peer: none of konnectivity_fast is imported), so
it runs anywhere a python3 does: inside a network namespace (``ip netns exec cp python3
nsclient.py ...``) or in the test process.

A tunnel is ``CONNECT host:port HTTP/1.1``; after the proxy's ``200`` the socket carries the
backend's bytes. Over it this client speaks HTTP/1.1 to tests/support/backend.py:
``GET /whoami`` and ``POST /echo`` (the body must come back byte for byte).

As a program it does one operation and prints one JSON document on stdout:
``{"ok": bool, "error": str, "status": int, "body": str, "sent": n, "received": n,
"match": bool, "seconds": float}``. Every socket operation has a timeout; exit status 0
means ok.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import threading
import time

# Bound on the proxy's answer to CONNECT: status line and headers.
MAX_CONNECT_RESPONSE = 16 * 1024
# Bound on the backend's response headers.
MAX_HEADERS = 64 * 1024
# Unit of writes and reads of a body: large enough to keep the tunnel busy.
CHUNK = 64 * 1024


class TunnelError(Exception):
    """The proxy refused the CONNECT, or the tunnel ended early."""


def _read_headers(sock: socket.socket, limit: int) -> bytes:
    # One byte at a time: nothing after the blank line may be consumed, since the tunnel's
    # bytes follow the proxy's answer directly.
    data = bytearray()
    while not data.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise TunnelError(f"connection closed after {bytes(data)!r}")
        data += byte
        if len(data) > limit:
            raise TunnelError("response headers too long")
    return bytes(data)


def open_tunnel(uds: str, target: str, timeout: float) -> socket.socket:
    """A socket carrying a tunnel to ``target`` (host:port) through the proxy at ``uds``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(uds)
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = _read_headers(sock, MAX_CONNECT_RESPONSE)
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or parts[1] != "200":
            raise TunnelError(f"CONNECT refused: {status_line!r}")
    except BaseException:
        sock.close()
        raise
    return sock


def request(sock: socket.socket, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 exchange over a tunnel. The body is written by a thread while the
    response is read (the backend echoes as it receives: neither side may wait for the
    other). The socket's timeout bounds every read and write."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: backend\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    sock.sendall(head)
    write_errors: list[OSError] = []

    def write() -> None:
        # Not even an empty send: sendall(b"") still calls send(), which fails with EPIPE
        # once the backend answered and the tunnel closed.
        if not body:
            return
        try:
            sock.sendall(body)
        except OSError as exc:
            write_errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    received = bytearray()
    head_end = -1
    while head_end < 0:
        chunk = sock.recv(CHUNK)
        if not chunk:
            raise TunnelError(f"connection closed in the response headers: {bytes(received)!r}")
        received += chunk
        head_end = received.find(b"\r\n\r\n")
        if head_end < 0 and len(received) > MAX_HEADERS:
            raise TunnelError("response headers too long")
    lines = bytes(received[:head_end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    payload = received[head_end + 4 :]
    while length is None or len(payload) < length:
        chunk = sock.recv(CHUNK)
        if not chunk:
            if length is None:
                break
            raise TunnelError(f"connection closed after {len(payload)} of {length} body bytes")
        payload += chunk
    writer.join(sock.gettimeout())
    if write_errors:
        raise write_errors[0]
    return status, bytes(payload)


def run(args: argparse.Namespace) -> dict[str, object]:
    started = time.monotonic()
    result: dict[str, object] = {"ok": False, "error": "", "status": 0, "body": ""}
    body = b""
    if args.op == "echo":
        body = random.Random(args.seed).randbytes(args.size)
    try:
        result["phase"] = "connect"
        sock = open_tunnel(args.uds, args.target, args.timeout)
        result["phase"] = "exchange"
        try:
            if args.op == "whoami":
                status, got = request(sock, "GET", "/whoami")
                result.update(status=status, body=got.decode(errors="replace"), ok=status == 200)
            elif args.op == "echo":
                status, got = request(sock, "POST", "/echo", body)
                match = got == body
                result.update(
                    status=status,
                    sent=len(body),
                    received=len(got),
                    match=match,
                    sha256=hashlib.sha256(got).hexdigest(),
                    ok=status == 200 and match,
                )
            else:  # hold: the backend answers its headers, then nothing until the tunnel ends
                sock.sendall(b"GET /hold HTTP/1.1\r\nHost: backend\r\n\r\n")
                head = _read_headers(sock, MAX_HEADERS)
                print(json.dumps({"held": head.split(b"\r\n", 1)[0].decode()}), flush=True)
                try:
                    rest = sock.recv(CHUNK)
                    result.update(error="tunnel ended" if not rest else "unexpected data")
                except OSError as exc:
                    result.update(error=f"tunnel failed: {exc!r}")
        finally:
            sock.close()
    except (OSError, TunnelError, ValueError) as exc:
        result["error"] = repr(exc)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uds", required=True)
    parser.add_argument("--target", required=True, help="host:port of the backend")
    parser.add_argument("--op", choices=["whoami", "echo", "hold"], default="whoami")
    parser.add_argument("--size", type=int, default=1 << 20, help="echo: body bytes")
    parser.add_argument("--seed", type=int, default=1, help="echo: body seed")
    parser.add_argument("--timeout", type=float, default=30.0, help="per socket operation")
    result = run(parser.parse_args(argv))
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
