"""Tests of the sans-IO routing state (``konnectivity_fast.tunnel``): no sockets, no loop.

Helpers build the packets each side sends and a router with a seeded random source, so
every agent choice is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

from konnectivity_fast.tunnel import Effect, Router
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    Packet,
    PacketType,
)


def make_router(
    strategies: Sequence[str] = ("default",), *, seed: int = 1, dial_timeout: float = 0.0
) -> Router:
    return Router(strategies, Random(seed), dial_timeout=dial_timeout)


def dial_req(random: int, address: str = "10.0.0.1:443", protocol: str = "tcp") -> Packet:
    return Packet(PacketType.DIAL_REQ, DialRequest(protocol, address, random))


def dial_rsp(random: int, connect_id: int = 0, error: str = "") -> Packet:
    return Packet(PacketType.DIAL_RSP, DialResponse(error, connect_id, random))


def data(connect_id: int, payload: bytes = b"x") -> Packet:
    return Packet(PacketType.DATA, Data(connect_id, data=payload))


def close_req(connect_id: int) -> Packet:
    return Packet(PacketType.CLOSE_REQ, CloseRequest(connect_id))


def close_rsp(connect_id: int, error: str = "") -> Packet:
    return Packet(PacketType.CLOSE_RSP, CloseResponse(error, connect_id))


def dial_cls(random: int) -> Packet:
    return Packet(PacketType.DIAL_CLS, CloseDial(random))


def drain() -> Packet:
    return Packet(PacketType.DRAIN, Drain())


def only(effects: list[Effect], kind: type) -> list[Effect]:
    """The effects of one kind, in order."""
    return [effect for effect in effects if isinstance(effect, kind)]
