"""pflag's command-line semantics, Go's value syntax and klog-style logging.

Expected texts are Go's and pflag's (strconv, time, encoding/csv, pflag's parser), as a
user of the upstream binaries sees them.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from konnectivity_fast.cli import goparse
from konnectivity_fast.cli.flags import (
    BOOL,
    DURATION,
    FLOAT32,
    GO_BOOL,
    GO_UINT64,
    INT,
    STRING,
    STRING_SLICE,
    FlagError,
    FlagSet,
    command_usage,
)
from konnectivity_fast.cli.goparse import GoError
from konnectivity_fast.cli.klog import (
    KLOG_PREFIX,
    KlogFormatter,
    KlogOptions,
    V,
    register_klog_flags,
    setup_logging,
)

# -- Go durations -------------------------------------------------------------------------

DURATIONS = [  # (text, nanoseconds, Go's String())
    ("1h", 3_600_000_000_000, "1h0m0s"),
    ("1h0m0s", 3_600_000_000_000, "1h0m0s"),
    ("100ms", 100_000_000, "100ms"),
    ("1.5s", 1_500_000_000, "1.5s"),
    ("1ns", 1, "1ns"),
    ("-1s", -1_000_000_000, "-1s"),
    ("0", 0, "0s"),
    ("-0", 0, "0s"),
    ("300us", 300_000, "300\u00b5s"),
    ("300\u00b5s", 300_000, "300\u00b5s"),
    ("300\u03bcs", 300_000, "300\u00b5s"),
    ("1.5h", 5_400_000_000_000, "1h30m0s"),
    ("90s", 90_000_000_000, "1m30s"),
    ("1m0.5s", 60_500_000_000, "1m0.5s"),
    (".5s", 500_000_000, "500ms"),
    ("1.000000001s", 1_000_000_001, "1.000000001s"),
    ("2h45m", 9_900_000_000_000, "2h45m0s"),
    ("+5s", 5_000_000_000, "5s"),
    ("1500us", 1_500_000, "1.5ms"),
    ("9223372036854775807ns", 2**63 - 1, "2562047h47m16.854775807s"),
    ("-9223372036854775808ns", -(2**63), "-2562047h47m16.854775808s"),
]

BAD_DURATIONS = [
    ("1", 'time: missing unit in duration "1"'),
    ("1x", 'time: unknown unit "x" in duration "1x"'),
    ("", 'time: invalid duration ""'),
    ("-", 'time: invalid duration "-"'),
    ("s", 'time: invalid duration "s"'),
    (".s", 'time: invalid duration ".s"'),
    ("1h 2m", 'time: unknown unit "h " in duration "1h 2m"'),
    ("9223372036854775808ns", 'time: invalid duration "9223372036854775808ns"'),
    ("3000000h", 'time: invalid duration "3000000h"'),
    ("1\u00e9", 'time: unknown unit "\\xc3\\xa9" in duration "1\\xc3\\xa9"'),
]


@pytest.mark.parametrize(("text", "ns", "shown"), DURATIONS)
def test_duration(text: str, ns: int, shown: str) -> None:
    assert goparse.parse_duration(text) == ns
    assert goparse.format_duration(ns) == shown
    assert goparse.parse_duration(shown) == ns


@pytest.mark.parametrize(("text", "message"), BAD_DURATIONS)
def test_bad_duration(text: str, message: str) -> None:
    with pytest.raises(GoError) as info:
        goparse.parse_duration(text)
    assert str(info.value) == message


# -- Go integers, booleans, floats -------------------------------------------------------

INTS = [  # ParseInt(s, 0, 64), as pflag's int flags use it
    ("8090", 8090),
    ("-1", -1),
    ("+7", 7),
    ("0x1F", 31),
    ("0o17", 15),
    ("017", 15),
    ("0b101", 5),
    ("0", 0),
    ("1_000", 1000),
    ("0x_ff", 255),
    ("9223372036854775807", 2**63 - 1),
    ("-9223372036854775808", -(2**63)),
]
BAD_INTS = [
    ("", 'strconv.ParseInt: parsing "": invalid syntax'),
    ("abc", 'strconv.ParseInt: parsing "abc": invalid syntax'),
    ("08", 'strconv.ParseInt: parsing "08": invalid syntax'),
    ("0x", 'strconv.ParseInt: parsing "0x": invalid syntax'),
    (" 1", 'strconv.ParseInt: parsing " 1": invalid syntax'),
    ("1_", 'strconv.ParseInt: parsing "1_": invalid syntax'),
    ("_1", 'strconv.ParseInt: parsing "_1": invalid syntax'),
    ("1.5", 'strconv.ParseInt: parsing "1.5": invalid syntax'),
    ("9223372036854775808", 'strconv.ParseInt: parsing "9223372036854775808": value out of range'),
    (
        "-9223372036854775809",
        'strconv.ParseInt: parsing "-9223372036854775809": value out of range',
    ),
    (
        "99999999999999999999x",
        'strconv.ParseInt: parsing "99999999999999999999x": value out of range',
    ),
]


@pytest.mark.parametrize(("text", "value"), INTS)
def test_int(text: str, value: int) -> None:
    assert goparse.parse_int(text) == value


@pytest.mark.parametrize(("text", "message"), BAD_INTS)
def test_bad_int(text: str, message: str) -> None:
    with pytest.raises(GoError) as info:
        goparse.parse_int(text)
    assert str(info.value) == message


def test_decimal_32_bit_int() -> None:
    """klog's Level: ParseInt(s, 10, 32)."""
    assert goparse.parse_int("-3", 10, 32) == -3
    for text, message in [
        ("0x10", 'strconv.ParseInt: parsing "0x10": invalid syntax'),
        ("2147483648", 'strconv.ParseInt: parsing "2147483648": value out of range'),
        ("1_0", 'strconv.ParseInt: parsing "1_0": invalid syntax'),
    ]:
        with pytest.raises(GoError, match=message):
            goparse.parse_int(text, 10, 32)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("t", True),
        ("T", True),
        ("TRUE", True),
        ("true", True),
        ("True", True),
        ("0", False),
        ("f", False),
        ("F", False),
        ("FALSE", False),
        ("false", False),
        ("False", False),
    ],
)
def test_bool(text: str, value: bool) -> None:
    assert goparse.parse_bool(text) is value


