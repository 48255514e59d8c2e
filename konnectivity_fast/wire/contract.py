"""The wire contract: every name and text that proxy-server, proxy-agent and frontends must
agree on, besides the Packet messages themselves (``packets``). Upstream keeps the same
facts in ``proto/header/header.go`` and ``pkg/server/proxystrategies``; here cli/,
tunnel/, server/ and agent/ import them and keep no copy of their own.

- the gRPC method paths of the two services;
- request and response metadata keys (lowercase: HTTP/2 carries them so) and the
  ``Bearer `` prefix of the agent's token;
- agent identifiers (``agentidentifiers``): the agent's check of its flag and the server's
  reading of the metadata, both over one port of Go's ``url.ParseQuery`` (``gotext``);
- the proxy strategy names (``--proxy-strategies``) and frontend mode names (``--mode``);
- ours, beyond upstream: the dial-balancing names (``DialBalance``) and the admin port's
  tunnel listing (``ADMIN_TUNNELS_PATH``, its query parameters and sort keys), which the
  programs serve and ``konnectivity-fast tunnels`` reads;
- error texts that one program writes and the other reads or passes on. Texts only one
  program produces stay with it (the server's answers are in ``tunnel/replies.py``).
- extension negotiation for features beyond upstream (below).

Extension negotiation
---------------------
An extension is a feature beyond upstream's protocol, named by a token (``flow.v1``).
What each program *offers* is configuration: its flags (cli/extensions.py; none by
default) or a constructor argument; ``IMPLEMENTED_EXTENSIONS`` is every member of
``Extension``, what this package can offer. A client (our agent on
``Connect``, our frontend clients on ``Proxy``) advertises its offer in the request
metadata key ``kf-capabilities``, tokens joined by commas. Our server answers with the
subset it offers too, under the same key, in the response headers that carry
``serverid``/``servercount`` (Connect) or in the Proxy stream's response headers. The
client intersects that answer with its own offer. Rules:

- nothing is sent when there is nothing to say: a client that offers nothing sends no
  ``kf-capabilities``, and the server sends it only for a non-empty accepted subset, so an
  upstream peer, which advertises nothing and ignores keys it does not know (grpc-go
  passes unknown metadata through), sees upstream's headers and nothing else;
- an extension's packets, headers or metrics are used only on a stream whose negotiated
  set holds it (``AgentClient.extensions`` on the agent, ``Backend.extensions`` and
  ``Frontend.extensions`` on the server);
- parsing never fails: unknown or malformed tokens are ignored, spaces around tokens are
  trimmed, and an advertisement longer than ``MAX_CAPABILITIES_LENGTH`` is ignored as a
  whole. Advertising nothing is always safe: the stream then speaks upstream's protocol.

Invariants: nothing here does I/O or imports anything above wire/.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeAlias

from konnectivity_fast.wire.gotext import go_slice, parse_query

__all__ = [
    "ADMIN_TUNNELS_PATH",
    "AGENT_IDENTIFIER_TYPES",
    "AGENT_SERVICE",
    "BEARER_PREFIX",
    "CONNECT_METHOD",
    "CONNECT_PATH",
    "ERR_AGENT_DIAL_LIMIT",
    "ERR_DESTINATION_NOT_ALLOWED",
    "ERR_IO_TIMEOUT",
    "ERR_NO_PROXY_STRATEGIES",
    "ERR_TOO_MANY_OPEN_FILES",
    "ERR_UNMARSHAL",
    "ERR_UNRECOGNIZED_CONNECT_ID",
    "IMPLEMENTED_EXTENSIONS",
    "MAX_CAPABILITIES_LENGTH",
    "MAX_EXTENSION_TOKEN_LENGTH",
    "MD_AGENT_ID",
    "MD_AGENT_IDENTIFIERS",
    "MD_AUTHORIZATION",
    "MD_CAPABILITIES",
    "MD_SERVER_COUNT",
    "MD_SERVER_ID",
    "NO_EXTENSIONS",
    "PROXY_METHOD",
    "PROXY_PATH",
    "PROXY_SERVICE",
    "AgentIdentifiers",
    "AgentMetadataError",
    "DialBalance",
    "Extension",
    "ExtensionSet",
    "FrontendMode",
    "IdentifierType",
    "ProxyStrategy",
    "TunnelQueryParam",
    "TunnelSort",
    "advertised_extensions",
    "agent_from_metadata",
    "capabilities_metadata",
    "check_extensions",
    "decode_agent_identifiers",
    "is_refusal",
    "negotiate_extensions",
    "parse_agent_identifiers",
    "parse_proxy_strategies",
    "unmarshal_error",
]

# --- services -----------------------------------------------------------------------------

# Our .proto (konnectivity.proto, beside this module) declares no package, so the paths
# have no package prefix, as upstream's.
PROXY_SERVICE = "ProxyService"  # frontends: kube-apiserver's konnectivity-client
AGENT_SERVICE = "AgentService"  # agents
PROXY_METHOD = "Proxy"
CONNECT_METHOD = "Connect"
PROXY_PATH = f"/{PROXY_SERVICE}/{PROXY_METHOD}"
CONNECT_PATH = f"/{AGENT_SERVICE}/{CONNECT_METHOD}"

# --- metadata keys ------------------------------------------------------------------------

# Upstream spells the first five in mixed case (proto/header/header.go); gRPC metadata
# keys are case-insensitive and HTTP/2 sends them lowercase, which is what peers see.
MD_AGENT_ID = "agentid"  # Connect request: exactly one, possibly empty
MD_AGENT_IDENTIFIERS = "agentidentifiers"  # Connect request: at most one
MD_AUTHORIZATION = "authorization"  # Connect request: "Bearer <token>" with token auth
MD_SERVER_ID = "serverid"  # Connect response headers: exactly one
MD_SERVER_COUNT = "servercount"  # Connect response headers: exactly one, decimal
MD_CAPABILITIES = "kf-capabilities"  # ours: extension negotiation (module docstring)
# RFC 6750 section 2.1, as upstream's AuthenticationTokenContextSchemePrefix.
BEARER_PREFIX = "Bearer "

# --- shared error texts -------------------------------------------------------------------

# CLOSE_RSP error for a connectID the receiver does not know: upstream's agent sends it
# for DATA to an unknown connection; our server for a frontend's foreign connectID.
ERR_UNRECOGNIZED_CONNECT_ID = "unrecognized connectID"
# grpc-go's status message (INTERNAL) when a received message does not decode; both
# programs end the stream with it.
ERR_UNMARSHAL = "grpc: failed to unmarshal the received message"
# Go's dial error texts that the agent writes into DIAL_RSP and the server classifies by
# substring into an HTTP-CONNECT status (504 and 503), as upstream's server does.
ERR_IO_TIMEOUT = "i/o timeout"
ERR_TOO_MANY_OPEN_FILES = "too many open files"
# pkg/server/proxystrategies ParseProxyStrategies, for a list with no name in it.
ERR_NO_PROXY_STRATEGIES = "proxy strategies cannot be empty"
# node-to-cp.v1 (docs/node-to-control-plane.md): a server's DIAL_RSP errors when it refuses
# an agent-initiated dial (its allow-list, its per-agent cap) rather than fails it. The
# agent never retries a refusal on another server: they share the configuration.
ERR_DESTINATION_NOT_ALLOWED = 'destination "{address}" not allowed'
ERR_AGENT_DIAL_LIMIT = "too many agent-initiated connections (limit {limit})"
_REFUSAL_ENDS = ('" not allowed',)
_REFUSAL_STARTS = ("too many agent-initiated connections",)


def is_refusal(error: str) -> bool:
    """Whether a node-to-cp.v1 DIAL_RSP error is one of the refusals above."""
    return error.endswith(_REFUSAL_ENDS) or error.startswith(_REFUSAL_STARTS)


def unmarshal_error(exc: Exception) -> str:
    """The status message for a message that did not decode."""
    return f"{ERR_UNMARSHAL}: {exc}"


# --- strategies and modes -----------------------------------------------------------------


class ProxyStrategy(StrEnum):
    """The ``--proxy-strategies`` names (case-sensitive), as pkg/server/proxystrategies.
    Each has a backend manager in ``tunnel/backends.py``."""

    DEFAULT = "default"
    DEST_HOST = "destHost"
    DEFAULT_ROUTE = "defaultRoute"


def parse_proxy_strategies(text: str) -> list[ProxyStrategy]:
    """``--proxy-strategies`` in order, empty items skipped (duplicates kept), as
    ParseProxyStrategies; raises ``ValueError`` with upstream's message."""
    result = []
    for item in text.split(","):
        if not item:
            continue
        try:
            result.append(ProxyStrategy(item))
        except ValueError:
            raise ValueError(f"unknown proxy strategy: {item}") from None
    if not result:
        raise ValueError(ERR_NO_PROXY_STRATEGIES)
    return result


