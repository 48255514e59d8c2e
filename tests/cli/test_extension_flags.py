"""Our extensions' flags (cli/extensions.py): in both programs, marked as ours in their
help, off by default (the programs then offer no extension and behave as upstream's)."""

from __future__ import annotations

import pytest

from konnectivity_fast.cli import agent_options, server_options
from konnectivity_fast.cli.extensions import (
    AGENT_EXTENSION_FLAGS,
    EXTENSION_FLAGS,
    EXTENSION_MARK,
    SERVER_EXTENSION_FLAGS,
    check_workers,
    offered_extensions,
    offered_server_extensions,
)
from konnectivity_fast.cli.node_to_cp import NODE_TO_CP_SERVER_FLAGS
from konnectivity_fast.wire.contract import NO_EXTENSIONS, Extension

from . import read_golden

PROGRAMS = [(server_options, "proxy-server.txt"), (agent_options, "proxy-agent.txt")]
# Each program's own extension flags, beside the ones both have.
OWN = {
    "proxy-server.txt": SERVER_EXTENSION_FLAGS + NODE_TO_CP_SERVER_FLAGS,
    "proxy-agent.txt": AGENT_EXTENSION_FLAGS,
}


@pytest.mark.parametrize(("options", "golden"), PROGRAMS, ids=["server", "agent"])
def test_extension_flags_are_ours_and_marked(options: object, golden: str) -> None:
    flags = {f.name: f for f in options.build_flagset()}  # type: ignore[attr-defined]
    upstream = {row[0] for row in read_golden(golden)}
    ours = {name for name, flag in flags.items() if flag.extension}
    assert ours == {name for name, *_ in EXTENSION_FLAGS + OWN[golden]}
    assert not ours & upstream
    for name in ours:
        assert flags[name].help.startswith(EXTENSION_MARK)
        assert not flags[name].hidden


@pytest.mark.parametrize(("options", "golden"), PROGRAMS, ids=["server", "agent"])
def test_no_extension_is_offered_by_default(options: object, golden: str) -> None:
    parsed = options.parse_args([], environ={})  # type: ignore[attr-defined]
    assert offered_extensions(parsed.options) == NO_EXTENSIONS


@pytest.mark.parametrize(("options", "golden"), PROGRAMS, ids=["server", "agent"])
def test_flow_control_flag_offers_flow(options: object, golden: str) -> None:
    parsed = options.parse_args(  # type: ignore[attr-defined]
        ["--enable-tunnel-flow-control"], environ={}
    )
    assert offered_extensions(parsed.options) == {Extension.FLOW}


def test_advertise_address_offers_server_endpoints() -> None:
    parsed = server_options.parse_args(["--agent-advertise-address=10.0.0.5:8091"], environ={})
    assert offered_server_extensions(parsed.options) == {Extension.SERVER_ENDPOINTS}
    both = server_options.parse_args(
        ["--agent-advertise-address=lb:8141", "--enable-tunnel-flow-control"], environ={}
    )
    assert offered_server_extensions(both.options) == {Extension.SERVER_ENDPOINTS, Extension.FLOW}
    plain = server_options.parse_args([], environ={})
    assert offered_server_extensions(plain.options) == NO_EXTENSIONS


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers=0"], "--workers must be between 1 and 64, got 0"),
        (["--workers=65"], "--workers must be between 1 and 64, got 65"),
        (
            ["--workers=2", "--agent-advertise-address=10.0.0.5:8091"],
            "--agent-advertise-address cannot be used with --workers above 1",
        ),
        (
            ["--workers=2", "--enable-peer-forwarding"],
            "--enable-peer-forwarding cannot be used with --workers above 1",
        ),
    ],
)
def test_workers_flag_is_checked(args: list[str], error: str) -> None:
    parsed = server_options.parse_args(args, environ={})
    assert check_workers(parsed.options) == error


def test_workers_flag_defaults_to_one_process() -> None:
    assert server_options.parse_args([], environ={}).options.workers == 1
    parsed = server_options.parse_args(["--workers=4", "--dial-balance=least-tunnels"], environ={})
    assert (parsed.options.workers, check_workers(parsed.options)) == (4, None)