@pytest.mark.parametrize("text", ["yes", "", "tRUE", "on", " true"])
def test_bad_bool(text: str) -> None:
    with pytest.raises(GoError) as info:
        goparse.parse_bool(text)
    assert str(info.value) == f'strconv.ParseBool: parsing "{text}": invalid syntax'


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("0", "0"),
        ("75", "75"),
        ("1.5", "1.5"),
        ("0.1", "0.1"),
        ("1e6", "1e+06"),
        ("123456", "123456"),
        ("1234567", "1.234567e+06"),
        ("0.0001", "0.0001"),
        ("0.00001", "1e-05"),
        ("-2.5", "-2.5"),
        ("0x1p-2", "0.25"),
        ("1_0.5", "10.5"),
        ("5.", "5"),
        (".5", "0.5"),
        ("3.4028235e38", "3.4028235e+38"),
        ("16777217", "1.6777216e+07"),
        ("inf", "+Inf"),
        ("-Infinity", "-Inf"),
        ("NaN", "NaN"),
    ],
)
def test_float32(text: str, shown: str) -> None:
    assert goparse.format_float32(goparse.parse_float32(text)) == shown


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("abc", "invalid syntax"),
        ("1e", "invalid syntax"),
        ("", "invalid syntax"),
        ("+nan", "invalid syntax"),
        ("1__0", "invalid syntax"),
        ("0x1", "invalid syntax"),
        ("1e39", "value out of range"),
        ("1e400", "value out of range"),
    ],
)
def test_bad_float32(text: str, reason: str) -> None:
    with pytest.raises(GoError) as info:
        goparse.parse_float32(text)
    assert str(info.value) == f'strconv.ParseFloat: parsing "{text}": {reason}'


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("plain", '"plain"'),
        ('a"b\\c', '"a\\"b\\\\c"'),
        ("tab\there\n", '"tab\\there\\n"'),
        ("\x00\x7f", '"\\x00\\x7f"'),
        ("caf\u00e9", '"caf\u00e9"'),
        ("\u00a0", '"\\u00a0"'),
        (b"\xff".decode("utf-8", "surrogateescape"), '"\\xff"'),
    ],
)
def test_go_quote(text: str, quoted: str) -> None:
    assert goparse.go_quote(text) == quoted


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("a,b", ["a", "b"]),
        ("a", ["a"]),
        ("[]", ["[]"]),
        ("a,,b,", ["a", "", "b", ""]),
        ('"a,b",c', ["a,b", "c"]),
        ('"a""b"', ['a"b']),
        ("x\ny", ["x"]),
        ("\nx", ["x"]),
        (" a , b", [" a ", " b"]),
        ('"multi\nline",z', ["multi\nline", "z"]),
    ],
)
def test_csv_record(text: str, fields: list[str]) -> None:
    assert goparse.read_csv_record(text) == fields


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('a"b', 'parse error on line 1, column 2: bare " in non-quoted field'),
        ('"ab', 'parse error on line 1, column 4: extraneous or missing " in quoted-field'),
        ('"a"b', 'parse error on line 1, column 4: extraneous or missing " in quoted-field'),
        ("\n", "EOF"),
    ],
)
def test_bad_csv_record(text: str, message: str) -> None:
    with pytest.raises(GoError) as info:
        goparse.read_csv_record(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ([], ""),
        ([""], ""),
        (["a", "b"], "a,b"),
        (["a,b"], '"a,b"'),
        (['q"'], '"q"""'),
        ([" x"], '" x"'),
        (["\\."], '"\\."'),
    ],
)
def test_csv_write(fields: list[str], text: str) -> None:
    assert goparse.write_csv_record(fields) == text


