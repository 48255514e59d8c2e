"""A small HTTPS "kubelet" for the Kubernetes end-to-end tests, run as a program inside
the worker network namespace, so kube-apiserver reaches it only through the tunnel.

Paths:
- ``GET /healthz``: ``ok``; ``GET /hello``: ``payloads.HELLO``; ``GET /address``: the
  address it serves on (which node answered);
- ``GET /big[?size=N]``: ``payloads.big_body(N)`` with a Content-Length;
- ``GET /stream``: chunked; the first line at once, the others once ``GET /release`` came
  (so a reader proves the response streams instead of arriving whole);
- ``POST /validate``: a validating admission webhook (AdmissionReview v1), refusing
  ConfigMaps whose data says ``verdict: deny``;
- ``GET /containerLogs/<ns>/<pod>/<container>``: the stream's lines (``kubectl logs``);
  with ``follow=true``, streamed as ``/stream``;
- ``GET /ws``: a WebSocket upgrade; each message is echoed back with ``echo:`` before it,
  until a close frame.

Usage, from the repository root:
    python -m tests.apiserver_egress.fake_kubelet ADDRESS PORT CERT KEY
"""

from __future__ import annotations

import http.server
import json
import ssl
import sys
import threading
import urllib.parse
from typing import Any

from tests.apiserver_egress import payloads, wsmini

# How long /stream waits for /release before finishing anyway (a test that died must not
# leave the handler thread waiting forever).
RELEASE_WAIT_SECONDS = 60.0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    released = threading.Event()

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"fake-kubelet: {self.command} {self.path} {format % args}\n")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(200, b"ok")
        elif path == "/hello":
            self._send(200, payloads.HELLO)
        elif path == "/address":
            self._send(200, self.server.server_address[0].encode())
        elif path == "/big":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            size = int(query.get("size", [str(payloads.BIG_SIZE)])[0])
            self._send(200, payloads.big_body(size), "application/octet-stream")
        elif path == "/release":
            Handler.released.set()
            self._send(200, b"released")
        elif path == "/stream":
            self._stream()
        elif path == "/ws":
            self._websocket()
        elif path.startswith("/containerLogs/"):
            # kube-apiserver's pods/log: the kubelet's container log endpoint.
            if "follow=true" in self.path:
                self._stream()
            else:
                lines = [payloads.stream_line(i) for i in range(payloads.STREAM_LINES)]
                self._send(200, b"".join(lines))
        else:
            self._send(404, b"not found")

    def _stream(self) -> None:
        Handler.released.clear()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(payloads.STREAM_LINES):
            if i == 1:
                Handler.released.wait(RELEASE_WAIT_SECONDS)
            line = payloads.stream_line(i)
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self._send(400, b"not a websocket upgrade")
            return
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", wsmini.accept_key(key))
        self.end_headers()
        self.wfile.flush()
        while True:
            try:
                opcode, payload = wsmini.read_frame(self.rfile)  # type: ignore[arg-type]
            except EOFError:
                break
            if opcode == wsmini.CLOSE:
                self.wfile.write(wsmini.encode(payload, wsmini.CLOSE))
                break
            self.wfile.write(wsmini.encode(b"echo:" + payload, opcode))
            self.wfile.flush()
        self.close_connection = True

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path.split("?", 1)[0] != "/validate":
            self._send(404, b"not found")
            return
        review = json.loads(body)
        request = review["request"]
        data = (request.get("object") or {}).get("data") or {}
        allowed = data.get(payloads.VERDICT_KEY) != payloads.DENY
        response: dict[str, Any] = {"uid": request["uid"], "allowed": allowed}
        if not allowed:
            response["status"] = {"code": 403, "message": payloads.DENY_MESSAGE}
        answer = {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }
        self._send(200, json.dumps(answer).encode(), "application/json")


def main() -> None:
    address, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    server = http.server.ThreadingHTTPServer((address, port), Handler)
    server.daemon_threads = True
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    sys.stderr.write(f"fake-kubelet: serving on {address}:{port}\n")
    sys.stderr.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