class FrontendMode(StrEnum):
    """The frontend protocol (``--mode``)."""

    GRPC = "grpc"
    HTTP_CONNECT = "http-connect"


class DialBalance(StrEnum):
    """How a strategy chooses among its candidate agent streams for a dial (ours: the
    proxy-server's ``--dial-balance``, cli/extensions.py).
    ``RANDOM`` is upstream's rule and the default; ``LEAST_TUNNELS`` picks a candidate
    with the fewest open tunnels (``tunnel/balance.py``)."""

    RANDOM = "random"
    LEAST_TUNNELS = "least-tunnels"


# --- the admin port's tunnel listing (ours) -------------------------------------------------

# Both programs serve it on their admin port (plain HTTP, as upstream's admin port), never
# on an agent-facing or frontend port; ``tunnel/listing.py`` builds it.
ADMIN_TUNNELS_PATH = "/debug/tunnels"


class TunnelQueryParam(StrEnum):
    """The listing's query parameters. ``AGENT`` filters on the server, ``SERVER`` on the
    agent; each program refuses the other's."""

    SORT = "sort"
    LIMIT = "limit"
    AGENT = "agent"
    SERVER = "server"


class TunnelSort(StrEnum):
    """The listing's orders: most bytes moved first, or oldest first."""

    BYTES = "bytes"
    AGE = "age"