# -- pflag parsing -------------------------------------------------------------------------


def sample_flags() -> FlagSet:
    fs = FlagSet("sample")
    fs.add("port", INT, 8090, "A port.")
    fs.add("name", STRING, "grpc", "A name.")
    fs.add("enabled", BOOL, False, "A switch.")
    fs.add("on-by-default", BOOL, True, "A switch that starts on.")
    fs.add("timeout", DURATION, 3600.0, "A duration.")
    fs.add("qps", FLOAT32, 0.0, "A rate.")
    fs.add("protos", STRING_SLICE, ["x"], "A list.")
    fs.add("old-name", STRING, "", "Renamed.", deprecated="Use --name instead")
    fs.add("secret", STRING, "", "Not shown.", hidden=True)
    fs.add("go-bool", GO_BOOL, False, "A Go flag bool.")
    fs.add("go-size", GO_UINT64, 1800, "A Go flag uint64.")
    fs.add("cache_dir", STRING, "", "Registered with an underscore.")
    register_klog_flags(fs)
    fs.add("help", BOOL, False, "Help.", shorthand="h")
    return fs


PARSES: list[tuple[list[str], dict[str, Any], set[str]]] = [
    # (argv, expected values by dest, expected explicit names)
    ([], {"port": 8090, "name": "grpc", "enabled": False, "protos": ["x"]}, set()),
    (["--port=1234"], {"port": 1234}, {"port"}),
    (["--port", "1234"], {"port": 1234}, {"port"}),
    (["--port", "0x10"], {"port": 16}, {"port"}),
    (["--name", "--weird"], {"name": "--weird"}, {"name"}),  # the next word, whatever it is
    (["--name="], {"name": ""}, {"name"}),
    (["--enabled"], {"enabled": True}, {"enabled"}),
    (["--enabled=false"], {"enabled": False}, {"enabled"}),
    (["--on-by-default=false"], {"on_by_default": False}, {"on-by-default"}),
    (["--enabled", "false"], {"enabled": True}, {"enabled"}),  # "false" is positional
    (["--enabled=0", "--enabled=T"], {"enabled": True}, {"enabled"}),
    (["--timeout=100ms"], {"timeout": 0.1}, {"timeout"}),
    (["--timeout", "1h30m"], {"timeout": 5400.0}, {"timeout"}),
    (["--qps=75"], {"qps": 75.0}, {"qps"}),
    (["--protos=a,b"], {"protos": ["a", "b"]}, {"protos"}),
    (["--protos=a", "--protos=b,c"], {"protos": ["a", "b", "c"]}, {"protos"}),
    (["--protos="], {"protos": []}, {"protos"}),
    (["--protos=[]"], {"protos": ["[]"]}, {"protos"}),  # pflag does not read "[]" back
    (["--cache-dir=/x"], {"cache_dir": "/x"}, {"cache-dir"}),
    (["--cache_dir=/x"], {"cache_dir": "/x"}, {"cache-dir"}),
    (["--log_dir=/x"], {KLOG_PREFIX + "log_dir": "/x"}, {"log-dir"}),
    (
        ["--log_file=/y", "--log-file-max-size=0"],
        {KLOG_PREFIX + "log_file": "/y", KLOG_PREFIX + "log_file_max_size": 0},
        {"log-file", "log-file-max-size"},
    ),
    (["-v=3"], {KLOG_PREFIX + "v": 3}, {"v"}),
    (["-v", "3"], {KLOG_PREFIX + "v": 3}, {"v"}),
    (["-v3"], {KLOG_PREFIX + "v": 3}, {"v"}),
    (["--v=3"], {KLOG_PREFIX + "v": 3}, {"v"}),
    (["--v", "2"], {KLOG_PREFIX + "v": 2}, {"v"}),
    (["-hv5"], {"help": True, KLOG_PREFIX + "v": 5}, {"help", "v"}),
    (["-h"], {"help": True}, {"help"}),
    (["--help=false"], {"help": False}, {"help"}),
    (["--logtostderr=false"], {KLOG_PREFIX + "logtostderr": False}, {"logtostderr"}),
    (["--stderrthreshold=warning"], {KLOG_PREFIX + "stderrthreshold": 1}, {"stderrthreshold"}),
    (["--stderrthreshold=3"], {KLOG_PREFIX + "stderrthreshold": 3}, {"stderrthreshold"}),
    (
        ["--vmodule=server=5,proxy*=3,x=0"],
        {KLOG_PREFIX + "vmodule": (("server", 5), ("proxy*", 3))},
        {"vmodule"},
    ),
    (
        ["--log-backtrace-at=server.go:42"],
        {KLOG_PREFIX + "log_backtrace_at": ("server.go", 42)},
        {"log-backtrace-at"},
    ),
    (["--log-backtrace-at="], {KLOG_PREFIX + "log_backtrace_at": ("", 0)}, {"log-backtrace-at"}),
    (["--go-bool"], {"go_bool": True}, {"go-bool"}),
    (["--old-name=z"], {"old_name": "z"}, {"old-name"}),
    (["--secret=s"], {"secret": "s"}, {"secret"}),
    (["-test.v"], {}, set()),  # pflag leaves Go's test flags alone
]


