"""``--workers=N``: one proxy-server host using N cores, as N logical servers.

A proxy-server's work is one event loop; a cluster's agents reconnecting at once after a
control-plane restart (every one a TLS handshake) and many tunnel set-ups are CPU work it
cannot spread. With ``--workers=N`` the process becomes a supervisor (``Supervisor``) that

1. binds the frontend socket (``--uds-name`` or ``--server-port``) and the agent port once,
   with upstream's start-up errors, and a private loopback health and admin port per worker;
2. starts N worker processes (the same command line, told their part in ``WORKER_ENV``:
   ``WorkerSpec``); each adopts the shared sockets (``transport.accept.adopt_sockets``) and
   runs as a whole proxy-server with its own server ID, ``<server-id>-<i>``, and a server
   count of ``--server-count`` x N. The kernel hands each new connection to one of the
   workers waiting on the socket, so handshakes and dials spread over the cores; agents
   connect again until they hold one connection per server ID, as they do with replicas
   behind a load balancer, so every worker holds every agent and any worker can serve any
   frontend connection;
3. serves the health and admin ports itself, for all workers together
   (``server.worker_view``);
4. restarts a worker that exits while it runs (after ``RESTART_DELAY_FIRST``, doubling up
   to ``RESTART_DELAY_MAX`` while it keeps failing); a worker that fails while starting
   fails the whole start (its own ``Error:`` is already printed), as one server would;
5. on stop, stops its ports, sends every worker SIGTERM (each shuts down as one
   proxy-server does) and exits once all have: 0 when every worker exited 0.

Each worker holds the read end of a pipe (``WorkerSpec.lifeline``) whose write end only the
supervisor holds: when the supervisor is gone (killed, or a second signal made it exit at
once), the workers exit at once too instead of serving on without it.

Invariants: the shared sockets are bound once, by the supervisor, which never accepts on
them; a worker's server ID and ports stay the same across its restarts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from konnectivity_fast.server.app import UDS_UMASK, RunOptions
from konnectivity_fast.server.health import start_http
from konnectivity_fast.server.startup import (
    StartupError,
    check_tls_files,
    tcp_listen_failure,
    unix_listen_failure,
)
from konnectivity_fast.server.worker_view import (
    WorkerAnswer,
    fetch,
    supervisor_admin_routes,
    supervisor_health_routes,
)
from konnectivity_fast.transport.accept import (
    Listener,
    SocketKey,
    adopt_sockets,
    bind_tcp,
    bind_unix,
)
from konnectivity_fast.transport.grpc import listen_backlog

__all__ = [
    "LOOPBACK",
    "MAX_WORKERS",
    "WORKER_ENV",
    "Supervisor",
    "SupervisorOptions",
    "WorkerSpec",
    "adopt_worker_sockets",
    "watch_lifeline",
    "worker_command",
    "worker_spec",
]

log = logging.getLogger(__name__)

#: The environment variable that tells a process it is worker ``WorkerSpec``.
WORKER_ENV = "KONNECTIVITY_FAST_WORKER"
#: The most workers: more processes than a large host's cores only add memory (each
#: worker holds every agent) and connections per agent.
MAX_WORKERS = 64
#: A worker that exits while serving is started again after this long, twice as long
#: each time it fails again within ``RESTART_RESET_AFTER``, up to ``RESTART_DELAY_MAX``: a
#: worker that cannot run (a certificate gone) must not spin the host.
RESTART_DELAY_FIRST = 1.0
RESTART_DELAY_MAX = 30.0
RESTART_RESET_AFTER = 60.0
#: How long a starting worker may take to answer its health port: it loads certificates
#: and may build a Kubernetes client; a worker silent this long is stuck.
START_TIMEOUT = 120.0
#: Pause between two looks at a starting worker's health port.
START_POLL = 0.05
#: Where each worker's private health and admin ports listen.
LOOPBACK = "127.0.0.1"
# The private ports' backlog until the worker listens on them with its own.
_PRIVATE_BACKLOG = 64


class SupervisorOptions(RunOptions, Protocol):
    """The server's options (``server.app.RunOptions``) and ``--workers``."""

    workers: int


@dataclass(frozen=True)
class WorkerSpec:
    """A worker's part, passed in ``WORKER_ENV``: its index, server ID and count, its
    private ports, the shared sockets' descriptors by address, and the lifeline."""

    index: int
    server_id: str
    server_count: int
    admin_port: int
    health_port: int
    sockets: tuple[tuple[SocketKey, tuple[int, ...]], ...]
    lifeline: int

    def encode(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "server_id": self.server_id,
                "server_count": self.server_count,
                "admin_port": self.admin_port,
                "health_port": self.health_port,
                "sockets": [[list(key), list(fds)] for key, fds in self.sockets],
                "lifeline": self.lifeline,
            }
        )

    @classmethod
    def decode(cls, text: str) -> WorkerSpec:
        """Raises ``ValueError`` for anything the supervisor did not write."""
        try:
            raw = json.loads(text)
            sockets = tuple(
                ((str(k[0]), str(k[1]), int(k[2])), tuple(int(fd) for fd in fds))
                for k, fds in raw["sockets"]
            )
            return cls(
                int(raw["index"]),
                str(raw["server_id"]),
                int(raw["server_count"]),
                int(raw["admin_port"]),
                int(raw["health_port"]),
                sockets,
                int(raw["lifeline"]),
            )
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise ValueError(f"invalid {WORKER_ENV}: {exc!r}") from None


