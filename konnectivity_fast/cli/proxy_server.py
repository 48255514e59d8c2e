"""``proxy-server``: upstream's command line in front of ``server.app.run``.

As upstream's cobra command and main do, every error (a flag error, a validation error as
``failed to validate server options with <err>``, a start-up failure) prints
``Error: <err>`` and the usage to stderr, logs ``error: <err>`` and exits 1;
``-h``/``--help`` prints the help and exits 0. The first SIGTERM or SIGINT starts
shutdown, a second one exits 1 at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from konnectivity_fast.cli.command import report_error
from konnectivity_fast.cli.flags import FlagError
from konnectivity_fast.cli.klog import setup_logging
from konnectivity_fast.cli.server_options import (
    PROGRAM,
    ProxyRunOptions,
    build_flagset,
    parse_args,
    usage,
)
from konnectivity_fast.server.app import StartupError, run

__all__ = ["main"]

log = logging.getLogger("konnectivity_fast.server")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


async def _serve(options: ProxyRunOptions, stop: asyncio.Event) -> int:
    loop = asyncio.get_running_loop()

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
        return await run(options, stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``proxy-server`` program; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse_args(args, warn=_warn)
    except FlagError as exc:
        return report_error(PROGRAM, build_flagset(), str(exc))
    if command.help_requested:
        sys.stdout.write(usage())
        return 0
    setup_logging(command.klog, program=PROGRAM)
    options = command.options
    options.log_values()
    error = options.validate()
    if error is not None:
        return report_error(PROGRAM, build_flagset(),
                            f"failed to validate server options with {error}", command.klog)

    import uvloop

    async def serve() -> int:
        return await _serve(options, asyncio.Event())

    try:
        return uvloop.run(serve())
    except StartupError as exc:
        return report_error(PROGRAM, build_flagset(), str(exc), command.klog)


if __name__ == "__main__":
    sys.exit(main())
