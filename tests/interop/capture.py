"""Captures the gRPC messages exchanged by konnectivity-client (goclient, v0.36.0) and
upstream's proxy-server on its h2c Unix socket frontend, for tests/data/wire/captured/.

A relay between goclient and upstream's server records the bytes of each direction; the
HTTP/2 frames are split, the DATA payloads of each stream joined, and the result kept as
gRPC-framed message streams: ``NAME.client.grpc`` (client to server) and
``NAME.server.grpc`` (server to client), where NAME is the scenario:

- ``echo``: one tunnel, ECHO_SIZE bytes of goclient's pattern written and echoed back by
  a backend, then closed;
- ``refused``: a dial to a closed port (DIAL_RSP with upstream agent's error text).

Run from the repository root once the upstream programs and goclient are built (their
paths come from tests/support/upstream.py and tests/interop/build.sh):

    .venv/bin/python tests/interop/capture.py tests/data/wire/captured

Upstream's agent serves the dials over mTLS (certificates made with trustme). Random dial
IDs make each capture differ; the tests check structure and round trips, not the IDs.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import trustme

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_BIN = ROOT / ".cache" / "upstream" / "v0.36.0" / "bin"
GOCLIENT = ROOT / ".cache" / "interop" / "bin" / "goclient"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = 9
DATA_FRAME = 0
FLAG_PADDED = 0x8
# Bytes the echo scenario sends (goclient's pattern for connection 0, round 0): small
# enough for one DATA packet each way.
ECHO_SIZE = 32
WAIT_SECONDS = 30.0
CHUNK = 65536


# The programs refuse ephemeral ports (49152 and up) for their listeners.
PORTS = range(20000, 32000)


def free_port() -> int:
    while True:
        port = random.choice(PORTS)
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port


def wait_http(port: int, path: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"127.0.0.1:{port}{path} never answered 200")


class Recorder:
    """A Unix socket relay to ``target`` recording each direction of each connection."""

    def __init__(self, listen: str, target: str) -> None:
        self.target = target
        self.connections: list[tuple[bytearray, bytearray]] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(listen)
        self.server.listen(16)
        self.sockets = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop relaying: the listener and every relayed connection close."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            self.sockets += [client, upstream]
            upstream.connect(self.target)
            record = (bytearray(), bytearray())
            self.connections.append(record)
            for src, dst, buf in ((client, upstream, record[0]), (upstream, client, record[1])):
                threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, buf: bytearray) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(CHUNK):
                buf += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def frames(raw: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """The complete HTTP/2 frames of one direction, after the client preface if it is
    there: (type, flags, stream id, payload with any padding)."""
    if raw.startswith(PREFACE):
        raw = raw[len(PREFACE) :]
    pos = 0
    while pos + FRAME_HEADER <= len(raw):
        length = int.from_bytes(raw[pos : pos + 3], "big")
        ftype, flags = raw[pos + 3], raw[pos + 4]
        stream = struct.unpack(">I", raw[pos + 5 : pos + 9])[0] & 0x7FFFFFFF
        end = pos + FRAME_HEADER + length
        if end > len(raw):
            return  # the rest has not arrived yet
        yield ftype, flags, stream, raw[pos + FRAME_HEADER : end]
        pos = end


def unpad(flags: int, body: bytes) -> bytes:
    """A DATA or HEADERS payload without its padding (RFC 9113 section 6.1)."""
    if flags & FLAG_PADDED:
        return body[1 : len(body) - body[0]]
    return body


def grpc_payload(raw: bytes) -> bytes:
    """The DATA payloads of all streams of one direction, joined per stream in stream
    order (each connection here carries one Proxy stream)."""
    streams: dict[int, bytearray] = {}
    for ftype, flags, stream, body in frames(raw):
        if ftype == DATA_FRAME:
            streams.setdefault(stream, bytearray()).extend(unpad(flags, body))
    return b"".join(bytes(streams[s]) for s in sorted(streams))


def echo_backend() -> int:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(CHUNK):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return int(listener.getsockname()[1])


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="kf-cap-") as tmp:
        ca = trustme.CA()
        server_cert = ca.issue_cert("localhost", "127.0.0.1")
        client_cert = ca.issue_cert("agent")
        paths = {
            "ca": os.path.join(tmp, "ca.pem"),
            "scert": os.path.join(tmp, "s.pem"),
            "skey": os.path.join(tmp, "s.key"),
            "ccert": os.path.join(tmp, "c.pem"),
            "ckey": os.path.join(tmp, "c.key"),
        }
        ca.cert_pem.write_to_path(paths["ca"])
        server_cert.cert_chain_pems[0].write_to_path(paths["scert"])
        server_cert.private_key_pem.write_to_path(paths["skey"])
        client_cert.cert_chain_pems[0].write_to_path(paths["ccert"])
        client_cert.private_key_pem.write_to_path(paths["ckey"])
        uds = os.path.join(tmp, "server.sock")
        relay_uds = os.path.join(tmp, "relay.sock")
        agent_port, health, admin, ahealth, aadmin = (free_port() for _ in range(5))
        log = open(os.path.join(tmp, "programs.log"), "wb")  # noqa: SIM115 (closed below)
        try:
            procs.append(
                subprocess.Popen(
                    [
                        str(UPSTREAM_BIN / "proxy-server"),
                        "--mode=grpc",
                        f"--uds-name={uds}",
                        "--server-port=0",
                        f"--cluster-cert={paths['scert']}",
                        f"--cluster-key={paths['skey']}",
                        f"--cluster-ca-cert={paths['ca']}",
                        "--agent-bind-address=127.0.0.1",
                        f"--agent-port={agent_port}",
                        "--health-bind-address=127.0.0.1",
                        f"--health-port={health}",
                        f"--admin-port={admin}",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            wait_http(health, "/healthz")
            procs.append(
                subprocess.Popen(
                    [
                        str(UPSTREAM_BIN / "proxy-agent"),
                        f"--ca-cert={paths['ca']}",
                        f"--agent-cert={paths['ccert']}",
                        f"--agent-key={paths['ckey']}",
                        "--proxy-server-host=127.0.0.1",
                        f"--proxy-server-port={agent_port}",
                        "--health-server-host=127.0.0.1",
                        f"--health-server-port={ahealth}",
                        f"--admin-server-port={aadmin}",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            wait_http(health, "/readyz")
            recorder = Recorder(relay_uds, uds)
            backend = echo_backend()
            scenarios = {
                "echo": [f"-target=127.0.0.1:{backend}", f"-size={ECHO_SIZE}"],
                "refused": [f"-target=127.0.0.1:{free_port()}"],
            }
            for name, args in scenarios.items():
                before = len(recorder.connections)
                subprocess.run(
                    [str(GOCLIENT), "-mode=grpc", f"-uds={relay_uds}", *args],
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
                time.sleep(1.0)  # the relay's last bytes
                (sent, received) = recorder.connections[before]
                (out / f"{name}.client.grpc").write_bytes(grpc_payload(bytes(sent)))
                (out / f"{name}.server.grpc").write_bytes(grpc_payload(bytes(received)))
                print(f"{name}: {len(sent)} bytes sent, {len(received)} received")
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                # The agent only drains on the first SIGTERM.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                proc.kill()
                proc.wait(timeout=10)
            log.close()
            if not (out / "refused.server.grpc").exists():
                print(Path(log.name).read_text(errors="replace")[-3000:])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "data" / "wire" / "captured")