def worker_spec(environ: Mapping[str, str] | None = None) -> WorkerSpec | None:
    """This process's part when a supervisor started it, else None."""
    text = (os.environ if environ is None else environ).get(WORKER_ENV)
    return None if text is None else WorkerSpec.decode(text)


def adopt_worker_sockets(spec: WorkerSpec) -> None:
    """Hand the shared sockets to the listeners that will ask for their addresses."""
    for key, fds in spec.sockets:
        adopt_sockets(key, [socket.socket(fileno=fd) for fd in fds])


def watch_lifeline(spec: WorkerSpec, on_gone: Callable[[], None]) -> None:
    """Call ``on_gone`` when the supervisor is gone (the lifeline reads end of file)."""
    loop = asyncio.get_running_loop()
    os.set_blocking(spec.lifeline, False)

    def readable() -> None:
        try:
            if os.read(spec.lifeline, 1) != b"":
                return
        except BlockingIOError:
            return
        loop.remove_reader(spec.lifeline)
        on_gone()

    loop.add_reader(spec.lifeline, readable)


def _bind_shared(options: SupervisorOptions) -> list[tuple[SocketKey, list[socket.socket]]]:
    """The frontend socket and the agent port, bound once, with the messages a single
    server gives (``server.app``)."""
    backlog = listen_backlog()
    shared: list[tuple[SocketKey, list[socket.socket]]] = []
    try:
        try:
            if options.uds_name:
                path = options.uds_name
                if options.delete_uds_file and os.path.lexists(path):
                    os.unlink(path)
                old = os.umask(UDS_UMASK)
                try:
                    sock = bind_unix(path, backlog=backlog)
                except OSError as exc:
                    raise unix_listen_failure(path, exc) from None
                finally:
                    os.umask(old)
                shared.append((("unix", path, 0), [sock]))
            else:
                check_tls_files(options.server_cert, options.server_key, options.server_ca_cert)
                host, port = options.server_bind_address, options.server_port
                shared.append((("tcp", host, port), _bind(host, port, backlog)))
        except ValueError as exc:
            raise StartupError(f"failed to run the frontend server: {exc}") from None
        try:
            check_tls_files(options.cluster_cert, options.cluster_key, options.cluster_ca_cert)
            host, port = options.agent_bind_address, options.agent_port
            shared.append((("tcp", host, port), _bind(host, port, backlog)))
        except ValueError as exc:
            raise StartupError(f"failed to run the agent server: {exc}") from None
    except BaseException:
        for _, sockets in shared:
            for sock in sockets:
                sock.close()
        raise
    return shared


def _bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    try:
        return bind_tcp(host or None, port, backlog=backlog)
    except OSError as exc:
        raise tcp_listen_failure(host, port, exc) from None


def _private_port() -> socket.socket:
    (sock,) = bind_tcp(LOOPBACK, 0, backlog=_PRIVATE_BACKLOG)
    return sock


