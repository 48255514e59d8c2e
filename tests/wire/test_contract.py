"""The wire contract (konnectivity_fast/wire/contract.py): the service paths against our
.proto, the agent identifiers both programs parse (upstream's proto/header/header.go and
pkg/server/backend_manager.go), and extension negotiation (``kf-capabilities``)."""

from __future__ import annotations

import pytest

from konnectivity_fast.metrics import server as server_metrics
from konnectivity_fast.wire import contract
from konnectivity_fast.wire.contract import (
    CONNECT_METHOD,
    CONNECT_PATH,
    ERR_AGENT_DIAL_LIMIT,
    ERR_DESTINATION_NOT_ALLOWED,
    IMPLEMENTED_EXTENSIONS,
    MAX_CAPABILITIES_LENGTH,
    MAX_EXTENSION_TOKEN_LENGTH,
    MD_CAPABILITIES,
    NO_EXTENSIONS,
    PROXY_METHOD,
    PROXY_PATH,
    AgentIdentifiers,
    AgentMetadataError,
    Extension,
    advertised_extensions,
    agent_from_metadata,
    capabilities_metadata,
    check_extensions,
    is_refusal,
    negotiate_extensions,
    parse_agent_identifiers,
)
from tests.support.oracle import pb2

# Tokens no program offers by default: negotiation is tested with tokens of the test's own.
TEST = "test.v1"
OTHER = "other.v2"


# --- service paths --------------------------------------------------------------------------


def test_paths_are_the_protos_methods() -> None:
    services = pb2().DESCRIPTOR.services_by_name
    paths = {
        f"/{service.full_name}/{method.name}"
        for service in services.values()
        for method in service.methods
    }
    assert paths == {PROXY_PATH, CONNECT_PATH}
    assert PROXY_PATH == "/ProxyService/Proxy"  # what konnectivity-client dials
    assert CONNECT_PATH == "/AgentService/Connect"  # proto/agent/agent_grpc.pb.go


def test_metric_method_labels_are_the_methods() -> None:
    # metrics/ sits beside wire/ and may not import it: its labels are checked here.
    assert (server_metrics.PROXY, server_metrics.CONNECT) == (PROXY_METHOD, CONNECT_METHOD)


# --- agent identifiers ----------------------------------------------------------------------


def test_identifiers_reference_example() -> None:
    parsed = parse_agent_identifiers(
        "host=node1&ipv4=1.2.3.4&ipv6=::1&cidr=10.0.0.0/8&default-route=true"
    )
    assert parsed == AgentIdentifiers(
        ipv4=("1.2.3.4",), ipv6=("::1",), host=("node1",), cidr=("10.0.0.0/8",), default_route=True
    )


def test_identifiers_accumulate_unescape_and_ignore_unknown_keys() -> None:
    parsed = parse_agent_identifiers("host=a&uid=x&host=b%2Ec&weird=1&ipv6=fe80%3A%3A1&host=c+d")
    assert parsed == AgentIdentifiers(host=("a", "b.c", "c d"), ipv6=("fe80::1",))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("t", True),
        ("T", True),
        ("true", True),
        ("TRUE", True),
        ("True", True),
        ("yes", False),
        ("0", False),
        ("false", False),
        ("", False),
        ("tRUE", False),
    ],
)
def test_default_route_is_a_go_bool(value: str, expected: bool) -> None:
    assert parse_agent_identifiers(f"default-route={value}").default_route is expected


def test_default_route_reads_only_the_first_value() -> None:
    assert not parse_agent_identifiers("default-route=false&default-route=true").default_route
    assert parse_agent_identifiers("default-route=true&default-route=false").default_route


def test_empty_identifiers() -> None:
    assert parse_agent_identifiers("") == AgentIdentifiers()
    assert parse_agent_identifiers("&&") == AgentIdentifiers()


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("host=a;b", "invalid semicolon separator in query"),
        ("host=%zz", 'invalid URL escape "%zz"'),
        ("host=ab%4", 'invalid URL escape "%4"'),
        ("host=%", 'invalid URL escape "%"'),
        ("h%XYost=a", 'invalid URL escape "%XY"'),
        # Go keeps the first escape error, but a semicolon error replaces any earlier one.
        ("host=%zz&ipv4=%yy", 'invalid URL escape "%zz"'),
        ("host=%zz&a;b", "invalid semicolon separator in query"),
    ],
)
def test_identifier_parse_errors(value: str, error: str) -> None:
    with pytest.raises(AgentMetadataError) as info:
        parse_agent_identifiers(value)
    assert str(info.value) == f"fail to parse url encoded string: {error}"


