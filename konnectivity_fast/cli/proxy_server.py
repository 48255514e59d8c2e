"""``proxy-server``: upstream's command line in front of ``server.app.run``.

As upstream's cobra command and main do, every error (a flag error, a validation error as
``failed to validate server options with <err>``, a start-up failure) prints
``Error: <err>`` and the usage to stderr, logs ``error: <err>`` and exits 1;
``-h``/``--help`` prints the help and exits 0. The first SIGTERM or SIGINT starts
shutdown, a second one exits 1 at once.

Beyond upstream, ``$KONNECTIVITY_FAST_DIAL_BALANCE`` chooses how a dial picks among its
strategy's candidate agents (``DIAL_BALANCE_ENV`` says why it is not a flag).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from konnectivity_fast.cli.command import Program, run_program
from konnectivity_fast.cli.server_options import (
    PROGRAM,
    ProxyRunOptions,
    build_flagset,
    parse_args,
    usage,
)
from konnectivity_fast.server.app import StartupError, run
from konnectivity_fast.wire.contract import IMPLEMENTED_EXTENSIONS, DialBalance, ExtensionSet

__all__ = ["DIAL_BALANCE_ENV", "dial_balance", "main"]

log = logging.getLogger("konnectivity_fast.server")

#: Ours: ``random`` (upstream's choice, the default) or ``least-tunnels``
#: (``wire.contract.DialBalance``). An environment variable, not a flag nor a
#: ``--proxy-strategies`` value: upstream's proxy-server refuses an unknown flag or strategy
#: name at start-up but ignores an unknown variable, so one manifest runs either binary
#: (going back to upstream's image only loses the balancing), and our flag surface stays
#: exactly upstream's (``tests/compat/test_flags.py``).
DIAL_BALANCE_ENV = "KONNECTIVITY_FAST_DIAL_BALANCE"


def dial_balance(environ: Mapping[str, str]) -> DialBalance:
    """The dial balancing ``environ`` asks for; unset or empty is upstream's. A value we
    do not know is a start-up error: a typo must not silently keep random dials."""
    value = environ.get(DIAL_BALANCE_ENV, "")
    if not value:
        return DialBalance.RANDOM
    try:
        return DialBalance(value)
    except ValueError:
        names = ", ".join(DialBalance)
        raise StartupError(f"{DIAL_BALANCE_ENV}={value!r} is not one of: {names}") from None


async def _serve(
    options: ProxyRunOptions, extensions: ExtensionSet = IMPLEMENTED_EXTENSIONS
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

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
        balance = dial_balance(os.environ)
        return await run(options, stop, extensions=extensions, dial_balance=balance)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


PROXY_SERVER = Program(
    name=PROGRAM,
    parse=parse_args,
    flagset=build_flagset,
    usage=usage,
    what="server",
    serve=_serve,
    startup_errors=(StartupError,),
)


def main(
    argv: Sequence[str] | None = None, *, extensions: ExtensionSet = IMPLEMENTED_EXTENSIONS
) -> int:
    """The ``proxy-server`` program; returns the exit code. ``extensions``: what the server
    offers agents and frontends (``wire.contract``); not a flag, as upstream has none: a
    program embedding the server (or a test) may offer less, or a token of its own."""
    program = dataclasses.replace(
        PROXY_SERVER, serve=functools.partial(_serve, extensions=extensions)
    )
    return run_program(program, argv)


if __name__ == "__main__":
    sys.exit(main())