@pytest.mark.parametrize(("argv", "values", "explicit"), PARSES, ids=repr)
def test_parse(argv: list[str], values: dict[str, Any], explicit: set[str]) -> None:
    result = sample_flags().parse(argv, environ={}, warn=lambda _: None)
    for dest, value in values.items():
        assert result.values[dest] == value, dest
    assert result.explicit == explicit


def test_positional_arguments() -> None:
    result = sample_flags().parse(["a", "--port=1", "-", "b", "--", "--name=x", "-v"], environ={})
    assert result.args == ("a", "-", "b", "--name=x", "-v")
    assert result.values["name"] == "grpc"
    assert result.explicit == {"port"}


def test_default_values_are_not_shared() -> None:
    fs = sample_flags()
    first = fs.parse(["--protos=y"], environ={})
    second = fs.parse([], environ={})
    assert first.values["protos"] == ["y"]
    assert second.values["protos"] == ["x"]


ERRORS = [
    (["--nope"], "unknown flag: --nope"),
    (["--nope=1"], "unknown flag: --nope"),
    (["--log_nope=1"], "unknown flag: --log_nope"),
    (["-x"], "unknown shorthand flag: 'x' in -x"),
    (["-mode=grpc"], "unknown shorthand flag: 'm' in -mode=grpc"),
    (["-hx"], "unknown shorthand flag: 'x' in -x"),
    (["--port"], "flag needs an argument: --port"),
    (["-v"], "flag needs an argument: 'v' in -v"),
    (["---port=1"], "bad flag syntax: ---port=1"),
    (["--=1"], "bad flag syntax: --=1"),
    (
        ["--port=abc"],
        'invalid argument "abc" for "--port" flag: strconv.ParseInt: parsing "abc": invalid syntax',
    ),
    (
        ["--port=99999999999999999999"],
        'invalid argument "99999999999999999999" for "--port" flag: strconv.ParseInt: parsing '
        '"99999999999999999999": value out of range',
    ),
    (
        ["--enabled=yes"],
        'invalid argument "yes" for "--enabled" flag: strconv.ParseBool: parsing "yes": '
        "invalid syntax",
    ),
    (["--go-bool=yes"], 'invalid argument "yes" for "--go-bool" flag: parse error'),
    (["--go-size=-1"], 'invalid argument "-1" for "--go-size" flag: parse error'),
    (
        ["--go-size=99999999999999999999"],
        'invalid argument "99999999999999999999" for "--go-size" flag: value out of range',
    ),
    (
        ["--timeout=5"],
        'invalid argument "5" for "--timeout" flag: time: missing unit in duration "5"',
    ),
    (
        ["--timeout=bad"],
        'invalid argument "bad" for "--timeout" flag: time: invalid duration "bad"',
    ),
    (
        ["--qps=x"],
        'invalid argument "x" for "--qps" flag: strconv.ParseFloat: parsing "x": invalid syntax',
    ),
    (
        ['--protos=a"b'],
        'invalid argument "a\\"b" for "--protos" flag: parse error on line 1, column 2: '
        'bare " in non-quoted field',
    ),
    (
        ["-v=x"],
        'invalid argument "x" for "-v, --v" flag: strconv.ParseInt: parsing "x": invalid syntax',
    ),
    (
        ["--v=1.5"],
        'invalid argument "1.5" for "-v, --v" flag: strconv.ParseInt: parsing "1.5": '
        "invalid syntax",
    ),
    (
        ["--stderrthreshold=LOUD"],
        'invalid argument "LOUD" for "--stderrthreshold" flag: strconv.ParseInt: parsing '
        '"LOUD": invalid syntax',
    ),
    (
        ["--vmodule=a"],
        'invalid argument "a" for "--vmodule" flag: syntax error: expect comma-separated list '
        "of filename=N",
    ),
    (
        ["--vmodule=a=-1"],
        'invalid argument "a=-1" for "--vmodule" flag: negative value for vmodule level',
    ),
    (
        ["--log-backtrace-at=nodot:3"],
        'invalid argument "nodot:3" for "--log-backtrace-at" flag: syntax error: expect '
        "file.go:234",
    ),
    (
        ["--log-backtrace-at=a.go:0"],
        'invalid argument "a.go:0" for "--log-backtrace-at" flag: negative or zero value for level',
    ),
]


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=repr)
def test_parse_error(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError) as info:
        sample_flags().parse(argv, environ={})
    assert str(info.value) == message


