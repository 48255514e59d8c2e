#!/usr/bin/env bash
# The test command of the README: lint, types, then the whole suite with the compiled core
# required (a missing or stale build fails instead of silently testing the pure codec).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh test
export KONNECTIVITY_FAST_REQUIRE_COMPILED=1
echo "== ruff"
.venv/bin/python -m ruff check konnectivity_fast tests bench
echo "== mypy --strict"
.venv/bin/python -m mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
