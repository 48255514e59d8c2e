"""``proxy-server``: upstream's command line in front of ``server.app.run``.

As upstream's cobra command and main do, every error (a flag error, a validation error as
``failed to validate server options with <err>``, a start-up failure) prints
``Error: <err>`` and the usage to stderr, logs ``error: <err>`` and exits 1;
``-h``/``--help`` prints the help and exits 0. The first SIGTERM or SIGINT starts
shutdown, a second one exits 1 at once.

With ``--workers`` above 1 the process supervises that many workers
(``server.workers.Supervisor``), each this same command line with its part in the
environment (``server.workers.WorkerSpec``): a worker runs as one proxy-server with its
own ID, count and private health and admin ports, on the sockets the supervisor bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

from konnectivity_fast.cli.command import Program, run_program
from konnectivity_fast.cli.extensions import offered_server_extensions
from konnectivity_fast.cli.node_to_cp import node_to_cp_config
from konnectivity_fast.cli.server_options import (
    PROGRAM,
    ProxyRunOptions,
    build_flagset,
    parse_args,
    usage,
)
from konnectivity_fast.server.app import StartupError, run
from konnectivity_fast.server.workers import (
    LOOPBACK,
    Supervisor,
    WorkerSpec,
    adopt_worker_sockets,
    watch_lifeline,
    worker_command,
    worker_spec,
)
from konnectivity_fast.wire.contract import DialBalance, ExtensionSet

__all__ = ["main"]

log = logging.getLogger("konnectivity_fast.server")


async def _serve(
    options: ProxyRunOptions,
    extensions: ExtensionSet | None = None,
    argv: Sequence[str] = (),
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    spec = worker_spec()
    if spec is not None:
        options = _as_worker(options, spec)
        watch_lifeline(spec, _supervisor_gone)

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.error("received signal %d again, exiting", signum)
            logging.shutdown()
            os._exit(1)
        log.info("received signal %d, shutting down", signum)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        if options.workers > 1:
            return await Supervisor(options, worker_command(argv)).run(stop)
        offered = offered_server_extensions(options) if extensions is None else extensions
        balance = DialBalance(options.dial_balance)
        return await run(
            options,
            stop,
            extensions=offered,
            dial_balance=balance,
            node_to_cp=node_to_cp_config(options),
        )
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _as_worker(options: ProxyRunOptions, spec: WorkerSpec) -> ProxyRunOptions:
    """A worker's options: its ID, count and private ports; the shared sockets adopted
    (the supervisor made the socket file: a worker never removes it)."""
    adopt_worker_sockets(spec)
    return dataclasses.replace(
        options,
        workers=1,
        server_id=spec.server_id,
        server_count=spec.server_count,
        admin_bind_address=LOOPBACK,
        admin_port=spec.admin_port,
        health_bind_address=LOOPBACK,
        health_port=spec.health_port,
        delete_uds_file=False,
    )


def _supervisor_gone() -> None:
    # As a second signal does: the supervisor exits without waiting only when told twice
    # or killed, and no one would be left to stop this worker.
    log.error("the supervisor of this worker is gone, exiting")
    logging.shutdown()
    os._exit(1)


PROXY_SERVER = Program(
    name=PROGRAM,
    parse=parse_args,
    flagset=build_flagset,
    usage=usage,
    what="server",
    serve=_serve,
    startup_errors=(StartupError,),
)


def main(argv: Sequence[str] | None = None, *, extensions: ExtensionSet | None = None) -> int:
    """The ``proxy-server`` program; returns the exit code. ``extensions``: what the server
    offers agents and frontends (``wire.contract``); None: what its flags enable
    (``cli/extensions.py``). A program embedding the server (or a test) may pass its own
    set, a test token included."""
    args = list(sys.argv[1:] if argv is None else argv)
    program = dataclasses.replace(
        PROXY_SERVER, serve=functools.partial(_serve, extensions=extensions, argv=args)
    )
    return run_program(program, args)


if __name__ == "__main__":
    sys.exit(main())