def test_deprecation_notice_after_successful_parse() -> None:
    notices: list[str] = []
    sample_flags().parse(["--old-name=a", "--old-name=b"], environ={}, warn=notices.append)
    assert notices == ["Flag --old-name has been deprecated, Use --name instead"] * 2
    notices.clear()
    with pytest.raises(FlagError):
        sample_flags().parse(["--old-name=a", "--nope"], environ={}, warn=notices.append)
    assert notices == []  # cobra prints the notices only when parsing succeeded


def test_deprecation_notice_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    sample_flags().parse(["--old-name=a"], environ={})
    assert capsys.readouterr().err == "Flag --old-name has been deprecated, Use --name instead\n"


def test_env_fallback() -> None:
    fs = FlagSet("env")
    fs.add("id", STRING, "random", "An ID.", env="THE_ID")
    assert fs.parse([], environ={}).values["id"] == "random"
    assert fs.parse([], environ={"THE_ID": ""}).values["id"] == "random"
    assert fs.parse([], environ={"THE_ID": "from-env"}).values["id"] == "from-env"
    result = fs.parse(["--id=from-flag"], environ={"THE_ID": "from-env"})
    assert result.values["id"] == "from-flag"
    assert result.explicit == {"id"}


def test_alias_shares_a_value() -> None:
    fs = FlagSet("alias")
    fs.add("new", STRING, "d", "New.")
    fs.add("old", STRING, "d", "Old.", dest="new", deprecated="Use --new instead")
    result = fs.parse(["--old=x"], environ={}, warn=lambda _: None)
    assert result.values["new"] == "x"
    assert result.explicit == {"old"}


