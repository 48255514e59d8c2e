"""Every Makefile target is a command, so every one is declared ``.PHONY`` (a file of the
same name, such as a ``build`` folder, would otherwise make it a no-op), and ``.PHONY``
names no target that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

MAKEFILE = Path(__file__).resolve().parents[1] / "Makefile"


def declared() -> tuple[set[str], set[str]]:
    text = MAKEFILE.read_text().replace("\\\n", " ")
    targets: set[str] = set()
    phony: set[str] = set()
    for line in text.splitlines():
        if line.startswith(".PHONY:"):
            phony.update(line.split(":", 1)[1].split())
        elif m := re.match(r"^([A-Za-z0-9_.-]+(?: [A-Za-z0-9_.-]+)*)\s*:(?!=)", line):
            targets.update(m.group(1).split())
    return targets, phony


def test_every_target_is_phony() -> None:
    targets, phony = declared()
    assert "build" in targets and "test" in targets  # the parser found the targets
    assert targets - phony == set(), "targets missing from .PHONY"
    assert phony - targets == set(), ".PHONY names targets that do not exist"
