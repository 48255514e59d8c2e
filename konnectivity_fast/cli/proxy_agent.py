"""``proxy-agent``: upstream's command line in front of ``agent.app.run``.

As upstream's cobra command does: a flag error prints ``Error: <pflag's message>`` and the
usage to stderr and exits 1; ``-h``/``--help`` prints the help and exits 0; a validation
error is logged as ``failed to validate agent options with <err>`` and exits 1. The first
SIGTERM or SIGINT starts the drain (DRAIN to every server, no new connections); the second
stops the agent, which exits 0 (upstream-agent-client.md §4.8).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from konnectivity_fast.agent.app import run
from konnectivity_fast.cli.agent_options import (
    PROGRAM,
    GrpcProxyAgentOptions,
    build_flagset,
    parse_args,
    usage,
)
from konnectivity_fast.cli.flags import FlagError
from konnectivity_fast.cli.klog import setup_logging

__all__ = ["main"]

log = logging.getLogger("konnectivity_fast.agent")


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


async def _serve(options: GrpcProxyAgentOptions) -> int:
    loop = asyncio.get_running_loop()
    drain, stop = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if drain.is_set():
            log.info("received signal %d again, stopping", signum)
            stop.set()
            return
        log.info("received signal %d, draining", signum)
        drain.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        return await run(options, stop, drain)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``proxy-agent`` program; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = parse_args(args, warn=_warn)
    except FlagError as exc:
        # cobra: the error, then the command's usage (without its description).
        print(f"Error: {exc}", file=sys.stderr)
        print(
            f"Usage:\n  {PROGRAM} [flags]\n\nFlags:\n{build_flagset().flag_usages()}",
            file=sys.stderr,
        )
        return 1
    if command.help_requested:
        sys.stdout.write(usage())
        return 0
    setup_logging(command.klog, program=PROGRAM)
    options = command.options
    options.log_values()
    error = options.validate()
    if error is not None:
        log.error("failed to validate agent options with %s", error)
        return 1

    import uvloop

    return int(uvloop.run(_serve(options)))


if __name__ == "__main__":
    sys.exit(main())
