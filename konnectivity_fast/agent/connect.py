"""What an agent needs to open its ``/AgentService/Connect`` stream to one proxy-server
replica, before ``client.AgentClient`` serves it: the per-attempt configuration
(``ClientConfig``: request metadata, the token read anew each time), the checks grpc-go
makes of the connection (ALPN) and upstream's texts for what can go wrong
(``ConnectError``, ``parse_server_headers``: pkg/agent/client.go ``Connect`` and
``serverID``/``serverCount``).

Invariant: every failure of an attempt is a ``ConnectError`` whose text is what the
agent's sync loop logs, upstream's wording where upstream has one.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

from konnectivity_fast.metrics._common import grpc_code_name
from konnectivity_fast.transport.grpc import GrpcProtocol
from konnectivity_fast.wire.contract import (
    BEARER_PREFIX,
    MD_AGENT_ID,
    MD_AGENT_IDENTIFIERS,
    MD_AUTHORIZATION,
    MD_SERVER_COUNT,
    MD_SERVER_ID,
    NO_EXTENSIONS,
    ExtensionSet,
    capabilities_metadata,
    check_extensions,
)
from konnectivity_fast.wire.gotext import go_slice

__all__ = [
    "CONNECT_TIMEOUT",
    "HEADERS_TIMEOUT",
    "KEEPALIVE_TIMEOUT",
    "MIN_KEEPALIVE_TIME",
    "ClientConfig",
    "ConnectError",
    "check_alpn",
    "parse_server_headers",
    "status_text",
]

#: Seconds for TCP connect plus TLS handshake: grpc-go's minimum connect timeout.
CONNECT_TIMEOUT = 20.0
#: Seconds to wait for the server's response headers. Upstream waits forever
#: (pkg/agent/client.go serverID, with a TODO), which lets one mute server freeze the
#: agent's whole (sequential) sync loop; a deliberate difference (docs/differences.md).
HEADERS_TIMEOUT = 30.0
#: grpc-go's keepalive: an unanswered PING closes the connection after 20 s, and no client
#: pings more often than every 10 s whatever it is configured to.
KEEPALIVE_TIMEOUT = 20.0
MIN_KEEPALIVE_TIME = 10.0


class ConnectError(Exception):
    """A failed connection attempt; the text is what the sync loop logs."""


@dataclass
class ClientConfig:
    """What every connection attempt needs (built once at start-up)."""

    host: str
    port: int
    ssl_context: ssl.SSLContext
    agent_id: str
    agent_identifiers: str = ""
    token_path: str = ""
    keepalive_time: float = 3600.0
    probe_interval: float = 1.0
    # The TLS server name and :authority (``--proxy-server-host``).
    server_name: str = ""
    # ``--warn-on-channel-limit``: warn when a slow backend pauses its server stream.
    warn_on_channel_limit: bool = False
    extra_metadata: list[tuple[str, str]] = field(default_factory=list)
    # The extensions this agent offers each server (``wire.contract``).
    extensions: ExtensionSet = NO_EXTENSIONS

    def __post_init__(self) -> None:
        self.extensions = check_extensions(self.extensions)

    def metadata(self) -> list[tuple[str, str]]:
        """This attempt's request metadata; the token file is read now, on every attempt
        (upstream's pkg/agent/client.go Client.initializeAuthContext)."""
        md = [(MD_AGENT_ID, self.agent_id), (MD_AGENT_IDENTIFIERS, self.agent_identifiers)]
        if self.token_path:
            try:
                with open(self.token_path, "rb") as f:
                    token = f.read()
            except OSError as exc:
                raise ConnectError(
                    f"failed to read token from {self.token_path}: {exc.strerror or exc}"
                ) from None
            # Upstream sends the file verbatim; a trailing newline would make grpc-go refuse
            # the header, so trimming trailing whitespace is a harmless deviation.
            md.append((MD_AUTHORIZATION, BEARER_PREFIX + token.decode("latin-1").rstrip()))
        md.extend(capabilities_metadata(self.extensions))
        md.extend(self.extra_metadata)
        return md


def _one(metadata: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in metadata if k == key]


def parse_server_headers(metadata: list[tuple[str, str]]) -> tuple[str, int]:
    """``serverid`` and ``servercount`` from response headers, with upstream's errors."""
    ids = _one(metadata, MD_SERVER_ID)
    if len(ids) != 1:
        raise ConnectError(f"expected one server ID in the context, got {go_slice(ids)}")
    counts = _one(metadata, MD_SERVER_COUNT)
    if len(counts) != 1:
        raise ConnectError(f"expected one server count, got {len(counts)}")
    text = counts[0]
    digits = text[1:] if text[:1] in "+-" else text
    if not digits.isascii() or not digits.isdigit():
        raise ConnectError(f'strconv.Atoi: parsing "{text}": invalid syntax')
    return ids[0], int(text)


def status_text(status: int, message: str) -> str:
    """grpc-go's status error text."""
    return f"rpc error: code = {grpc_code_name(status)} desc = {message}"


def check_alpn(proto: GrpcProtocol, target: str) -> None:
    """grpc-go's check that the TLS handshake chose a protocol (ALPN), on a connection that
    may already be lost again."""
    transport = proto.transport
    if transport is None:  # lost before the connecting coroutine resumed
        raise ConnectError(f"connecting to {target}: connection lost")
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() is None:
        raise ConnectError("credentials: cannot check peer: missing selected ALPN property")