@dataclass
class _Worker:
    index: int
    server_id: str
    admin: socket.socket
    health: socket.socket
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    delay: float = RESTART_DELAY_FIRST
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def admin_port(self) -> int:
        return int(self.admin.getsockname()[1])

    @property
    def health_port(self) -> int:
        return int(self.health.getsockname()[1])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """The ``--workers`` process: binds, starts and watches the workers, serves the health
    and admin ports for them (``WorkerView``), and stops them."""

    def __init__(self, options: SupervisorOptions, command: Sequence[str]) -> None:
        self.options = options
        self.command = list(command)
        self.count = options.workers
        self._shared: list[tuple[SocketKey, list[socket.socket]]] = []
        self._workers: list[_Worker] = []
        self._lifeline_read, self._lifeline_write = os.pipe()
        self._stopping = False
        self._http: list[Listener] = []

    # WorkerView

    def running(self) -> list[bool]:
        return [worker.running for worker in self._workers]

    def worker_ids(self) -> list[str]:
        return [worker.server_id for worker in self._workers]

    async def ask(self, port: str, target: str) -> list[WorkerAnswer]:
        ports = [w.admin_port if port == "admin" else w.health_port for w in self._workers]
        return list(await asyncio.gather(*(fetch(p, target) for p in ports)))

    # the process

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set; the exit code. A start-up failure raises
        ``StartupError`` (binding) or returns the failed worker's code."""
        self._shared = _bind_shared(self.options)
        try:
            code = await self._start_all()
            if code != 0:
                return code
            await self._start_http()
            log.info(
                "Proxy server with %d workers ready: %s, agents on port %s",
                self.count,
                ", ".join(self.worker_ids()),
                self.options.agent_port,
            )
            for worker in self._workers:
                worker.task = asyncio.get_running_loop().create_task(self._watch(worker))
            await stop.wait()
            log.info("Shutting down %d workers.", self.count)
            return await self._stop_all()
        finally:
            self._close_sockets()

    async def _start_all(self) -> int:
        base = self.options.server_id
        for index in range(self.count):
            worker = _Worker(index, f"{base}-{index}", _private_port(), _private_port())
            self._workers.append(worker)
            await self._spawn(worker)
        waits = [self._wait_started(worker) for worker in self._workers]
        for code in await asyncio.gather(*waits):
            if code != 0:
                await self._stop_all()
                return code
        return 0

    async def _spawn(self, worker: _Worker) -> None:
        sockets = [(key, tuple(s.fileno() for s in socks)) for key, socks in self._shared]
        private: list[tuple[SocketKey, tuple[int, ...]]] = [
            (("tcp", LOOPBACK, worker.admin_port), (worker.admin.fileno(),)),
            (("tcp", LOOPBACK, worker.health_port), (worker.health.fileno(),)),
        ]
        spec = WorkerSpec(
            worker.index,
            worker.server_id,
            self.options.server_count * self.count,
            worker.admin_port,
            worker.health_port,
            tuple(sockets + private),
            self._lifeline_read,
        )
        fds = [fd for _, fds in spec.sockets for fd in fds] + [self._lifeline_read]
        worker.process = await asyncio.create_subprocess_exec(
            *self.command,
            env={**os.environ, WORKER_ENV: spec.encode()},
            pass_fds=fds,
            stdin=asyncio.subprocess.DEVNULL,
            # Its own session: a signal for the terminal's whole group (Ctrl-C) reaches the
            # supervisor only, which passes one SIGTERM on; a second one would make the
            # worker stop at once, as a second signal does to any proxy-server.
            start_new_session=True,
        )
        worker.started = asyncio.get_running_loop().time()
        log.info(
            "Started worker %d (%s), pid %d.", worker.index, worker.server_id, worker.process.pid
        )

    async def _wait_started(self, worker: _Worker) -> int:
        """0 once the worker answers on its health port; its exit code if it exits first."""
        assert worker.process is not None
        exited = asyncio.ensure_future(worker.process.wait())
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT
        try:
            while asyncio.get_running_loop().time() < deadline:
                status, _ = await fetch(worker.health_port, "/healthz")
                if status == 200:
                    return 0
                done, _ = await asyncio.wait({exited}, timeout=START_POLL)
                if done:
                    return 1  # the worker said why (``Error:``) as it exited
            log.error("worker %d did not start within %ss", worker.index, START_TIMEOUT)
            return 1
        finally:
            exited.cancel()

    async def _watch(self, worker: _Worker) -> None:
        """Restart the worker whenever it exits while the supervisor serves."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping:
                return
            lived = loop.time() - worker.started
            if lived >= RESTART_RESET_AFTER:
                worker.delay = RESTART_DELAY_FIRST
            log.error(
                "worker %d (%s) exited with code %d after %.0fs; starting it again in %.0fs",
                worker.index,
                worker.server_id,
                code,
                lived,
                worker.delay,
            )
            await asyncio.sleep(worker.delay)
            worker.delay = min(worker.delay * 2, RESTART_DELAY_MAX)
            if self._stopping:
                return
            await self._spawn(worker)

    async def _start_http(self) -> None:
        options = self.options
        log.info("Starting admin server for debug connections.")
        admin = await start_http(
            "admin",
            options.admin_bind_address,
            options.admin_port,
            supervisor_admin_routes(self, options.server_id),
        )
        log.info("Starting health server for healthchecks.")
        health = await start_http(
            "health",
            options.health_bind_address,
            options.health_port,
            supervisor_health_routes(self),
        )
        self._http = [server for server in (admin, health) if server is not None]

    async def _stop_all(self) -> int:
        """Health and admin go first, then every worker is told to stop; the exit code."""
        self._stopping = True
        for server in self._http:
            server.close()
        for worker in self._workers:
            if worker.task is not None:
                worker.task.cancel()
            if worker.running:
                assert worker.process is not None
                worker.process.send_signal(signal.SIGTERM)
        codes = [await w.process.wait() for w in self._workers if w.process is not None]
        for server in self._http:
            await server.wait_closed()
        failed = [code for code in codes if code != 0]
        if failed:
            log.error("%d of %d workers exited with an error", len(failed), len(codes))
        return 1 if failed else 0

    def _close_sockets(self) -> None:
        for _, sockets in self._shared:
            for sock in sockets:
                sock.close()
        for worker in self._workers:
            worker.admin.close()
            worker.health.close()
        os.close(self._lifeline_read)
        os.close(self._lifeline_write)


def worker_command(argv: Sequence[str]) -> list[str]:
    """The command that runs a worker: this interpreter, the proxy-server, ``argv``."""
    return [sys.executable, "-m", "konnectivity_fast.server", *argv]
