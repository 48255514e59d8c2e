"""Tests of the command line: pflag/klog parsing and the two binaries' option sets.

``flag_surface`` and ``read_golden`` put a registered ``FlagSet`` and a golden list
(``tests/data/flags/*.txt``, compiled by hand from upstream's source and checked against its
binaries by tests/compat/test_flags.py) in the same shape, so a test can compare them row
by row.
"""

from __future__ import annotations

from pathlib import Path

from konnectivity_fast.cli.flags import FlagSet

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "data" / "flags"

# (name, type, default, markers)
Row = tuple[str, str, str, frozenset[str]]


def read_golden(name: str) -> list[Row]:
    rows = []
    for line in (GOLDEN_DIR / name).read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        flag, kind, default, *markers = line.split("\t")
        rows.append((flag, kind, "" if default == '""' else default, frozenset(markers)))
    return rows


def flag_surface(fs: FlagSet, golden: list[Row]) -> list[Row]:
    """Our flags in the golden list's shape, but our extensions' (upstream has none of
    them; tests/cli/test_extension_flags.py covers those). A deprecation message is
    compared only where the golden row quotes one; a random default is written
    ``<uuid>``."""
    quoted = {row[0]: m for row in golden for m in row[3] if m.startswith("deprecated=")}
    rows = []
    for flag in fs:
        if flag.extension:
            continue
        markers = set()
        if flag.shorthand:
            markers.add(f"shorthand={flag.shorthand}")
        if flag.hidden:
            markers.add("hidden")
        if flag.deprecated:
            markers.add(f"deprecated={flag.deprecated}" if flag.name in quoted else "deprecated")
        if flag.env:
            markers.add(f"env={flag.env}")
        default = "<uuid>" if flag.env else flag.def_value
        rows.append((flag.name, flag.type.name, default, frozenset(markers)))
    return rows
