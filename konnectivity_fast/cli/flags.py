"""Command-line flags with the semantics of spf13/pflag under spf13/cobra.

Upstream's ``proxy-server`` and ``proxy-agent`` are cobra commands; their flags are a pflag
``FlagSet`` plus klog's Go ``flag`` set added through pflag's ``AddGoFlag``. Deployments
pass argument lists written for those binaries, so this module accepts exactly what pflag
accepts and fails with pflag's messages:

- ``--name=value`` and ``--name value``; the next argument is taken as the value even when
  it starts with ``-``. ``--`` ends the flags; a lone ``-`` and other words are positional
  arguments, which may appear anywhere (cobra keeps them and upstream ignores them).
- Single dash means shorthand letters: ``-v=3``, ``-v 3``, ``-v3``, ``-hv3``. Only
  one-letter flags have a shorthand (pflag gives every one-letter Go flag one, so klog's
  ``v`` has ``-v``; cobra's ``help`` has ``-h``). ``-mode=grpc`` is therefore an error in
  upstream (``unknown shorthand flag: 'm' in -mode=grpc``), and here.
- Booleans take no separate argument: bare ``--x`` means true, ``--x=false`` sets false,
  and ``--x false`` leaves ``false`` as a positional argument.
- A string slice's first use replaces the default; later uses append (``--a=x,y --a=z``).
- ``_`` and ``-`` are the same in flag names. Upstream renames klog's ``log_dir`` to
  ``log-dir`` when registering but sets no normalizer, so it rejects ``--log_dir``; we
  accept both spellings, which no working upstream command line can tell apart.
- A deprecated flag still works; after a successful parse pflag prints
  ``Flag --<name> has been deprecated, <message>`` to standard error. Deprecated and hidden
  flags are left out of ``--help``.

Errors are ``FlagError`` with pflag's text: ``unknown flag: --foo``, ``flag needs an
argument: --foo``, ``invalid argument "x" for "--foo" flag: <Go error>``, ``bad flag
syntax: ---foo``.

Value types carry Go's parsing and printing (``goparse``), so defaults print as Go prints
them (``1h0m0s``, ``[]``) and bad values fail with Go's errors.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from konnectivity_fast.cli import goparse
from konnectivity_fast.cli.goparse import GoError, GoNumError, go_quote

__all__ = [
    "BOOL",
    "DURATION",
    "FLOAT32",
    "GO_BOOL",
    "GO_UINT64",
    "INT",
    "STRING",
    "STRING_SLICE",
    "Flag",
    "FlagError",
    "FlagSet",
    "ParseResult",
    "ValueType",
    "command_usage",
    "underscores_to_hyphens",
]

T = TypeVar("T")

# pflag's help omits "(default X)" when X is the type's zero value; for types it does not
# know (Go flag values, custom values) these strings count as zero.
_GENERIC_ZERO = frozenset({"false", "<nil>", "", "0"})


class FlagError(ValueError):
    """The command line cannot be parsed; ``str(exc)`` is pflag's message."""


@dataclass(frozen=True)
class ValueType:
    """How one kind of flag value is read and printed.

    ``name`` is pflag's ``Value.Type()`` (shown in help and in the golden flag lists);
    ``parse`` raises ``GoError`` with Go's text; ``format`` is Go's ``Value.String()``.
    """

    name: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str]
    zero: frozenset[str] = _GENERIC_ZERO
    is_bool: bool = False  # NoOptDefVal "true": a bare --x means --x=true
    appends: bool = False  # first use replaces the default, later uses extend it
    help_name: str | None = None  # pflag's placeholder in help, when not ``name``

    @property
    def placeholder(self) -> str:
        """The word after the flag name in help (pflag's ``UnquoteUsage``)."""
        if self.is_bool:
            return ""
        return self.name if self.help_name is None else self.help_name