def test_agent_metadata() -> None:
    assert agent_from_metadata(["a1"], []) == ("a1", AgentIdentifiers())
    assert agent_from_metadata([""], ["host=n"]) == ("", AgentIdentifiers(host=("n",)))
    with pytest.raises(
        AgentMetadataError, match=r"^expected one agent ID in the context, got \[\]$"
    ):
        agent_from_metadata([], [])
    with pytest.raises(AgentMetadataError, match=r"got \[a b\]$"):
        agent_from_metadata(["a", "b"], [])
    with pytest.raises(
        AgentMetadataError,
        match=r"^expected at most one set of agent "
        r"identifiers in the context, got \[x y\]$",
    ):
        agent_from_metadata(["a"], ["x", "y"])


def test_agent_id_is_checked_before_identifiers() -> None:
    with pytest.raises(AgentMetadataError, match="agent ID"):
        agent_from_metadata([], ["x", "y"])


# --- extensions -----------------------------------------------------------------------------


def md(*values: str) -> list[tuple[str, str]]:
    return [("agentid", "a"), *((MD_CAPABILITIES, value) for value in values)]


def test_implemented_extensions_are_valid_tokens() -> None:
    assert check_extensions(Extension) == IMPLEMENTED_EXTENSIONS == frozenset(Extension)


@pytest.mark.parametrize(
    "token",
    ["", "Flow.v1", "a,b", "a b", " a", ".a", "a=b", "x" * (MAX_EXTENSION_TOKEN_LENGTH + 1)],
)
def test_offered_tokens_must_be_advertisable(token: str) -> None:
    with pytest.raises(ValueError, match="invalid extension token"):
        check_extensions([TEST, token])


def test_longest_token_is_accepted() -> None:
    token = "x" * MAX_EXTENSION_TOKEN_LENGTH
    assert check_extensions([token]) == {token}
    assert advertised_extensions(md(token)) == {token}


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ((), set()),
        (("",), set()),
        ((TEST,), {TEST}),
        ((f" {TEST} ,\t{OTHER}\t",), {TEST, OTHER}),  # spaces and tabs trimmed
        ((f"{TEST},,{TEST},",), {TEST}),  # empty items and repeats
        ((TEST, OTHER), {TEST, OTHER}),  # several values of the key
        ((f"{TEST},Bad.v1,a b,x=y,{'y' * 40}",), {TEST}),  # malformed tokens ignored
        ((f"future.v9,{TEST}",), {"future.v9", TEST}),  # unknown but well formed: kept
    ],
)
def test_advertised_extensions(values: tuple[str, ...], expected: set[str]) -> None:
    assert advertised_extensions(md(*values)) == expected


def test_other_keys_are_not_read() -> None:
    assert advertised_extensions([("kf-capability", TEST), ("KF-CAPABILITIES", TEST)]) == set()


def test_advertisement_length_is_bounded() -> None:
    exact = TEST + "," + " " * (MAX_CAPABILITIES_LENGTH - len(TEST) - 1)
    assert advertised_extensions(md(exact)) == {TEST}
    assert advertised_extensions(md(exact[:-1], "b")) == {TEST, "b"}  # the total counts
    # One byte more, in one value or over several: ignored as a whole, never cut.
    assert advertised_extensions(md(exact + " ")) == set()
    assert advertised_extensions(md(exact, "b")) == set()


@pytest.mark.parametrize(
    ("advertised", "offered", "expected"),
    [
        ((TEST, OTHER), {TEST}, {TEST}),
        ((TEST,), {OTHER}, set()),
        ((TEST,), set(), set()),
        ((), {TEST}, set()),
        ((f"{OTHER},{TEST}",), {TEST, OTHER, "third.v1"}, {TEST, OTHER}),
    ],
)
def test_negotiate_is_the_intersection(
    advertised: tuple[str, ...], offered: set[str], expected: set[str]
) -> None:
    assert negotiate_extensions(md(*advertised), frozenset(offered)) == expected


def test_capabilities_metadata() -> None:
    assert capabilities_metadata(NO_EXTENSIONS) == []  # nothing to say: no key at all
    assert capabilities_metadata(frozenset({TEST, OTHER})) == [(MD_CAPABILITIES, f"{OTHER},{TEST}")]
    # What one side writes, the other reads back.
    offered = frozenset({TEST, OTHER})
    assert negotiate_extensions(capabilities_metadata(offered), offered) == offered


def test_module_exports_exist() -> None:
    assert all(hasattr(contract, name) for name in contract.__all__)


def test_node_to_cp_refusals_are_told_from_failures() -> None:
    """The agent retries a failed agent-initiated dial on another server, never a refusal."""
    assert is_refusal(ERR_DESTINATION_NOT_ALLOWED.format(address="127.0.0.1:2379"))
    assert is_refusal(ERR_AGENT_DIAL_LIMIT.format(limit=1000))
    assert not is_refusal("dial tcp 127.0.0.1:6443: connect: connection refused")
    assert not is_refusal("dial tcp 10.0.0.1:6443: i/o timeout")
    assert not is_refusal("")
