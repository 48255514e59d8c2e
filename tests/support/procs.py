"""Processes seen through /proc: a process's children, found by their parent ID (the
``children`` file of /proc/<pid>/task/<tid>/ exists only with CONFIG_PROC_CHILDREN)."""

from __future__ import annotations

import os

__all__ = ["child_pids"]


def child_pids(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``, in increasing pid order."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            children.append(int(entry))
    return sorted(children)
