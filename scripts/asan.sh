#!/usr/bin/env bash
# The compiled core under AddressSanitizer + UndefinedBehaviorSanitizer: the engine (tests/h2),
# codec (tests/wire) and fuzz smoke (tests/fuzz) tests against the asan build of _wire
# (scripts/core-tier.sh: built in build/asan/, the release build is not touched).
#
#   scripts/asan.sh            `make asan`: all of those tests, 10 s of fuzzing per harness
#   scripts/asan.sh --short    the part scripts/test.sh runs (about a minute and a half):
#                              only the tests that run compiled code (not the pure twin's,
#                              not the fuzzers' self-tests), 5 s of fuzzing per harness
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = --short ]; then
    shift
    select=(-k "not pure and not planted")
    export KF_FUZZ_SECONDS=${KF_FUZZ_SECONDS:-5}
fi
exec scripts/core-tier.sh asan .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/h2 tests/wire tests/fuzz "${select[@]}" "$@"
