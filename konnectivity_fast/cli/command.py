"""A parsed command line of ``proxy-server`` or ``proxy-agent``, common to both programs.

Both flag sets hold the program's own options, klog's flags and ``--help``; parsing one
gives its options dataclass, klog's options and what the user passed explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from konnectivity_fast.cli.flags import FlagError, FlagSet
from konnectivity_fast.cli.klog import KLOG_PREFIX, KlogOptions, setup_logging
from konnectivity_fast.cli.malloc import idle_trimmer, tune_malloc
from konnectivity_fast.transport.grpc import GrpcProtocol

T = TypeVar("T")


@dataclass(frozen=True)
class CommandLine(Generic[T]):
    """A parsed command line."""

    options: T
    klog: KlogOptions
    explicit: frozenset[str]  # flag names given on the command line
    args: tuple[str, ...]  # positional arguments (upstream ignores them)
    help_requested: bool


def parse_command(
    flagset: FlagSet,
    options_type: type[T],
    argv: Sequence[str],
    *,
    environ: Mapping[str, str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> CommandLine[T]:
    """Parse ``argv`` (without the program name); raises ``FlagError`` with pflag's text."""
    result = flagset.parse(argv, environ=environ, warn=warn)
    return CommandLine(
        options=result.build(options_type),
        klog=result.build(KlogOptions, KLOG_PREFIX),
        explicit=result.explicit,
        args=result.args,
        help_requested=bool(result.values["help"]),
    )


def report_error(
    program: str, flagset: FlagSet, message: str, klog: KlogOptions | None = None
) -> int:
    """What upstream prints for any error of its command (parse, validation, start-up):
    cobra's ``Error: <err>`` and the usage on stderr, then main's klog line
    ``error: <err>``; the exit code, 1. ``klog``: the logging options if already set up
    (else klog's defaults are used, as upstream's main does before parsing)."""
    print(f"Error: {message}", file=sys.stderr)
    print(f"Usage:\n  {program} [flags]\n\nFlags:\n{flagset.flag_usages()}", file=sys.stderr)
    if klog is None:
        setup_logging(KlogOptions(), program=program)
    logging.getLogger(f"konnectivity_fast.{program}").error("error: %s", message)
    return 1


class Options(Protocol):
    """What ``run_program`` needs of a program's options."""

    def log_values(self) -> None: ...
    def validate(self) -> str | None: ...


OptionsT = TypeVar("OptionsT", bound=Options)


@dataclass(frozen=True)
class Program(Generic[OptionsT]):
    """One program's command line: its parser, flag set and help, what its validation
    errors are prefixed with, how it serves, and which exceptions are start-up failures
    (reported with ``startup_prefix``)."""

    name: str
    parse: Callable[..., CommandLine[OptionsT]]
    flagset: Callable[[], FlagSet]
    usage: Callable[[], str]
    what: str  # "server" or "agent": "failed to validate <what> options with <err>"
    serve: Callable[[OptionsT], Coroutine[Any, Any, int]]
    startup_errors: tuple[type[Exception], ...]
    startup_prefix: str = ""


async def _serving(serve: Coroutine[Any, Any, int]) -> int:
    """``serve``, with the idle trimmer (cli/malloc.py) running beside it."""
    trimmer = idle_trimmer(closed=lambda: GrpcProtocol.closed_total)
    task = asyncio.get_running_loop().create_task(trimmer.run()) if trimmer else None
    try:
        return await serve
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def run_program(program: Program[OptionsT], argv: Sequence[str] | None) -> int:
    """Upstream's cobra command and main: parse, ``--help``, klog set-up, validation, then
    serve on uvloop; every error is reported by ``report_error``. The exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = program.parse(args, warn=lambda text: print(text, file=sys.stderr))
    except FlagError as exc:
        return report_error(program.name, program.flagset(), str(exc))
    if command.help_requested:
        sys.stdout.write(program.usage())
        return 0
    setup_logging(command.klog, program=program.name)
    options = command.options
    options.log_values()
    error = options.validate()
    if error is not None:
        message = f"failed to validate {program.what} options with {error}"
        return report_error(program.name, program.flagset(), message, command.klog)

    import uvloop

    tune_malloc()
    try:
        return int(uvloop.run(_serving(program.serve(options))))
    except program.startup_errors as exc:
        message = f"{program.startup_prefix}{exc}"
        return report_error(program.name, program.flagset(), message, command.klog)
