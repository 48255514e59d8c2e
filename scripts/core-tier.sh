#!/usr/bin/env bash
# Build a tier of the compiled core (setup.py says what each is) into build/<tier>/ and run
# a command with it; without a command, build and check the build only.
#
#   scripts/core-tier.sh debug [COMMAND...]   line tracing, bounds checks, C asserts (-O0 -g)
#   scripts/core-tier.sh asan  [COMMAND...]   AddressSanitizer + UBSan (and C asserts)
#   scripts/core-tier.sh vendored [COMMAND...] release, with the pinned libnghttp2 compiled
#                                              in (the wheel's; scripts/fetch-nghttp2.sh)
#   e.g. scripts/core-tier.sh asan .venv/bin/python -m pytest -q tests/h2
#
# KF_VENDOR_NGHTTP2=1 compiles the pinned libnghttp2 into the debug or asan tier too, and
# KF_NGHTTP2_SRC=DIR builds a vendored tier against another nghttp2 source tree (setup.py).
#
# The release build in place (konnectivity_fast/_wire*.so) is never replaced: every Python
# process started by COMMAND, and their Python children, load konnectivity_fast._wire from
# build/<tier>/lib/ (scripts/core-tier/sitecustomize.py, through PYTHONPATH); the rest of
# the package comes from the checkout as usual, and the package's check that the core was
# built from the checkout's sources still applies.
#
# asan: CPython itself is not built with ASan, so its runtime is preloaded (LD_PRELOAD of
# gcc's libasan); leak detection is off (CPython keeps memory until exit by design), and
# PYTHONMALLOC=malloc sends every Python object through malloc, so ASan also sees writes
# past the end of a bytes object the core fills. Any ASan or UBSan report aborts the
# process (pytest's fault handler then shows the test in progress), so a test whose process
# it happens in fails. The reports go to build/asan/reports/ (pytest would swallow them
# from stderr); after COMMAND they are printed, and any report fails the run even when
# COMMAND succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tier=${1:-}
case "$tier" in
debug | asan | vendored) shift ;;
*)
    echo "usage: scripts/core-tier.sh debug|asan|vendored [COMMAND...]" >&2
    exit 2
    ;;
esac
PY=.venv/bin/python

echo "core-tier: building the $tier core in build/$tier/" >&2
flock /tmp/konnectivity-fast-build.lock env KF_BUILD="$tier" "$PY" setup.py -q build_ext 2>&1 |
    grep -v -E '^(running|copying|building|creating)' >&2 || true
sos=("$root/build/$tier/lib/konnectivity_fast/"_wire*.so)
if [ "${#sos[@]}" -ne 1 ] || [ ! -f "${sos[0]}" ]; then
    echo "core-tier: expected one extension in build/$tier/lib/konnectivity_fast/" >&2
    exit 1
fi
export KF_CORE_TIER_SO=${sos[0]}
export PYTHONPATH=$root/scripts/core-tier${PYTHONPATH:+:$PYTHONPATH}
export KONNECTIVITY_FAST_REQUIRE_COMPILED=1

if [ "$tier" = asan ]; then
    asan_rt=$(gcc -print-file-name=libasan.so)
    if [ ! -e "$asan_rt" ]; then
        echo "core-tier: gcc has no libasan.so (Debian: the libasan package of its version)" >&2
        exit 1
    fi
    reports=$root/build/asan/reports
    rm -rf "$reports"
    mkdir -p "$reports"
    export LD_PRELOAD=$asan_rt${LD_PRELOAD:+ $LD_PRELOAD}
    export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$reports/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$reports/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}
    export PYTHONMALLOC=malloc
fi

# The command must really run this build, and the debug build must really trace lines.
"$PY" - "$tier" <<'PYEOF'
import os
import sys

import konnectivity_fast._wire as core

assert core.__file__ == os.environ["KF_CORE_TIER_SO"], f"loaded {core.__file__}"
if sys.argv[1] == "debug":
    traced = set()

    def tracer(frame, event, arg):
        if event == "line":
            traced.add(os.path.basename(frame.f_code.co_filename))
        return tracer

    sys.settrace(tracer)
    core.decode_packet(core.encode_packet(core.decode_packet(b"\x08\x06")))
    sys.settrace(None)
    assert "codec.pxi" in traced, f"no line of codec.pxi traced (traced: {sorted(traced)})"
print(
    f"core-tier: {sys.argv[1]} core {core.__file__} (sources {core.SOURCE_DIGEST}, "
    f"libnghttp2 {core.libnghttp2_version()})"
)
PYEOF

[ "$#" -gt 0 ] || exit 0
if [ "$tier" != asan ]; then
    exec "$@"
fi
status=0
"$@" || status=$?
shopt -s nullglob
found=("$reports"/*)
if [ "${#found[@]}" -gt 0 ]; then
    for f in "${found[@]}"; do
        echo "core-tier: sanitizer report $f:" >&2
        cat "$f" >&2
    done
    echo "core-tier: ${#found[@]} sanitizer report(s) (above)" >&2
    [ "$status" -ne 0 ] || status=1
fi
exit "$status"
