"""The official protobuf runtime as a test oracle, and the two codec twins.

``pb2()`` compiles ``konnectivity_fast/wire/konnectivity.proto`` with grpc_tools.protoc into
``tests/_generated/<digest of the .proto>/`` (once per .proto version, shared by every
process) and imports the generated ``konnectivity_pb2``. ``to_official``/``from_official``
convert between our ``Packet`` values and the generated messages, presence-aware (a set but
empty oneof member stays set).

The official runtime here is upb (C), not Go. Where upb and protobuf-go disagree we follow
Go, and ``upb_divergences`` names what in an input explains a different verdict.

``load_twin`` gives a codec twin by name, for the conftest fixture and the fuzz harness.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from google.protobuf.message import DecodeError
from grpc_tools import protoc

from konnectivity_fast._build import source_digest, sources_present
from konnectivity_fast.wire.errors import CodecError
from konnectivity_fast.wire.packets import (
    CloseDial,
    CloseRequest,
    CloseResponse,
    Data,
    DialRequest,
    DialResponse,
    Drain,
    FlowCredit,
    Packet,
    PacketType,
    Payload,
)

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "konnectivity_fast" / "wire" / "konnectivity.proto"
GENERATED = ROOT / "tests" / "_generated"

TWINS = ("pure", "compiled")
#: What both twins must export (see konnectivity_fast/wire/codec.py).
CODEC_API = (
    "DEFAULT_MAX_RECEIVE_MESSAGE_SIZE",
    "MAX_GROUP_NESTING",
    "MessageReader",
    "data_header",
    "decode_packet",
    "encode_packet",
    "frame_message",
    "message_prefix",
    "peek_data",
    "peek_packet",
)


def load_twin(name: str) -> ModuleType:
    """The codec twin ``name`` ("pure" or "compiled"); ImportError, saying why, if the
    compiled one is missing, stale or incomplete."""
    if name == "pure":
        return importlib.import_module("konnectivity_fast.wire._codec")
    if name != "compiled":
        raise ValueError(f"unknown codec twin {name!r}")
    module = importlib.import_module("konnectivity_fast._wire")
    if sources_present() and source_digest() != module.SOURCE_DIGEST:
        raise ImportError("konnectivity_fast._wire is stale: run `make build`")
    missing = [attr for attr in CODEC_API if not hasattr(module, attr)]
    if missing:
        raise ImportError(f"konnectivity_fast._wire lacks the codec API: {', '.join(missing)}")
    return module


# ------------------------------------------------------------------ generated modules


def _generate(outdir: Path) -> None:
    GENERATED.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=GENERATED, prefix=".tmp-"))
    args = [
        "protoc",
        f"-I{PROTO.parent}",
        f"--python_out={tmp}",
        f"--grpc_python_out={tmp}",
        PROTO.name,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"grpc_tools.protoc failed on {PROTO}")
    try:
        tmp.rename(outdir)  # atomic: concurrent sessions see all of it or nothing
    except OSError:
        if not (outdir / "konnectivity_pb2.py").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another session won the race
    for old in GENERATED.iterdir():  # modules of earlier .proto versions
        if old.is_dir() and old != outdir and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


@functools.cache
def generated_dir() -> Path:
    """The directory holding konnectivity_pb2(_grpc).py for the current .proto, on sys.path
    (the _grpc module imports its sibling by name)."""
    digest = hashlib.sha256(PROTO.read_bytes()).hexdigest()[:16]
    outdir = GENERATED / digest
    if not (outdir / "konnectivity_pb2.py").is_file():
        _generate(outdir)
    if str(outdir) not in sys.path:
        sys.path.insert(0, str(outdir))
    return outdir


@functools.cache
def pb2() -> Any:
    """The generated ``konnectivity_pb2`` module."""
    generated_dir()
    return importlib.import_module("konnectivity_pb2")


@functools.cache
def pb2_grpc() -> Any:
    """The generated ``konnectivity_pb2_grpc`` module (service stubs for grpcio peers)."""
    generated_dir()
    return importlib.import_module("konnectivity_pb2_grpc")


# ------------------------------------------------------------------------ conversions

#: Payload class -> (oneof member name, [(our attribute, proto field name)]).
_MEMBERS: dict[type[Payload], tuple[str, list[tuple[str, str]]]] = {
    DialRequest: ("dialRequest", [("protocol", "protocol"), ("address", "address"),
                                  ("random", "random")]),
    DialResponse: ("dialResponse", [("error", "error"), ("connect_id", "connectID"),
                                    ("random", "random")]),
    Data: ("data", [("connect_id", "connectID"), ("error", "error"), ("data", "data")]),
    CloseRequest: ("closeRequest", [("connect_id", "connectID")]),
    CloseResponse: ("closeResponse", [("error", "error"), ("connect_id", "connectID")]),
    CloseDial: ("closeDial", [("random", "random")]),
    Drain: ("drain", []),
    FlowCredit: ("flowCredit", [("connect_id", "connectID"), ("bytes", "bytes")]),
}  # fmt: skip
_BY_MEMBER = {member: (cls, fields) for cls, (member, fields) in _MEMBERS.items()}


def to_official(packet: Packet) -> Any:
    """``packet`` as a generated ``Packet`` message."""
    msg = pb2().Packet(type=packet.type)
    if packet.payload is not None:
        member, fields = _MEMBERS[type(packet.payload)]
        sub = getattr(msg, member)
        sub.SetInParent()  # set even when every field is default
        for ours, theirs in fields:
            setattr(sub, theirs, getattr(packet.payload, ours))
    return msg


def from_official(msg: Any) -> Packet:
    """A generated ``Packet`` message as our ``Packet``."""
    member = msg.WhichOneof("payload")
    if member is None:
        return Packet(msg.type)
    cls, fields = _BY_MEMBER[member]
    sub = getattr(msg, member)
    return Packet(msg.type, cls(**{ours: getattr(sub, theirs) for ours, theirs in fields}))


def official_encode(packet: Packet) -> bytes:
    data: bytes = to_official(packet).SerializeToString(deterministic=True)
    return data


# --------------------------------------------------------------------------- outcomes

#: ("ok", Packet) or ("error", the CodecError subclass raised).
Outcome = tuple[str, Any]


def outcome(decode: Callable[[bytes], Any], data: bytes) -> Outcome:
    """What ``decode`` makes of ``data``; anything but a CodecError propagates (a bug)."""
    try:
        return ("ok", decode(data))
    except CodecError as exc:
        return ("error", type(exc))


def official_outcome(data: bytes) -> Outcome:
    """What upb makes of ``data``: ("ok", Packet) or ("error", None)."""
    msg = pb2().Packet()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        return ("error", None)
    return ("ok", from_official(msg))


def upb_divergences(data: bytes) -> set[str]:
    """Known upb-vs-Go differences present in ``data`` (a Packet), found by an independent
    walk of the wire format that stops at the first malformed byte:

    - "varint10": a 10-byte varint whose last byte is 2..127 (Go rejects, upb accepts);
    - "long_varint": a tag or length longer than 5 bytes (overlong: Go accepts, upb does
      not, it reads them as 32-bit);
    - "group_field_big": a field number above 2**29-1 inside a group (Go accepts up to
      2**31-1, upb rejects);
    - "field_zero": field number 0 inside a group or a Drain payload (Go rejects it; upb
      lets it pass in those places, in Drain after a first field);
    - "deep_groups": groups nested more than 64 deep (upb stops near 100, Go at 10001).
    """
    found: set[str] = set()

    def varint(pos: int, end: int) -> tuple[int, int] | None:
        value, shift, start = 0, 0, pos
        while pos < end and pos - start < 10:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                if pos - start == 10 and byte > 1:
                    found.add("varint10")
                return value, pos
            shift += 7
        return None

    def walk(pos: int, end: int, member: int) -> None:
        """Walk the fields in data[pos:end]: a Packet (member 0) or its member payload."""
        groups: list[int] = []
        while pos < end:
            tag_start = pos
            got = varint(pos, end)
            if got is None:
                return
            tag, pos = got
            if pos - tag_start > 5:
                found.add("long_varint")
            field, wire = tag >> 3, tag & 7
            if groups and field > (1 << 29) - 1:
                found.add("group_field_big")
            if field == 0 and (groups or member == 8):
                found.add("field_zero")
            if wire == 3:
                groups.append(field)
                if len(groups) > 64:
                    found.add("deep_groups")
                continue
            if wire == 4:
                if not groups or groups.pop() != field:
                    return
                continue
            if wire in (1, 5):
                pos += 8 if wire == 1 else 4
                continue
            value_start = pos
            got = varint(pos, end)
            if got is None or wire not in (0, 2):
                return
            value, pos = got
            if wire == 2:
                if pos - value_start > 5:
                    found.add("long_varint")
                if value > end - pos:
                    return
                if member == 0 and not groups and (2 <= field <= 8 or field == 100):
                    walk(pos, pos + value, field)
                pos += value

    walk(0, len(data), 0)
    return found


#: The errors we raise (like Go) where upb accepts, with the divergence explaining each.
_GO_STRICTER = {"VarintError": "varint10", "TagError": "field_zero"}


def against_official(data: bytes, ours: Outcome) -> str | None:
    """None when our outcome for ``data`` agrees with upb's, or differs only by a known
    divergence present in ``data``; otherwise a description of the disagreement."""
    theirs = official_outcome(data)
    if ours[0] == "ok" and theirs[0] == "ok":
        if ours[1] == theirs[1]:
            return None
    elif ours[0] == theirs[0]:
        return None  # both reject; only we name the reason
    else:
        known = upb_divergences(data)
        if ours[0] == "error" and _GO_STRICTER.get(ours[1].__name__) in known:
            return None
        if ours[0] == "ok" and known & {"long_varint", "group_field_big", "deep_groups"}:
            return None
    return f"input {data.hex()}: ours {ours}, official {theirs}"


def peek_problem(codec: Any, data: bytes, expected: Outcome) -> str | None:
    """None when ``codec``'s ``peek_packet`` and ``peek_data`` agree with ``expected`` (the
    outcome of decoding ``data``): the same error, or the type and connectID of the decoded
    packet and, for DATA with a Data payload, a view of its bytes inside ``data``."""
    if expected[0] == "error":
        for peek in (codec.peek_packet, codec.peek_data):
            got = outcome(peek, data)
            if got != expected:
                return f"input {data.hex()}: {peek.__name__} gave {got}, decode {expected}"
        return None
    packet: Packet = expected[1]
    payload = packet.payload
    has_id = isinstance(payload, DialResponse | Data | CloseRequest | CloseResponse | FlowCredit)
    connect_id = payload.connect_id if has_id else 0  # type: ignore[union-attr]
    peeked = codec.peek_packet(data)
    if peeked != (packet.type, connect_id):
        return f"input {data.hex()}: peek_packet gave {peeked}, decode {packet}"
    view = codec.peek_data(data)
    if packet.type == PacketType.DATA and isinstance(payload, Data):
        if (
            view is None
            or view[0] != payload.connect_id
            or not isinstance(view[1], memoryview)
            or view[1].obj is not data
            or bytes(view[1]) != payload.data
        ):
            return f"input {data.hex()}: peek_data gave {view}, decode {packet}"
    elif view is not None:
        return f"input {data.hex()}: peek_data gave {view} for {packet}"
    return None
