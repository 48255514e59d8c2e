"""Atheris harness for the Packet codec and gRPC framing (run it with ``tests/fuzz/run.py``).

For every input, the pure twin (instrumented, so coverage guides the fuzzer) is compared
with another decoder chosen by ``KF_FUZZ_AGAINST``:

- ``compiled``: the compiled twin. Same Packet or same CodecError subclass from
  ``decode_packet``, ``peek_packet`` and ``peek_data``; the same messages, pending bytes and
  errors (class and text) from ``MessageReader`` over the same chunks.
- ``official``: the official protobuf runtime (upb), for when the compiled twin is not
  there: same values where both accept, verdicts that differ only by a known upb-vs-Go
  divergence (``oracle.against_official``); the peeks and the reader are checked on the
  pure twin alone.
- ``mutant``: the pure twin with a planted bug, to prove a discrepancy is reported.

Anything other than a CodecError escaping a codec is a finding too. A finding raises
``Discrepancy``, which atheris reports with the input that caused it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# Run as a script: the repository root first, for ``tests.support.oracle`` and for the
# checkout's own package (not whatever an editable install points at).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# Import the package even when the compiled build is stale or absent: the compiled twin,
# when wanted, is loaded (and checked) by ``oracle.load_twin``.
if os.environ.get("KONNECTIVITY_FAST_REQUIRE_COMPILED") != "1":
    os.environ.setdefault("KONNECTIVITY_FAST_PURE", "1")

import atheris

with atheris.instrument_imports(include=["konnectivity_fast"]):
    import konnectivity_fast.wire._codec as pure
    from konnectivity_fast.wire.errors import GrpcFramingError
    from konnectivity_fast.wire.packets import Data, Packet

from tests.support import oracle

MODES = ("compiled", "official", "mutant")
READER_LIMIT_MAX = 64  # small limits, so "too large" is reachable from short inputs


class Discrepancy(AssertionError):
    """The twins (or a twin and the official runtime) disagree on an input."""


class Mutant:
    """The pure twin with one planted bug: DATA connectIDs decode one too high."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pure, name)

    @staticmethod
    def decode_packet(buf: bytes) -> Packet:
        packet = pure.decode_packet(buf)
        if isinstance(packet.payload, Data):
            data = packet.payload
            return Packet(packet.type, Data(data.connect_id + 1, data.error, data.data))
        return packet


def _other(mode: str) -> Any:
    if mode == "compiled":
        return oracle.load_twin("compiled")
    if mode == "mutant":
        return Mutant()
    return None


def _chunks(data: bytes) -> tuple[int, list[bytes]]:
    """A reader limit and a chunking of the input, both derived from its first bytes."""
    if len(data) < 2:
        return 16, [data]
    limit, step = data[0] % READER_LIMIT_MAX, 1 + data[1] % 16
    body = data[2:]
    return limit, [body[i : i + step] for i in range(0, len(body), step)] or [b""]


def _run_reader(codec: ModuleType | Any, limit: int, chunks: list[bytes]) -> list[Any]:
    """Per chunk: (messages, pending) or (error class, text); stops after an error."""
    reader = codec.MessageReader(limit)
    log: list[Any] = []
    for chunk in chunks:
        try:
            log.append((reader.feed(chunk), reader.pending))
        except GrpcFramingError as exc:
            log.append((type(exc), str(exc)))
            return log
        if reader.pending > limit + 5:
            raise Discrepancy(f"reader holds {reader.pending} bytes with limit {limit}")
    return log


def check(data: bytes, other: Any) -> None:
    expected = oracle.outcome(pure.decode_packet, data)
    problem = oracle.peek_problem(pure, data, expected)
    if other is None:
        problem = problem or oracle.against_official(data, expected)
    else:
        got = oracle.outcome(other.decode_packet, data)
        if got != expected:
            problem = f"input {data.hex()}: pure {expected}, other {got}"
        problem = problem or oracle.peek_problem(other, data, expected)
    if problem:
        raise Discrepancy(problem)
    limit, chunks = _chunks(data)
    ours = _run_reader(pure, limit, chunks)
    if other is not None and _run_reader(other, limit, chunks) != ours:
        raise Discrepancy(f"MessageReader({limit}) differs on {[c.hex() for c in chunks]}")


def main() -> None:
    mode = os.environ.get("KF_FUZZ_AGAINST", "official")
    if mode not in MODES:
        sys.exit(f"fuzz_codec: KF_FUZZ_AGAINST must be one of {MODES}, not {mode!r}")
    try:
        other = _other(mode)
    except ImportError as exc:
        sys.exit(f"fuzz_codec: the compiled twin is unavailable: {exc}")
    oracle.pb2()  # compile the .proto before fuzzing starts

    def test_one_input(data: bytes) -> None:
        check(data, other)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
