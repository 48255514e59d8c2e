#!/usr/bin/env bash
# The test command of the README: lint, types, then the whole suite with the compiled core
# required (a missing or stale build fails instead of silently testing the pure codec).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
export KONNECTIVITY_FAST_REQUIRE_COMPILED=1
echo "== ruff"
.venv/bin/python -m ruff check konnectivity_fast tests bench
.venv/bin/python -m ruff format --check konnectivity_fast tests bench
echo "== mypy --strict"
.venv/bin/python -m mypy
# The compiled core's stub (konnectivity_fast/_wire.pyi) against the build: mypy checks the
# engine calls in transport/ through that stub, so it must say what the extension does.
echo "== stubtest konnectivity_fast._wire"
.venv/bin/python -m mypy.stubtest konnectivity_fast._wire
# The compiled core again, under AddressSanitizer + UBSan (its own build in build/asan/):
# the engine, codec and fuzz smoke tests that run compiled code (`make asan`: all of them).
echo "== asan (short)"
scripts/asan.sh --short
# The engine and codec tests again with the pinned libnghttp2 that the wheel compiles in
# (its own build in build/vendored/): the engine must be right on the system's release
# (Debian 12: 1.52) and on the wheel's (`make vendored`).
echo "== vendored libnghttp2: tests/h2 tests/wire"
scripts/core-tier.sh vendored .venv/bin/python -m pytest -q -p no:cacheprovider tests/h2 tests/wire
# Peers built from source, cached in .cache/ (skipped when already built): upstream
# v0.36.0's binaries and the Go konnectivity-client, then kube-apiserver and etcd.
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
echo "== upstream v0.36.0 binaries"
scripts/build-upstream.sh
echo "== kube-apiserver and etcd"
scripts/build-kube.sh
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
