"""GET a URL through an HTTP-CONNECT proxy-server listening on a Unix socket, as
kube-apiserver's HTTPConnect egress does: what ``curl -p -x`` does over TCP, which curl
cannot do over a Unix socket.

    python -m konnectivity_fast.cli.demo.through --uds=/path/konnectivity.sock URL

It sends ``CONNECT host:port``, prints the proxy's answer when it is not 200, else sends
the GET through the tunnel and prints the response (head with ``-i``). Exit code 0 for a
2xx response, 1 otherwise. Standard library only.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from urllib.parse import urlsplit

# Bound on connecting and on each read.
TIMEOUT = 10.0


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def fetch(uds: str, url: str, show_head: bool) -> int:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        print(f"through: want http://host:port/path, got {url!r}", file=sys.stderr)
        return 2
    target = f"{parts.hostname}:{parts.port}"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect(uds)
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head, rest = _read_head(sock)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if " 200 " not in f"{status} ":
            while chunk := sock.recv(65536):  # the proxy closes after its answer
                rest += chunk
            print(f"the proxy refused CONNECT {target}: {status}", file=sys.stderr)
            print(rest.decode(errors="replace"), file=sys.stderr)
            return 1
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n".encode())
        body = rest
        while chunk := sock.recv(65536):
            body += chunk
    response_head, _, content = body.partition(b"\r\n\r\n")
    if show_head:
        sys.stdout.write(response_head.decode("latin-1") + "\r\n\r\n")
    sys.stdout.write(content.decode(errors="replace"))
    sys.stdout.write("\n" if content and not content.endswith(b"\n") else "")
    code = response_head.split(b" ", 2)[1:2]
    return 0 if code and code[0].startswith(b"2") else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m konnectivity_fast.cli.demo.through",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--uds", required=True, help="the proxy-server's --uds-name")
    parser.add_argument("-i", action="store_true", help="print the response head too")
    parser.add_argument("url", help="http://host:port/path, as seen from the agents")
    args = parser.parse_args(argv)
    try:
        return fetch(args.uds, args.url, args.i)
    except OSError as exc:
        print(f"through: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