# --- agent identifiers --------------------------------------------------------------------


class IdentifierType(StrEnum):
    """The keys of the ``agentidentifiers`` query (header.go ``IdentifierType``)."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"
    HOST = "host"
    CIDR = "cidr"
    UID = "uid"  # defined upstream, refused by its agent's flag check, unused by its server
    DEFAULT_ROUTE = "default-route"


# What the agent accepts in --agent-identifiers (cmd/agent/app/options
# validateAgentIdentifiers).
AGENT_IDENTIFIER_TYPES = frozenset(IdentifierType) - {IdentifierType.UID}
# Go's strconv.ParseBool spellings of true (its false spellings, and anything else, are
# simply "not true" here, as upstream ignores the parse error).
_GO_TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})


class AgentMetadataError(ValueError):
    """An agent's ``agentid``/``agentidentifiers`` metadata is unusable. ``str()`` is
    upstream's exact error text (returned to the agent as status UNKNOWN)."""


@dataclass(frozen=True, slots=True)
class AgentIdentifiers:
    """What an agent says it can reach (header.go ``Identifiers``). ``cidr`` is parsed but
    no strategy uses it, as upstream."""

    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    cidr: tuple[str, ...] = ()
    default_route: bool = False


def decode_agent_identifiers(text: str) -> dict[str, list[str]]:
    """The agent's check of ``--agent-identifiers`` (cmd/agent/app/options
    validateAgentIdentifiers): the query decoded, keys limited to
    ``AGENT_IDENTIFIER_TYPES``, values unchecked. Raises ``ValueError`` with Go's message:
    the query's error, else the first unknown key."""
    decoded, error = parse_query(text)
    if error is not None:
        raise ValueError(error)
    for key in decoded:  # Go walks a map here, so with several bad keys the pick varies
        if key not in AGENT_IDENTIFIER_TYPES:
            raise ValueError(f"unknown address type: {key}")
    return decoded


def parse_agent_identifiers(value: str) -> AgentIdentifiers:
    """The server's reading of an ``agentidentifiers`` value (header.go
    ``GenAgentIdentifiers``): unknown keys (``uid`` included) are ignored, repeated known
    keys accumulate. Raises ``AgentMetadataError`` with upstream's message when the query
    does not parse."""
    values, error = parse_query(value)
    if error is not None:
        raise AgentMetadataError(f"fail to parse url encoded string: {error}")
    default_route = values.get(IdentifierType.DEFAULT_ROUTE, [""])[0] in _GO_TRUE
    return AgentIdentifiers(
        ipv4=tuple(values.get(IdentifierType.IPV4, ())),
        ipv6=tuple(values.get(IdentifierType.IPV6, ())),
        host=tuple(values.get(IdentifierType.HOST, ())),
        cidr=tuple(values.get(IdentifierType.CIDR, ())),
        default_route=default_route,
    )