def test_registration_errors() -> None:
    fs = FlagSet("dup")
    fs.add("a_b", STRING, "", "A.")
    with pytest.raises(ValueError, match="redefined"):
        fs.add("a-b", STRING, "", "Again.")
    with pytest.raises(ValueError, match="shorthand"):
        fs.add("c", STRING, "", "C.", shorthand="cc")


def test_usage_table() -> None:
    usages = sample_flags().flag_usages()
    lines = usages.splitlines()
    names = [
        line.split()[0] if line.lstrip().startswith("--") else line.split()[1] for line in lines
    ]
    assert names == sorted(names, key=lambda n: n.lstrip("-"))
    assert "--secret" not in usages and "--old-name" not in usages  # hidden, deprecated
    by_name = {line.split("--")[1].split()[0]: line for line in lines}
    assert by_name["port"].endswith("A port. (default 8090)")
    assert by_name["name"].endswith('A name. (default "grpc")')
    assert by_name["enabled"].endswith("A switch.")  # zero default not shown
    assert by_name["on-by-default"].endswith("(default true)")
    assert by_name["timeout"].endswith("(default 1h0m0s)")
    assert by_name["protos"].endswith("(default [x])")
    assert "--protos strings " in by_name["protos"]
    assert "--go-size uint " in by_name["go-size"]
    assert by_name["v"].startswith("  -v, --v Level ") and by_name["v"].endswith("(default 4)")
    assert by_name["help"].startswith("  -h, --help ")
    assert "--enabled " in by_name["enabled"] and "--enabled bool" not in by_name["enabled"]
    assert by_name["log-backtrace-at"].endswith("(default :0)")
    assert by_name["stderrthreshold"].endswith("(default 2)")
    assert "(default" not in by_name["alsologtostderrthreshold"]
    assert by_name["port"].index("A port.") == by_name["help"].index("Help.")  # one column
    assert command_usage("About.", "sample", sample_flags()).startswith(
        "About.\n\nUsage:\n  sample [flags]\n\nFlags:\n"
    )


# -- klog ----------------------------------------------------------------------------------


def test_verbosity_levels() -> None:
    assert V(0) == logging.INFO
    assert V(5) == logging.DEBUG
    assert [V(n) for n in range(6)] == [20, 18, 16, 14, 12, 10]
    assert V(100) == 1
    assert V(-3) == logging.INFO


def _record(
    level: int,
    msg: str,
    filename: str = "/src/pkg/server.py",
    line: int = 42,
    created: float = 1_700_000_000.123456,
) -> logging.LogRecord:
    record = logging.LogRecord("t", level, filename, line, msg, None, None)
    record.created = created
    return record


def test_formatter_header() -> None:
    text = KlogFormatter().format(_record(logging.WARNING, "hello"))
    head, message = text.split("] ", 1)
    assert message == "hello"
    assert head[0] == "W"
    assert head.endswith(" server.py:42")
    assert len(head.split(" ")[1]) == len("hh:mm:ss.uuuuuu")
    assert head.split(".")[1].startswith("123456")
    dirs = KlogFormatter(add_dir_header=True).format(_record(logging.INFO, "x"))
    assert " pkg/server.py:42] x" in dirs
    assert KlogFormatter(skip_headers=True).format(_record(logging.ERROR, "bare")) == "bare"
    severities = [
        KlogFormatter().format(_record(lv, "m"))[0]
        for lv in (
            V(3),
            logging.DEBUG,
            logging.INFO,
            logging.WARNING,
            logging.ERROR,
            logging.CRITICAL,
        )
    ]
    assert severities == ["I", "I", "I", "W", "E", "F"]


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


def _emit(opts: KlogOptions, records: list[logging.LogRecord]) -> str:
    err = io.StringIO()
    setup_logging(opts, program="test", stderr=err)
    root = logging.getLogger()
    for record in records:
        if record.levelno >= root.level:
            root.handle(record)
    return err.getvalue()


