"""One connection of ``doctor lb``: through the load-balanced address to a proxy-server's
agent port, as a proxy-agent connects (TLS with the agent's certificate or token, ALPN
h2, ``/AgentService/Connect``), reading only the ``serverid``/``servercount`` response
headers, then cancelling the stream and closing the connection.

Never an agent that takes dials. It sends no ``agentidentifiers`` (so ``destHost`` and
``defaultRoute`` never choose it), an agent ID that says it is the doctor, and a DRAIN
packet together with the request itself, before any reply. A server registers an agent
stream right after sending its headers, then reads its packets; a dial can be routed to
the stream only between the two, or later only if every other agent stream drains too
(the ``default`` strategy prefers non-draining streams). On our proxy-server, registering
and reading the DRAIN that came with the request happen in one turn of its event loop, so
no dial can come between them. On upstream's, they are two goroutines apart: a dial
racing in that window (microseconds) could pick the stream; it would then fail (upstream
leaves it pending until the client's own dial timeout), which is why the doctor runs its
tries one after another and stays connected for as short a time as it can. A server with
no agent at all counts as ready for that instant, as upstream counts any agent stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
from dataclasses import dataclass

from konnectivity_fast.agent.connect import ConnectError, parse_server_headers
from konnectivity_fast.cli.doctor.tlscheck import CertFacts, facts
from konnectivity_fast.transport.grpc import GrpcProtocol
from konnectivity_fast.transport.tls import client_context
from konnectivity_fast.wire import Drain, Packet, PacketType
from konnectivity_fast.wire.codec import encode_packet
from konnectivity_fast.wire.contract import (
    BEARER_PREFIX,
    CONNECT_PATH,
    MD_AGENT_ID,
    MD_AUTHORIZATION,
)
from konnectivity_fast.wire.errors import StatusCode

__all__ = ["Attempt", "ProbeConfig", "doctor_agent_id", "probe"]

# Bound on connecting (TCP and TLS) and on waiting for the response headers: what the
# agent waits too, and far more than a healthy server needs.
CONNECT_TIMEOUT = 10.0
# How long closing may take before the connection is dropped.
CLOSE_TIMEOUT = 1.0
DOCTOR_ID_PREFIX = "konnectivity-fast-doctor-"
# The DRAIN packet sent with the request (module docstring): encoded once.
_DRAIN = encode_packet(Packet(PacketType.DRAIN, Drain()))


def doctor_agent_id() -> str:
    """An agent ID that says what it is, unique per run (a server keys agents by ID)."""
    return DOCTOR_ID_PREFIX + secrets.token_hex(4)


@dataclass(frozen=True)
class ProbeConfig:
    host: str
    port: int
    server_name: str  # --proxy-server-host: the TLS name and :authority
    context: ssl.SSLContext
    agent_id: str
    token: str = ""


@dataclass(frozen=True)
class Attempt:
    """One try: the server that answered, or why none did."""

    server_id: str = ""
    server_count: int = 0
    cert: CertFacts | None = None
    error: str = ""


def ssl_context(ca_cert: str, agent_cert: str, agent_key: str) -> ssl.SSLContext:
    """The agent's TLS: the chain verified here, the name checked by ``tlscheck`` (to
    report it instead of failing the handshake on it)."""
    ctx = client_context(ca_cert or None, agent_cert or None, agent_key or None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def probe(config: ProbeConfig) -> Attempt:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, proto = await loop.create_connection(
                lambda: GrpcProtocol(False, None, loop=loop),
                config.host,
                config.port,
                ssl=config.context,
                server_hostname=config.server_name,
            )
            await proto.connected
    except TimeoutError:
        return Attempt(error=f"connecting to {config.host}:{config.port}: timed out")
    except ssl.SSLCertVerificationError as exc:
        return Attempt(error=f"TLS: {exc.verify_message or exc}")
    except (OSError, ssl.SSLError, ConnectionError) as exc:
        return Attempt(error=f"connecting to {config.host}:{config.port}: {exc}")
    try:
        return await _ask(proto, config)
    finally:
        await _close(proto)


async def _ask(proto: GrpcProtocol, config: ProbeConfig) -> Attempt:
    if proto.transport is None:  # the server hung up right after the handshake
        return Attempt(error=f"connecting to {config.host}:{config.port}: connection lost")
    ssl_object = proto.transport.get_extra_info("ssl_object")
    cert = facts(ssl_object.getpeercert()) if ssl_object is not None else None
    metadata = [(MD_AGENT_ID, config.agent_id)]
    if config.token:
        metadata.append((MD_AUTHORIZATION, BEARER_PREFIX + config.token))
    call = proto.start_call(CONNECT_PATH, metadata, authority=config.server_name, scheme="https")
    call.send(_DRAIN)
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            headers = await asyncio.shield(call.headers_received)
    except TimeoutError:
        call.cancel()
        return Attempt(cert=cert, error="no response headers within the agent's timeout")
    call.cancel()  # at once: the doctor must never stay an agent
    if not headers:
        status = call.status if call.status is not None else StatusCode.UNKNOWN
        name = StatusCode(status).name if status in StatusCode._value2member_map_ else status
        return Attempt(cert=cert, error=f"the server refused the agent: {name}: {call.message}")
    try:
        server_id, count = parse_server_headers(headers)
    except ConnectError as exc:
        return Attempt(cert=cert, error=str(exc))
    return Attempt(server_id, count, cert)


async def _close(proto: GrpcProtocol) -> None:
    with contextlib.suppress(Exception):
        await proto.aclose(CLOSE_TIMEOUT)