def _go_flag_errors(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Go's standard ``flag`` values report strconv failures as two fixed words."""

    def wrapped(text: str) -> T:
        try:
            return parse(text)
        except GoNumError as exc:
            raise GoError("parse error" if exc.kind == "syntax" else "value out of range") from None

    return wrapped


def _format_bool(value: Any) -> str:
    return "true" if value else "false"


def _parse_duration_seconds(text: str) -> float:
    return goparse.parse_duration(text) / goparse.NS_PER_SECOND


def _format_duration_seconds(value: Any) -> str:
    return goparse.format_duration(goparse.seconds_to_ns(float(value)))


def _parse_string_slice(text: str) -> list[str]:
    return [] if text == "" else goparse.read_csv_record(text)


def _format_string_slice(value: Any) -> str:
    return "[" + goparse.write_csv_record(list(value)) + "]"


BOOL = ValueType("bool", goparse.parse_bool, _format_bool, frozenset({"false"}), is_bool=True)
GO_BOOL = ValueType("bool", _go_flag_errors(goparse.parse_bool), _format_bool, is_bool=True)
INT = ValueType("int", goparse.parse_int, str, frozenset({"0"}))
GO_UINT64 = ValueType(
    "uint64", _go_flag_errors(lambda s: goparse.parse_uint(s, 0)), str, help_name="uint"
)
FLOAT32 = ValueType("float32", goparse.parse_float32, goparse.format_float32, frozenset({"0"}))
STRING = ValueType("string", str, str, frozenset({""}))
STRING_SLICE = ValueType(
    "stringSlice",
    _parse_string_slice,
    _format_string_slice,
    frozenset({"[]"}),
    appends=True,
    help_name="strings",
)
DURATION = ValueType(
    "duration", _parse_duration_seconds, _format_duration_seconds, frozenset({"0", "0s"})
)


def underscores_to_hyphens(name: str) -> str:
    """Upstream's ``util.Normalize``: ``log_dir`` and ``log-dir`` name the same flag."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class Flag:
    """One registered flag. ``dest`` is the key of its value in ``ParseResult.values``;
    two flags may share one (an alias). ``env`` names a variable whose non-empty value
    replaces the default. ``extension``: a flag of ours that upstream's program lacks (a
    konnectivity-fast extension; its help text says so)."""

    name: str
    type: ValueType
    default: Any
    help: str
    dest: str
    shorthand: str = ""
    hidden: bool = False
    deprecated: str = ""
    env: str = ""
    extension: bool = False

    @property
    def def_value(self) -> str:
        """The default as Go prints it (pflag's ``DefValue``)."""
        return self.type.format(self.default)


@dataclass(frozen=True)
class ParseResult:
    """What a command line said: every flag's value by ``dest`` (defaults included), the
    names of the flags it set explicitly, and its positional arguments."""

    values: Mapping[str, Any]
    explicit: frozenset[str]
    args: tuple[str, ...]

    def build(self, cls: type[T], prefix: str = "") -> T:
        """An instance of the dataclass ``cls`` from the values whose dest is
        ``prefix + field name``; fields without a flag keep their defaults."""
        kwargs = {
            f.name: self.values[prefix + f.name]
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if f.init and prefix + f.name in self.values
        }
        return cls(**kwargs)


class FlagSet:
    """A set of flags parsed the way pflag parses them (see the module docstring)."""

    def __init__(
        self, name: str, *, normalize: Callable[[str], str] | None = underscores_to_hyphens
    ) -> None:
        self.name = name
        self._normalize = normalize or (lambda n: n)
        self._flags: dict[str, Flag] = {}
        self._shorthands: dict[str, Flag] = {}

    def add(
        self,
        name: str,
        type: ValueType,
        default: Any,
        help: str,
        *,
        dest: str | None = None,
        shorthand: str = "",
        hidden: bool = False,
        deprecated: str = "",
        env: str = "",
        extension: bool = False,
    ) -> Flag:
        """Register a flag; like pflag, a deprecated flag is also hidden."""
        key = self._normalize(name)
        if key in self._flags:
            raise ValueError(f"{self.name} flag redefined: {name}")
        if len(shorthand) > 1:
            raise ValueError(f"{shorthand!r} shorthand is more than one ASCII character")
        if shorthand in self._shorthands:
            raise ValueError(f"shorthand -{shorthand} is already used")
        flag = Flag(
            key,
            type,
            default,
            help,
            dest or key.replace("-", "_"),
            shorthand,
            hidden or bool(deprecated),
            deprecated,
            env,
            extension,
        )
        self._flags[key] = flag
        if shorthand:
            self._shorthands[shorthand] = flag
        return flag

    def lookup(self, name: str) -> Flag | None:
        return self._flags.get(self._normalize(name))

    def __iter__(self) -> Iterator[Flag]:
        """All flags, hidden ones included, sorted by name as pflag's ``VisitAll``."""
        return iter(sorted(self._flags.values(), key=lambda f: f.name))

    def __len__(self) -> int:
        return len(self._flags)

    def defaults(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Every dest's starting value: the default, or a flag's non-empty env variable."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for flag in self:
            if flag.dest in values:
                continue  # an alias: the first name (sorted) registered the shared default
            value = flag.default
            if flag.env and environ.get(flag.env):
                text = environ[flag.env]
                try:
                    value = flag.type.parse(text)
                except GoError as exc:
                    raise FlagError(
                        f"invalid value {go_quote(text)} in ${flag.env} for --{flag.name}: {exc}"
                    ) from None
            values[flag.dest] = list(value) if isinstance(value, list) else value
        return values

    def parse(
        self,
        argv: Sequence[str],
        *,
        environ: Mapping[str, str] | None = None,
        warn: Callable[[str], None] | None = None,
    ) -> ParseResult:
        """Parse ``argv`` (without the program name). Deprecation notices go to ``warn``
        (default: a line on standard error) once the whole line has parsed."""
        state = _ParseState(self, self.defaults(environ))
        state.run(list(argv))
        emit = warn or (lambda line: print(line, file=sys.stderr))
        for line in state.notices:
            emit(line)
        return ParseResult(state.values, frozenset(state.explicit), tuple(state.args))

    def flag_usages(self) -> str:
        """The flag table of ``--help`` (pflag's ``FlagUsages``): visible flags sorted by
        name, shorthand, type placeholder, help, and the default unless it is zero."""
        rows: list[tuple[str, str]] = []
        for flag in self:
            if flag.hidden:
                continue
            if flag.shorthand:
                left = f"  -{flag.shorthand}, --{flag.name}"
            else:
                left = f"      --{flag.name}"
            if flag.type.placeholder:
                left += " " + flag.type.placeholder
            text = flag.help
            if flag.env:
                text += f" Falls back to ${flag.env} when that is set."
            default = flag.def_value
            if default not in flag.type.zero:
                shown = go_quote(default) if flag.type.name == "string" else default
                text += f" (default {shown})"
            rows.append((left, text))
        width = max((len(left) for left, _ in rows), default=0)
        return "".join(f"{left.ljust(width)}   {text}\n" for left, text in rows)


class _ParseState:
    """One run of pflag's ``parseArgs`` over a command line."""

    def __init__(self, flags: FlagSet, values: dict[str, Any]) -> None:
        self.flags = flags
        self.values = values
        self.explicit: set[str] = set()
        self.args: list[str] = []
        self.notices: list[str] = []
        self._appended: set[str] = set()

    def run(self, args: list[str]) -> None:
        while args:
            arg = args.pop(0)
            if len(arg) < 2 or arg[0] != "-":
                self.args.append(arg)
            elif arg == "--":
                self.args.extend(args)
                return
            elif arg.startswith("--"):
                self._long(arg, args)
            else:
                self._shorts(arg, args)

    def _long(self, arg: str, args: list[str]) -> None:
        body = arg[2:]
        if body[0] in "-=":
            raise FlagError(f"bad flag syntax: {arg}")
        name, eq, value = body.partition("=")
        flag = self.flags.lookup(name)
        if flag is None:
            raise FlagError(f"unknown flag: --{name}")
        if not eq:
            if flag.type.is_bool:
                value = "true"
            elif args:
                value = args.pop(0)
            else:
                raise FlagError(f"flag needs an argument: {arg}")
        self._set(flag, value)

    def _shorts(self, arg: str, args: list[str]) -> None:
        shorts = arg[1:]
        while shorts:
            if shorts.startswith("test."):  # pflag leaves Go test flags alone
                return
            letter = shorts[0]
            flag = self.flags._shorthands.get(letter)
            if flag is None:
                raise FlagError(f"unknown shorthand flag: {_go_char(letter)} in -{shorts}")
            if len(shorts) > 2 and shorts[1] == "=":
                value, shorts = shorts[2:], ""
            elif flag.type.is_bool:
                value, shorts = "true", shorts[1:]
            elif len(shorts) > 1:
                value, shorts = shorts[1:], ""
            elif args:
                value, shorts = args.pop(0), ""
            else:
                raise FlagError(f"flag needs an argument: {_go_char(letter)} in -{shorts}")
            self._set(flag, value)

    def _set(self, flag: Flag, text: str) -> None:
        try:
            value = flag.type.parse(text)
        except GoError as exc:
            shown = f"-{flag.shorthand}, --{flag.name}" if flag.shorthand else f"--{flag.name}"
            raise FlagError(
                f"invalid argument {go_quote(text)} for {go_quote(shown)} flag: {exc}"
            ) from None
        if flag.type.appends:
            if flag.dest in self._appended:
                value = [*self.values[flag.dest], *value]
            self._appended.add(flag.dest)
        self.values[flag.dest] = value
        self.explicit.add(flag.name)
        if flag.deprecated:
            self.notices.append(f"Flag --{flag.name} has been deprecated, {flag.deprecated}")


def _go_char(letter: str) -> str:
    """Go's ``%q`` of a byte: a single-quoted character literal."""
    if letter == "'":
        return "'\\''"
    quoted = go_quote(letter)
    return "'" + quoted[1:-1].replace('\\"', '"') + "'"


def command_usage(description: str, use: str, flags: FlagSet) -> str:
    """The whole ``--help`` text, laid out as cobra lays out a command's help."""
    return f"{description.strip()}\n\nUsage:\n  {use} [flags]\n\nFlags:\n{flags.flag_usages()}"
