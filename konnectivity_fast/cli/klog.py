"""klog's command-line flags, and Python logging that looks and filters like klog.

Both upstream binaries register klog's flag set (k8s.io/klog/v2 v2.140, the release that
added ``alsologtostderrthreshold`` and ``legacy_stderr_threshold_behavior``) with
underscores turned into hyphens, after setting ``v`` to 4. The values keep their Go types:
``v`` is a ``Level`` (decimal, 32-bit, shorthand ``-v``), thresholds are a ``severity``
(INFO/WARNING/ERROR/FATAL in any case, or a number), ``vmodule`` a ``moduleSpec``
(``pattern=N,...``), ``log_backtrace_at`` a ``traceLocation`` (``file.go:N``); the plain
ones are Go ``flag`` values, whose errors read ``parse error``.

Verbosity maps onto Python logging levels: klog's ``V(n)`` is level ``V(n) = INFO - 2n``
(at least 1), so ``log.info`` is V(0), ``log.log(V(2), ...)`` is V(2) and ``log.debug``
(10) is V(5), the level upstream uses for per-packet detail. With the default ``-v=4``,
V(0)..V(4) are shown and ``log.debug`` is not. Warnings and errors are never filtered.

``setup_logging`` writes klog's line format,
``Lmmdd hh:mm:ss.uuuuuu threadid file:line] message`` (``threadid`` is the process ID, as
in klog), to standard error or to files, following klog's rules for ``logtostderr``,
``alsologtostderr``, ``stderrthreshold`` and ``log_file_max_size``. One simplification:
klog writes a file per severity under ``--log-dir``; we write one file holding every
severity (klog's INFO file), so ``--one-output`` changes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import IO, Any

from konnectivity_fast.cli import goparse
from konnectivity_fast.cli.flags import GO_BOOL, GO_UINT64, STRING, FlagSet, ValueType
from konnectivity_fast.cli.goparse import GoError
from konnectivity_fast.verbosity import V

__all__ = [
    "DEFAULT_VERBOSITY",
    "KLOG_PREFIX",
    "KlogFormatter",
    "KlogOptions",
    "V",
    "register_klog_flags",
    "setup_logging",
]

# Both upstream main() functions set klog's -v to 4 before adding the flags.
DEFAULT_VERBOSITY = 4
# klog values live under this prefix in ParseResult.values.
KLOG_PREFIX = "klog."

SEVERITY_NAMES = ("INFO", "WARNING", "ERROR", "FATAL")


def _parse_level(text: str) -> int:
    return goparse.parse_int(text, 10, 32)


def _parse_severity(text: str) -> int:
    upper = text.upper()
    if upper in SEVERITY_NAMES:
        return SEVERITY_NAMES.index(upper)
    return goparse.parse_int(text, 10, 32)


def _parse_vmodule(text: str) -> tuple[tuple[str, int], ...]:
    syntax = GoError("syntax error: expect comma-separated list of filename=N")
    patterns = []
    for item in text.split(","):
        if not item:
            continue  # a trailing comma, say
        parts = item.split("=")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise syntax
        try:
            level = goparse.parse_int(parts[1], 10, 32)
        except GoError:
            raise syntax from None
        if level < 0:
            raise GoError("negative value for vmodule level")
        if level:
            patterns.append((parts[0], level))
    return tuple(patterns)


def _format_vmodule(value: Any) -> str:
    return ",".join(f"{pattern}={level}" for pattern, level in value)


def _parse_trace_location(text: str) -> tuple[str, int]:
    if text == "":
        return ("", 0)
    syntax = GoError("syntax error: expect file.go:234")
    parts = text.split(":")
    if len(parts) != 2 or "." not in parts[0]:
        raise syntax
    try:
        line = goparse.parse_int(parts[1], 10, 64)  # Go's Atoi
    except GoError:
        raise syntax from None
    if line <= 0:
        raise GoError("negative or zero value for level")
    return (parts[0], line)


def _format_trace_location(value: Any) -> str:
    return f"{value[0]}:{value[1]}"


LEVEL = ValueType("Level", _parse_level, str)
SEVERITY = ValueType("severity", _parse_severity, str)
MODULE_SPEC = ValueType("moduleSpec", _parse_vmodule, _format_vmodule)
TRACE_LOCATION = ValueType("traceLocation", _parse_trace_location, _format_trace_location)


@dataclass
class KlogOptions:
    """klog's flag values (field names are klog's Go flag names)."""

    v: int = DEFAULT_VERBOSITY
    vmodule: tuple[tuple[str, int], ...] = ()
    logtostderr: bool = True
    alsologtostderr: bool = False
    alsologtostderrthreshold: int = 0  # INFO
    stderrthreshold: int = 2  # ERROR
    legacy_stderr_threshold_behavior: bool = True
    log_dir: str = ""
    log_file: str = ""
    log_file_max_size: int = 1800  # megabytes; 0 means unlimited
    add_dir_header: bool = False
    skip_headers: bool = False
    skip_log_headers: bool = False
    one_output: bool = False
    log_backtrace_at: tuple[str, int] = ("", 0)


# (klog's Go name, type, help). Our own words; severities are INFO, WARNING, ERROR, FATAL.
_KLOG_FLAGS: tuple[tuple[str, ValueType, str], ...] = (
    (
        "add_dir_header",
        GO_BOOL,
        "Show the source file's directory, not only its name, in each log line's header.",
    ),
    ("alsologtostderr", GO_BOOL, "When logging to files, copy entries to standard error as well."),
    (
        "alsologtostderrthreshold",
        SEVERITY,
        "With --alsologtostderr, copy only entries of this severity or worse "
        "(INFO, WARNING, ERROR, FATAL, or 0-3).",
    ),
    (
        "legacy_stderr_threshold_behavior",
        GO_BOOL,
        "Keep the historical behaviour where --logtostderr sends every entry to standard "
        "error whatever --stderrthreshold says; false applies the threshold.",
    ),
    (
        "log_backtrace_at",
        TRACE_LOCATION,
        "Add a stack trace to the entry logged from this source line, given as FILE:LINE.",
    ),
    (
        "log_dir",
        STRING,
        "Directory for log files when not logging to standard error (default: the system "
        "temporary directory); --log-file takes precedence.",
    ),
    ("log_file", STRING, "Log file to write when not logging to standard error."),
    (
        "log_file_max_size",
        GO_UINT64,
        "Size in megabytes at which a log file is started afresh; 0 means no limit.",
    ),
    ("logtostderr", GO_BOOL, "Write log entries to standard error instead of files."),
    (
        "one_output",
        GO_BOOL,
        "Accepted for compatibility: entries are written to one log file, not one per "
        "severity, so there is nothing to deduplicate.",
    ),
    (
        "skip_headers",
        GO_BOOL,
        "Write log messages without the severity, time and source-line prefix.",
    ),
    (
        "skip_log_headers",
        GO_BOOL,
        "Do not start new log files with the lines describing the host and format.",
    ),
    (
        "stderrthreshold",
        SEVERITY,
        "Entries of this severity or worse also go to standard error when logging to files "
        "(INFO, WARNING, ERROR, FATAL, or 0-3).",
    ),
    ("v", LEVEL, "Verbosity: higher numbers log more detail (5 and up is per-connection tracing)."),
    (
        "vmodule",
        MODULE_SPEC,
        "Per-file verbosity as a comma-separated list of PATTERN=N, where PATTERN is a glob "
        "matched against source file names without their extension.",
    ),
)


def register_klog_flags(fs: FlagSet, defaults: KlogOptions | None = None) -> None:
    """Add klog's flags to ``fs`` under upstream's names (``log_dir`` -> ``log-dir``);
    values are kept under ``KLOG_PREFIX + go_name``."""
    defaults = defaults or KlogOptions()
    for go_name, kind, text in _KLOG_FLAGS:
        fs.add(
            go_name.replace("_", "-"),
            kind,
            getattr(defaults, go_name),
            text,
            dest=KLOG_PREFIX + go_name,
            shorthand=go_name if len(go_name) == 1 else "",
        )


def _severity_of(levelno: int) -> int:
    """klog's severity index (INFO 0 .. FATAL 3) of a Python level."""
    if levelno >= logging.CRITICAL:
        return 3
    if levelno >= logging.ERROR:
        return 2
    return 1 if levelno >= logging.WARNING else 0