def agent_from_metadata(
    agent_ids: Sequence[str], identifiers: Sequence[str]
) -> tuple[str, AgentIdentifiers]:
    """Validate a ``Connect`` call's ``agentid`` values (exactly one, possibly empty) and
    ``agentidentifiers`` values (at most one) in upstream's order (pkg/server/
    backend_manager.go ``NewBackend``). Raises ``AgentMetadataError`` with upstream's
    message."""
    if len(agent_ids) != 1:
        raise AgentMetadataError(f"expected one agent ID in the context, got {go_slice(agent_ids)}")
    if len(identifiers) > 1:
        raise AgentMetadataError(
            "expected at most one set of agent identifiers in the context, got "
            + go_slice(identifiers)
        )
    parsed = parse_agent_identifiers(identifiers[0]) if identifiers else AgentIdentifiers()
    return agent_ids[0], parsed


# --- extensions ---------------------------------------------------------------------------


class Extension(StrEnum):
    """The extensions this package implements, by wire token, one line each. A token
    matches ``check_extensions``'s grammar. A program offers those its flags enable
    (cli/extensions.py; none by default)."""

    #: Per-tunnel credit flow control on an agent stream (docs/flow-control.md).
    FLOW = "flow.v1"
    #: Servers list every replica's direct address for agents (wire/endpoints.py).
    SERVER_ENDPOINTS = "server-endpoints.v1"
    #: Agents dial allow-listed control-plane destinations through the server (docs/node-to-control-plane.md).
    NODE_TO_CP = "node-to-cp.v1"


# A set of extension tokens. ``Extension`` members are strings, so
# ``Extension.X in extensions`` works whether the set came from configuration or from a
# peer's header.
ExtensionSet: TypeAlias = frozenset[str]
NO_EXTENSIONS: ExtensionSet = frozenset()
IMPLEMENTED_EXTENSIONS: ExtensionSet = frozenset(Extension)

# An advertisement is a few tokens of about ten bytes; 256 bytes holds two dozen and
# bounds what a peer can make us split and compare on each stream. A longer one is
# ignored whole rather than cut, so that no token is ever half read.
MAX_CAPABILITIES_LENGTH = 256
# Long enough for a name and a version ("server-endpoints.v1" is 19), short enough to
# stay far below MAX_CAPABILITIES_LENGTH.
MAX_EXTENSION_TOKEN_LENGTH = 32
# Lowercase letters, digits, '.', '-' and '_', starting with a letter or digit: no comma,
# no space, nothing HTTP/2 header values would refuse.
_TOKEN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# What may surround a token in a list (RFC 9110 section 5.6.1's optional whitespace).
_OWS = " \t"


def _is_token(text: str) -> bool:
    return len(text) <= MAX_EXTENSION_TOKEN_LENGTH and _TOKEN.fullmatch(text) is not None


def check_extensions(tokens: Iterable[str]) -> ExtensionSet:
    """An offered set from configuration; raises ``ValueError`` naming a token that could
    not be advertised (a programming error, caught when the program is built)."""
    offered = frozenset(tokens)
    for token in sorted(offered):
        if not _is_token(token):
            raise ValueError(f"invalid extension token {token!r}")
    return offered


def advertised_extensions(metadata: Iterable[tuple[str, str]]) -> ExtensionSet:
    """The tokens a peer advertised under ``kf-capabilities`` (every value of the key,
    each a comma-separated list). Never raises: see the module docstring."""
    values = [value for key, value in metadata if key == MD_CAPABILITIES]
    if sum(len(value) for value in values) > MAX_CAPABILITIES_LENGTH:
        return NO_EXTENSIONS
    tokens = (item.strip(_OWS) for value in values for item in value.split(","))
    return frozenset(token for token in tokens if _is_token(token))


def negotiate_extensions(
    metadata: Iterable[tuple[str, str]], offered: ExtensionSet
) -> ExtensionSet:
    """The extensions both sides support: those the peer advertised in ``metadata`` that
    we offer. The server applies it to request metadata (and echoes the result with
    ``capabilities_metadata``), a client to the response headers."""
    return advertised_extensions(metadata) & offered if offered else NO_EXTENSIONS


def capabilities_metadata(extensions: ExtensionSet) -> list[tuple[str, str]]:
    """The ``kf-capabilities`` entry announcing ``extensions`` (sorted, so the header is
    the same on every stream); no entry at all when there is nothing to announce."""
    if not extensions:
        return []
    return [(MD_CAPABILITIES, ",".join(sorted(extensions)))]
