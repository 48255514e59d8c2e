"""``process_*`` metrics read from /proc, as client_golang's process collector exposes them.

Names, types and HELP texts are client_golang's (v1.24, the version upstream v0.36.0 builds
with), and so are the sources of the values: ``/proc/<pid>/stat`` (CPU time in clock ticks,
virtual size, resident pages, start time after boot), ``/proc/stat`` (boot time), the file
descriptor directory, the soft limits (an unlimited one reads as 2**64 - 1) and the ``IpExt``
octet counters of ``/proc/<pid>/net/netstat``. What cannot be read (not Linux, no /proc) is
left out, as Go leaves out what it could not collect.

There are no ``go_*`` metrics: this is not a Go process and faking them would mislead.
"""

from __future__ import annotations

import os
import resource

from konnectivity_fast.metrics.registry import format_value

__all__ = ["ProcessCollector"]

_UNLIMITED = 18446744073709551615  # procfs reads "unlimited" as the largest uint64

# (name, type, HELP), in client_golang's words.
_CPU = ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
_MAX_FDS = ("process_max_fds", "gauge", "Maximum number of open file descriptors.")
_RX = (
    "process_network_receive_bytes_total",
    "counter",
    "Number of bytes received by the process over the network.",
)
_TX = (
    "process_network_transmit_bytes_total",
    "counter",
    "Number of bytes sent by the process over the network.",
)
_OPEN_FDS = ("process_open_fds", "gauge", "Number of open file descriptors.")
_RSS = ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
_START = (
    "process_start_time_seconds",
    "gauge",
    "Start time of the process since unix epoch in seconds.",
)
_VSIZE = ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.")
_VMAX = (
    "process_virtual_memory_max_bytes",
    "gauge",
    "Maximum amount of virtual memory available in bytes.",
)

_ALL = (_CPU, _MAX_FDS, _RX, _TX, _OPEN_FDS, _RSS, _START, _VSIZE, _VMAX)

# Fields of /proc/<pid>/stat counted from the one after the command name's ")": the state is
# field 3 of proc(5), so field k is at index k - 3.
_UTIME, _STIME, _STARTTIME, _VSIZE_FIELD, _RSS_FIELD = 14 - 3, 15 - 3, 22 - 3, 23 - 3, 24 - 3


def _block(spec: tuple[str, str, str], value: float) -> tuple[str, str]:
    name, type_name, help_text = spec
    head = f"# HELP {name} {help_text}\n# TYPE {name} {type_name}\n"
    return name, f"{head}{name} {format_value(value)}\n"


def _limit(which: int) -> float:
    soft = resource.getrlimit(which)[0]
    return float(_UNLIMITED if soft == resource.RLIM_INFINITY or soft < 0 else soft)


class ProcessCollector:
    """Collects the process metrics of one process (``pid`` "self" by default)."""

    names: tuple[str, ...] = tuple(spec[0] for spec in _ALL)

    def __init__(self, pid: int | str = "self", proc: str = "/proc") -> None:
        self._proc = proc
        self._dir = os.path.join(proc, str(pid))
        self._own = pid == "self" or pid == os.getpid()
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def collect(self) -> list[tuple[str, str]]:
        blocks: list[tuple[str, str]] = []
        self._collect_stat(blocks)
        self._collect_fds(blocks)
        if self._own:
            blocks.append(_block(_MAX_FDS, _limit(resource.RLIMIT_NOFILE)))
            blocks.append(_block(_VMAX, _limit(resource.RLIMIT_AS)))
        self._collect_netstat(blocks)
        return blocks

    def _collect_stat(self, blocks: list[tuple[str, str]]) -> None:
        try:
            with open(os.path.join(self._dir, "stat"), "rb") as f:
                raw = f.read()
            fields = raw[raw.rindex(b")") + 2 :].split()
            utime, stime = int(fields[_UTIME]), int(fields[_STIME])
            starttime = int(fields[_STARTTIME])
            vsize, rss = int(fields[_VSIZE_FIELD]), int(fields[_RSS_FIELD])
        except (OSError, ValueError, IndexError):
            return
        blocks.append(_block(_CPU, (utime + stime) / self._hz))
        blocks.append(_block(_VSIZE, float(vsize)))
        blocks.append(_block(_RSS, float(rss * self._page)))
        boot = self._boot_time()
        if boot is not None:
            blocks.append(_block(_START, float(boot) + starttime / self._hz))

    def _boot_time(self) -> int | None:
        try:
            with open(os.path.join(self._proc, "stat"), "rb") as f:
                for line in f:
                    if line.startswith(b"btime "):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _collect_fds(self, blocks: list[tuple[str, str]]) -> None:
        path = os.path.join(self._dir, "fd")
        try:
            # Linux 6.2+ reports the number of open descriptors as the directory's size.
            count = os.stat(path).st_size or len(os.listdir(path))
        except OSError:
            return
        blocks.append(_block(_OPEN_FDS, float(count)))

    def _collect_netstat(self, blocks: list[tuple[str, str]]) -> None:
        try:
            with open(os.path.join(self._dir, "net", "netstat"), "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            return
        octets = {b"InOctets": 0, b"OutOctets": 0}
        for header, values in zip(lines[::2], lines[1::2], strict=False):
            if header.startswith(b"IpExt:") and values.startswith(b"IpExt:"):
                for key, value in zip(header.split()[1:], values.split()[1:], strict=False):
                    if key in octets:
                        try:
                            octets[key] = int(value)
                        except ValueError:
                            return
        blocks.append(_block(_RX, float(octets[b"InOctets"])))
        blocks.append(_block(_TX, float(octets[b"OutOctets"])))