class _VerbosityFilter(logging.Filter):
    """Drops V-level records above ``-v`` (or above the file's ``-vmodule`` level), and
    attaches a stack to the record logged from ``-log_backtrace_at``'s line."""

    def __init__(self, opts: KlogOptions) -> None:
        super().__init__()
        self._v = opts.v
        self._modules = opts.vmodule
        self._trace = opts.log_backtrace_at

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            level = self._v
            stem = os.path.splitext(record.filename)[0]
            for pattern, module_level in self._modules:
                if fnmatchcase(stem, pattern):
                    level = max(level, module_level)
                    break
            if record.levelno < V(level):
                return False
        if self._trace[1] and (record.filename, record.lineno) == self._trace:
            record.stack_info = "".join(traceback.format_stack()[:-1]).rstrip("\n")
        return True


class KlogFormatter(logging.Formatter):
    """klog's line layout: ``Lmmdd hh:mm:ss.uuuuuu threadid file:line] message``."""

    def __init__(self, *, skip_headers: bool = False, add_dir_header: bool = False) -> None:
        super().__init__()
        self._skip_headers = skip_headers
        self._add_dir_header = add_dir_header
        self._pid = str(os.getpid())[-7:].rjust(7)

    def header(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        name = record.filename
        if self._add_dir_header:
            name = os.path.join(os.path.basename(os.path.dirname(record.pathname)), name)
        return (
            f"{'IWEF'[_severity_of(record.levelno)]}{t.tm_mon:02d}{t.tm_mday:02d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}.{micros:06d} {self._pid} "
            f"{name}:{record.lineno}] "
        )

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{record.stack_info}"
        return text if self._skip_headers else self.header(record) + text


class _SeverityFilter(logging.Filter):
    def __init__(self, accept: Callable[[int], bool]) -> None:
        super().__init__()
        self._accept = accept

    def filter(self, record: logging.LogRecord) -> bool:
        return self._accept(_severity_of(record.levelno))


class _KlogFileHandler(logging.Handler):
    """Writes to a log file; past ``max_bytes`` written it starts a fresh file (klog
    recreates ``--log-file`` empty, and makes a new timestamped file under ``--log-dir``)."""

    def __init__(self, new_path: Callable[[], str], max_bytes: int, header: bool) -> None:
        super().__init__()
        self._new_path = new_path
        self._max_bytes = max_bytes
        self._header = header
        self._file: IO[str] | None = None
        self._written = 0

    def _open(self, mode: str) -> IO[str]:
        path = self._new_path()
        f = open(path, mode, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        if self._header:
            now = time.strftime("%Y/%m/%d %H:%M:%S")
            f.write(
                f"Log file created at: {now}\nRunning on machine: {socket.gethostname()}\n"
                f"Binary: Python {sys.version.split()[0]} on {sys.platform}\n"
                "Log line format: [IWEF]mmdd hh:mm:ss.uuuuuu threadid file:line] msg\n"
            )
        self._written = 0
        return f

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
            if self._file is None:
                self._file = self._open("a")
            elif self._max_bytes and self._written + len(line) >= self._max_bytes:
                self._file.close()
                self._file = self._open("w")
            self._file.write(line)
            self._file.flush()
            self._written += len(line.encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()


def _log_dir_path(directory: str, program: str) -> Callable[[], str]:
    """klog's file naming under ``--log-dir``, plus its ``<program>.INFO`` symlink."""

    def new_path() -> str:
        # Imported here, as tempfile below: only a program that writes log files needs
        # them (modules cost resident memory; docs/architecture.md).
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknownuser"
        host = socket.gethostname().split(".")[0] or "unknownhost"
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{program}.{host}.{user}.log.INFO.{stamp}.{os.getpid()}"
        link = os.path.join(directory, f"{program}.INFO")
        try:
            if os.path.islink(link):
                os.remove(link)
            os.symlink(name, link)
        except OSError:
            pass  # the link is a convenience
        return os.path.join(directory, name)

    return new_path


def setup_logging(
    opts: KlogOptions, *, program: str, stderr: IO[str] | None = None
) -> list[logging.Handler]:
    """Route the root logger the way klog would with these options; returns the handlers
    it installed (replacing any it installed before)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_klog", False):
            root.removeHandler(handler)
            handler.close()
    formatter = KlogFormatter(skip_headers=opts.skip_headers, add_dir_header=opts.add_dir_header)
    verbosity = _VerbosityFilter(opts)
    handlers: list[logging.Handler] = []
    err_stream = stderr if stderr is not None else sys.stderr
    if opts.logtostderr:
        to_stderr = logging.StreamHandler(err_stream)
        if not opts.legacy_stderr_threshold_behavior:
            to_stderr.addFilter(_SeverityFilter(lambda s: s >= opts.stderrthreshold))
        handlers.append(to_stderr)
    else:
        if opts.log_file:
            path = opts.log_file
            new_path: Callable[[], str] = lambda: path  # noqa: E731
        else:
            import tempfile

            new_path = _log_dir_path(opts.log_dir or tempfile.gettempdir(), program)
        max_bytes = opts.log_file_max_size * 1024 * 1024
        handlers.append(_KlogFileHandler(new_path, max_bytes, not opts.skip_log_headers))
        also = logging.StreamHandler(err_stream)
        also.addFilter(
            _SeverityFilter(
                lambda s: (
                    s >= opts.stderrthreshold
                    or (opts.alsologtostderr and s >= opts.alsologtostderrthreshold)
                )
            )
        )
        handlers.append(also)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(verbosity)
        handler._klog = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    most = max([opts.v, *(level for _, level in opts.vmodule)])
    root.setLevel(V(most))
    return handlers
