"""Helpers of the end-to-end test: the processes it starts (each killed at the end whatever
happens), bounded waits, metrics scraped from inside a namespace, and the two frontend
clients that stand in for kube-apiserver in ``cp``:

* HTTP-CONNECT: tests/support/nsclient.py (standard library only), speaking HTTP/1.1 to
  tests/support/backend.py through the tunnel;
* gRPC: goclient (tests/interop/goclient, built by scripts/build-upstream.sh), upstream's
  published konnectivity-client library, against the backend's raw ports (identity, echo).

Both answer the same questions, so the scenario is written once for both modes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .topology import PREFIX, Namespace

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NSCLIENT = ROOT / "tests" / "support" / "nsclient.py"
BACKEND = ROOT / "tests" / "support" / "backend.py"
GOCLIENT = ROOT / ".cache" / "upstream" / "v0.36.0" / "bin" / "goclient"
# The backend's ports in each worker: HTTP, raw echo, raw identity.
HTTP_PORT, ECHO_PORT, IDENT_PORT = 8080, 8081, 8082
# goclient's echo: blocks written then read back (write-then-read: a block must fit the
# tunnel's buffering), as many as make the transfer.
ECHO_BLOCK = 64 * 1024
# Bound on one client operation (per socket operation, and on the whole run).
CLIENT_TIMEOUT = 30.0
# A program still alive this long after SIGKILL is a failure of the test's teardown.
KILL_SECONDS = 10.0
POLL_SECONDS = 0.25


def worker_name(ns: Namespace) -> str:
    return ns.name.removeprefix(PREFIX)


def identity(ns: Namespace) -> str:
    """What the worker's backend answers: its name and the peer it saw (the agent dials
    from the worker itself)."""
    return f"{worker_name(ns)} {ns.address}"


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Processes:
    """Every process the test starts; ``must_live`` names those whose death fails a wait."""

    logs: Path
    procs: list[Proc] = field(default_factory=list)
    must_live: set[str] = field(default_factory=set)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        self.must_live.add(name)
        return proc

    def stop(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        self.must_live.discard(proc.name)
        if proc.alive():
            proc.proc.send_signal(sig)
        proc.proc.wait(timeout=KILL_SECONDS)

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(proc)

    def dump(self) -> str:
        return "\n".join(f"==== {p.name}\n{p.text()[-3000:]}" for p in self.procs)

    def wait_until(self, what: str, bound: float, check: Callable[[], bool]) -> float:
        """Poll ``check`` until true, for at most ``bound`` seconds; returns the time it
        took. A process of ``must_live`` that died fails the wait at once (with every log)."""
        started = time.monotonic()
        while True:
            dead = [p.name for p in self.procs if p.name in self.must_live and not p.alive()]
            if dead:
                pytest.fail(f"{dead} exited while waiting for {what}\n{self.dump()}")
            if check():
                return time.monotonic() - started
            if time.monotonic() - started > bound:
                pytest.fail(f"not within {bound:.0f} s: {what}\n{self.dump()}")
            time.sleep(POLL_SECONDS)


def metric(ns: Namespace, port: int, name: str) -> float | None:
    """Sum of a metric's samples, scraped from inside ``ns`` (None when unreachable)."""
    status, text = ns.http_get(port, "/metrics")
    if status != 200:
        return None
    pattern = rf"^{name}(?:{{[^}}]*}})? (\S+)$"
    values = [float(m.group(1)) for m in re.finditer(pattern, text, re.M)]
    return sum(values) if values else None


@dataclass(frozen=True)
class Outcome:
    """One client operation: did it work, and what it said."""

    ok: bool
    detail: str
    # A refusal by the proxy (failed dial), as opposed to a client timeout or a transfer
    # error.
    refused: bool = False


class Frontend:
    """A frontend client of the proxy-servers, run inside ``cp``."""

    mode = ""

    def __init__(self, cp: Namespace, socks: dict[str, str], workers: list[Namespace]) -> None:
        self.cp = cp
        self.socks = socks
        self.identities = [identity(w) for w in workers]

    def reach(self, server: str, worker: Namespace) -> str:
        """The identity answered by the backend at ``worker``'s address."""
        raise NotImplementedError

    def echo(self, server: str, worker: Namespace, size: int, seed: int) -> Outcome:
        raise NotImplementedError

    def dial(self, server: str, worker: Namespace) -> Outcome:
        """A dial and a short exchange (used where it must fail)."""
        raise NotImplementedError

    def hold(self, server: str, worker: Namespace, bound: float) -> subprocess.Popen[str]:
        """A long-lived tunnel to ``worker`` that ends only when the tunnel does."""
        raise NotImplementedError

    def _run(self, argv: list[str]) -> dict[str, object]:
        proc = self.cp.run(*argv, timeout=CLIENT_TIMEOUT * 3)
        assert proc.stdout, proc.stderr
        return dict(json.loads(proc.stdout.splitlines()[-1]))


