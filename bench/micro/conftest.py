"""Micro-benchmark configuration: timing only when asked, and the implementations compared.

In a plain ``pytest bench/micro`` run every benchmark body runs once, untimed, so the
benchmarks double as quick correctness tests (each asserts its implementations agree before
anything is timed). Timing happens with ``--benchmark-only`` or ``--benchmark-enable``
(``make bench-micro``).

The official protobuf runtime (upb) is loaded from ``konnectivity_fast/wire/konnectivity.proto``
into a private descriptor pool, so it never clashes with the generated module the test suite
registers in the default pool when both run in one process.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation

import konnectivity_fast.wire._codec as pure_codec
from konnectivity_fast._compiled import require_compiled

PROTO = Path(__file__).resolve().parents[2] / "konnectivity_fast" / "wire" / "konnectivity.proto"


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False):
        return
    config.option.benchmark_disable = True
    # This conftest may load after pytest-benchmark made its session (when only a file
    # below bench/micro is named on the command line): disable that one too.
    session = getattr(config, "_benchmarksession", None)
    if session is not None:
        session.disabled = True


@pytest.fixture(scope="session")
def impls() -> SimpleNamespace:
    """``compiled`` and ``pure`` (the codec twins) and ``upb`` (the official runtime)."""
    compiled: ModuleType = require_compiled()  # ImportError, a failure, if missing or stale
    return SimpleNamespace(compiled=compiled, pure=pure_codec, upb=_official())


def _official() -> SimpleNamespace:
    """The official runtime's Packet and Data classes, from a private descriptor pool."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "konnectivity.pb"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"-I{PROTO.parent}",
                f"--descriptor_set_out={out}",
                PROTO.name,
            ],
            check=True,
        )
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return SimpleNamespace(
        implementation=api_implementation.Type(),
        Packet=message_factory.GetMessageClass(pool.FindMessageTypeByName("Packet")),
        Data=message_factory.GetMessageClass(pool.FindMessageTypeByName("Data")),
    )