@pytest.mark.usefixtures("root_logger")
@pytest.mark.parametrize(
    ("opts", "shown"),
    [
        (KlogOptions(), ["info", "v2", "v4", "warn", "err"]),
        (KlogOptions(v=0), ["info", "warn", "err"]),
        (KlogOptions(v=5), ["info", "v2", "v4", "debug", "warn", "err"]),
        (KlogOptions(v=0, vmodule=(("serv*", 4),)), ["info", "v2", "v4", "warn", "err"]),
        (KlogOptions(v=0, vmodule=(("other", 9),)), ["info", "warn", "err"]),
        (KlogOptions(legacy_stderr_threshold_behavior=False), ["err"]),
        (KlogOptions(legacy_stderr_threshold_behavior=False, stderrthreshold=1), ["warn", "err"]),
    ],
)
def test_stderr_filtering(opts: KlogOptions, shown: list[str]) -> None:
    records = [
        _record(level, name)
        for level, name in (
            (logging.INFO, "info"),
            (V(2), "v2"),
            (V(4), "v4"),
            (logging.DEBUG, "debug"),
            (logging.WARNING, "warn"),
            (logging.ERROR, "err"),
        )
    ]
    output = _emit(opts, records)
    assert [line.split("] ", 1)[1] for line in output.splitlines()] == shown


@pytest.mark.usefixtures("root_logger")
def test_log_file_and_stderr_threshold(tmp_path: Path) -> None:
    log_file = tmp_path / "proxy.log"
    opts = KlogOptions(logtostderr=False, log_file=str(log_file))
    output = _emit(opts, [_record(logging.INFO, "to file"), _record(logging.ERROR, "both")])
    content = log_file.read_text()
    assert content.startswith("Log file created at: ")
    assert "] to file\n" in content and "] both\n" in content
    assert output.count("\n") == 1 and output.endswith("] both\n")
    also = KlogOptions(
        logtostderr=False,
        log_file=str(log_file),
        skip_log_headers=True,
        alsologtostderr=True,
        alsologtostderrthreshold=1,
    )
    output = _emit(also, [_record(logging.INFO, "quiet"), _record(logging.WARNING, "loud")])
    assert output.endswith("] loud\n") and "quiet" not in output


@pytest.mark.usefixtures("root_logger")
def test_log_file_max_size_starts_afresh(tmp_path: Path) -> None:
    log_file = tmp_path / "small.log"
    opts = KlogOptions(
        logtostderr=False,
        log_file=str(log_file),
        log_file_max_size=1,
        skip_log_headers=True,
        skip_headers=True,
    )
    chunk = "x" * 400_000
    _emit(opts, [_record(logging.INFO, f"{i}{chunk}") for i in range(4)])
    lines = log_file.read_text().splitlines()
    # The third entry would have taken the file to 1 MiB, so it starts a fresh file.
    assert [line[0] for line in lines] == ["2", "3"]


@pytest.mark.usefixtures("root_logger")
def test_log_dir_file_name(tmp_path: Path) -> None:
    opts = KlogOptions(logtostderr=False, log_dir=str(tmp_path))
    _emit(opts, [_record(logging.INFO, "in dir")])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "mytest.INFO" not in names and "test.INFO" in names
    log_name = next(n for n in names if n != "test.INFO")
    assert log_name.startswith("test.") and ".log.INFO." in log_name
    assert "] in dir" in (tmp_path / "test.INFO").read_text()


@pytest.mark.usefixtures("root_logger")
def test_backtrace_at() -> None:
    opts = KlogOptions(log_backtrace_at=("server.py", 42))
    output = _emit(
        opts, [_record(logging.INFO, "here"), _record(logging.INFO, "elsewhere", line=43)]
    )
    assert "] here\n" in output and "Stack" not in output.split("] elsewhere")[1]
    assert output.count('File "') >= 1


def test_klog_options_from_flags() -> None:
    fs = FlagSet("k")
    register_klog_flags(fs)
    result = fs.parse(["-v=2", "--logtostderr=false", "--log_file=/tmp/x"], environ={})
    opts = result.build(KlogOptions, KLOG_PREFIX)
    assert (opts.v, opts.logtostderr, opts.log_file) == (2, False, "/tmp/x")
    assert opts.stderrthreshold == 2 and opts.log_file_max_size == 1800