class HttpConnectFrontend(Frontend):
    mode = "http-connect"

    def _client(self, server: str, target: str, *args: str) -> list[str]:
        return [
            sys.executable, "-I", str(NSCLIENT), f"--uds={self.socks[server]}",
            f"--target={target}", f"--timeout={CLIENT_TIMEOUT}", *args,
        ]  # fmt: skip

    def reach(self, server: str, worker: Namespace) -> str:
        result = self._run(self._client(server, f"{worker.address}:{HTTP_PORT}", "--op=whoami"))
        return str(result["body"]) if result["ok"] else f"failed: {result}"

    def echo(self, server: str, worker: Namespace, size: int, seed: int) -> Outcome:
        target = f"{worker.address}:{HTTP_PORT}"
        result = self._run(
            self._client(server, target, "--op=echo", f"--size={size}", f"--seed={seed}")
        )
        ok = bool(result["ok"]) and result.get("received") == size and bool(result.get("match"))
        return Outcome(ok, json.dumps(result))

    def dial(self, server: str, worker: Namespace) -> Outcome:
        result = self._run(self._client(server, f"{worker.address}:{HTTP_PORT}", "--op=whoami"))
        refused = "CONNECT refused" in str(result["error"])
        return Outcome(bool(result["ok"]), json.dumps(result), refused)

    def hold(self, server: str, worker: Namespace, bound: float) -> subprocess.Popen[str]:
        argv = self._client(server, f"{worker.address}:{HTTP_PORT}", "--op=hold")
        argv[argv.index(f"--timeout={CLIENT_TIMEOUT}")] = f"--timeout={bound}"
        return subprocess.Popen(self.cp.argv(*argv), stdout=subprocess.PIPE, text=True)


class GrpcFrontend(Frontend):
    mode = "grpc"

    def _client(
        self, server: str, target: str, *args: str, timeout: float = CLIENT_TIMEOUT
    ) -> list[str]:
        return [
            str(GOCLIENT), "-mode=grpc", f"-uds={self.socks[server]}", f"-target={target}",
            f"-timeout={timeout:g}s", *args,
        ]  # fmt: skip

    def reach(self, server: str, worker: Namespace) -> str:
        result = self._run(self._client(server, f"{worker.address}:{IDENT_PORT}", "-io=read"))
        conns = result.get("connections") or [{}]
        assert isinstance(conns, list)
        digest = conns[0].get("received_sha256", "")
        # The identity is the one whose digest arrived (the backend sends only that).
        for text in self.identities:
            if hashlib.sha256(text.encode()).hexdigest() == digest:
                return text
        return f"failed or unknown answer: {result}"

    def echo(self, server: str, worker: Namespace, size: int, seed: int) -> Outcome:
        del seed  # goclient's pattern depends on the connection and round
        rounds = max(1, size // ECHO_BLOCK)
        result = self._run(
            self._client(
                server, f"{worker.address}:{ECHO_PORT}", "-io=echo", f"-size={ECHO_BLOCK}",
                f"-rounds={rounds}",
            )
        )  # fmt: skip
        conns = result.get("connections") or [{}]
        assert isinstance(conns, list)
        ok = bool(result["ok"]) and conns[0].get("received") == rounds * ECHO_BLOCK
        return Outcome(ok and bool(conns[0].get("match")), json.dumps(result))

    def dial(self, server: str, worker: Namespace) -> Outcome:
        result = self._run(self._client(server, f"{worker.address}:{IDENT_PORT}", "-io=read"))
        conns = result.get("connections") or [{}]
        assert isinstance(conns, list)
        # The watchdog's "timeout after" would mean a hung dial, not a refusal.
        refused = not conns[0].get("dialed") and "timeout after" not in str(result)
        return Outcome(bool(result["ok"]), json.dumps(result), refused)

    def hold(self, server: str, worker: Namespace, bound: float) -> subprocess.Popen[str]:
        # The echo port sends nothing: reading until EOF lasts as long as the tunnel.
        argv = self._client(server, f"{worker.address}:{ECHO_PORT}", "-io=read", timeout=bound)
        return subprocess.Popen(self.cp.argv(*argv), stdout=subprocess.PIPE, text=True)
