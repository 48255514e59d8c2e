"""The flag surface of upstream's proxy-server and proxy-agent v0.36.0 against our golden
lists (tests/data/flags/), and our programs' ``--help`` against upstream's, flag by flag.

What ``--help`` shows (pflag's FlagUsages) is every flag that is not hidden, with its
shorthand, the type name pflag prints for it and its default when that is not the type's
zero value. Hidden flags, deprecated ones included, are found by passing them: an unknown
flag is refused before the help is printed, a deprecated one prints pflag's deprecation
line on stderr. Usage texts are not compared: ours are our own words.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from konnectivity_fast.cli import agent_options, server_options
from tests.support.upstream import Upstream

DATA = Path(__file__).resolve().parent.parent / "data" / "flags"
RUN_SECONDS = 60
# pflag's help line: "  -h, --help" or "      --name type", two or more spaces, the usage.
HELP_LINE = re.compile(r"^  (?:-(\w), |    )--([\w-]+)(?: (\S+))?(?: {2,}(.*))?$")
DEFAULT = re.compile(r" \(default (.*)\)$")
UUID = re.compile(r'^"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"$')
# The names pflag's UnquoteUsage prints for a Value.Type(); bool flags show none.
SHOWN_TYPE = {
    "bool": "",
    "stringSlice": "strings",
    "uint64": "uint",
    "int64": "int",
    "float64": "float",
}
# pflag's defaultIsZeroValue by value type; klog's flags (added as Go flags) fall under
# its generic rule.
ZERO = {
    "bool": {"false"},
    "duration": {"0", "0s"},
    "string": {""},
    "stringSlice": {"[]"},
    "int": {"0"},
    "float32": {"0"},
}
GENERIC_ZERO = {"false", "<nil>", "", "0"}

pytestmark = pytest.mark.timeout(1800)  # the first use builds the upstream binaries


@dataclass(frozen=True)
class Golden:
    name: str
    type: str
    default: str
    markers: frozenset[str]

    @property
    def hidden(self) -> bool:
        return "hidden" in self.markers

    def marker(self, key: str) -> str | None:
        for marker in self.markers:
            if marker == key:
                return ""
            if marker.startswith(key + "="):
                return marker.split("=", 1)[1]
        return None


@dataclass(frozen=True)
class Shown:
    """One flag as ``--help`` shows it."""

    shorthand: str
    type: str
    default: str | None  # as printed inside "(default ...)", None when not shown


def read_golden(program: str) -> list[Golden]:
    rows = []
    for line in (DATA / f"{program}.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, kind, default, *markers = line.split("\t")
            rows.append(Golden(name, kind, "" if default == '""' else default, frozenset(markers)))
    return rows


def parse_help(text: str) -> dict[str, Shown]:
    flags: dict[str, Shown] = {}
    lines = text.splitlines()
    start = lines.index("Flags:") + 1
    for line in lines[start:]:
        if not line.strip():
            break
        match = HELP_LINE.match(line)
        assert match, f"not a pflag help line: {line!r}"
        shorthand, name, kind, usage = match.groups()
        default = DEFAULT.search(usage or "")
        flags[name] = Shown(shorthand or "", kind or "", default.group(1) if default else None)
    return flags


def expected_shown(row: Golden) -> Shown:
    """What pflag prints for a golden row."""
    zero = ZERO.get(row.type, GENERIC_ZERO)
    default: str | None
    if row.default == "<uuid>":
        default = "<uuid>"
    elif row.default in zero:
        default = None
    elif row.type == "string":
        default = '"' + row.default + '"'  # %q; none of the defaults needs escaping
    else:
        default = row.default
    return Shown(row.marker("shorthand") or "", SHOWN_TYPE.get(row.type, row.type), default)


def normalise_uuid(flags: dict[str, Shown]) -> dict[str, Shown]:
    return {
        name: Shown(s.shorthand, s.type, "<uuid>") if s.default and UUID.match(s.default) else s
        for name, s in flags.items()
    }


def run(
    binary: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binary), *args],
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
        env=env,
    )


def upstream_help(upstream: Upstream, program: str) -> str:
    binary = upstream.proxy_server if program == "proxy-server" else upstream.proxy_agent
    done = run(binary, "--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


PROGRAMS = ["proxy-server", "proxy-agent"]


@pytest.mark.parametrize("program", PROGRAMS)
def test_golden_list_is_upstreams_help(upstream: Upstream, program: str) -> None:
    golden = read_golden(program)
    assert [row.name for row in golden] == sorted(row.name for row in golden)
    shown = normalise_uuid(parse_help(upstream_help(upstream, program)))
    expected = {row.name: expected_shown(row) for row in golden if not row.hidden}
    assert shown == expected


@pytest.mark.parametrize("program", PROGRAMS)
def test_hidden_flags_are_accepted_and_deprecations_announced(
    upstream: Upstream, program: str
) -> None:
    binary = upstream.proxy_server if program == "proxy-server" else upstream.proxy_agent
    hidden = [row for row in read_golden(program) if row.hidden]
    for row in hidden:
        value = "true" if row.type == "bool" else row.default
        done = run(binary, f"--{row.name}={value}", "--help")
        assert done.returncode == 0 and "unknown flag" not in done.stderr, done.stderr
        assert f"--{row.name} " not in done.stdout, "a hidden flag shows in --help"
        message = row.marker("deprecated")
        announced = [
            line
            for line in done.stderr.splitlines()
            if line.startswith(f"Flag --{row.name} has been deprecated")
        ]
        if message is None:
            assert announced == []
        elif message:
            assert announced == [f"Flag --{row.name} has been deprecated, {message}"]
        else:
            assert len(announced) == 1


@pytest.mark.parametrize("program", PROGRAMS)
def test_deprecation_messages_are_pinned(upstream: Upstream, program: str) -> None:
    """Every deprecated flag's golden row quotes upstream's message."""
    unquoted = [row.name for row in read_golden(program) if row.marker("deprecated") == ""]
    assert unquoted == []


@pytest.mark.parametrize("program", PROGRAMS)
def test_unknown_flag_is_refused(upstream: Upstream, program: str) -> None:
    """The control for the hidden-flag probe: a flag upstream lacks fails the parse."""
    binary = upstream.proxy_server if program == "proxy-server" else upstream.proxy_agent
    done = run(binary, "--no-such-flag=1", "--help")
    assert done.returncode != 0
    assert "unknown flag: --no-such-flag" in done.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_environment_default(upstream: Upstream, program: str) -> None:
    """A flag whose default comes from the environment shows that value in --help."""
    binary = upstream.proxy_server if program == "proxy-server" else upstream.proxy_agent
    rows = [row for row in read_golden(program) if row.marker("env")]
    assert rows
    for row in rows:
        env = dict(os.environ, **{row.marker("env") or "": "id-from-env"})
        done = run(binary, "--help", env=env)
        assert parse_help(done.stdout)[row.name].default == '"id-from-env"'


# -- ours against upstream's ------------------------------------------------------------


def ours(program: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run our program (``python -m konnectivity_fast.server`` or ``.agent``)."""
    package = "server" if program == "proxy-server" else "agent"
    return subprocess.run(
        [sys.executable, "-m", f"konnectivity_fast.{package}", *args],
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )


def our_help(program: str) -> str:
    done = ours(program, "--help")
    assert done.returncode == 0, done.stderr
    return done.stdout


def extension_flags(program: str) -> set[str]:
    """Our flags that upstream's program lacks, on purpose (cli/extensions.py)."""
    options = server_options if program == "proxy-server" else agent_options
    return {flag.name for flag in options.build_flagset() if flag.extension}


@pytest.mark.parametrize("program", PROGRAMS)
def test_our_help_shows_upstreams_flags(upstream: Upstream, program: str) -> None:
    """Upstream's flags, each as upstream shows it; beside them only our extensions."""
    theirs = normalise_uuid(parse_help(upstream_help(upstream, program)))
    ours = normalise_uuid(parse_help(our_help(program)))
    for name in extension_flags(program):
        assert name not in theirs, f"--{name} is upstream's now"
        del ours[name]
    names = {
        "only upstream shows": sorted(set(theirs) - set(ours)),
        "only we show": sorted(set(ours) - set(theirs)),
    }
    assert names == {"only upstream shows": [], "only we show": []}
    differences = {
        name: (ours[name], theirs[name])
        for name in set(ours) & set(theirs)
        if ours[name] != theirs[name]
    }
    assert differences == {}, "(ours, upstream's) per flag"


@pytest.mark.parametrize("program", PROGRAMS)
def test_our_hidden_flags_like_upstreams(upstream: Upstream, program: str) -> None:
    """Each hidden flag is accepted by our program, with upstream's deprecation line."""
    binary = upstream.proxy_server if program == "proxy-server" else upstream.proxy_agent
    for row in read_golden(program):
        if not row.hidden:
            continue
        value = "true" if row.type == "bool" else row.default
        theirs = run(binary, f"--{row.name}={value}", "--help")
        mine = ours(program, f"--{row.name}={value}", "--help")
        assert mine.returncode == theirs.returncode == 0, mine.stderr

        def deprecation(stderr: str) -> list[str]:
            return [line for line in stderr.splitlines() if "has been deprecated" in line]

        assert deprecation(mine.stderr) == deprecation(theirs.stderr)
