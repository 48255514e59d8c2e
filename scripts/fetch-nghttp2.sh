#!/usr/bin/env bash
# Fetch the pinned libnghttp2 C sources that a vendored build compiles into the core
# (KF_VENDOR_NGHTTP2=1, setup.py; `make wheel`), into .cache/nghttp2/<version>/ (ignored).
#
# The sources come from crates.io's libnghttp2-sys crate, whose nghttp2/ folder is a git
# submodule of upstream nghttp2 at the release tag named after the `+` of the crate's
# version: a registry package, so the download works where only package registries are
# reachable. The crate's SHA-256 is checked before anything is unpacked (it is also the
# `cksum` of crates.io's index entry for that version).
#
# Only what the library build needs is kept: lib/ (sources and public headers),
# CMakeLists.txt (setup.py reads the version from its `project(nghttp2 VERSION ...)` line)
# and the licence. Idempotent: a finished fetch leaves a stamp and is not repeated; safe to
# run concurrently (flock). Prints the source folder on stdout.
set -euo pipefail

# The pin: nghttp2 1.68.1 (the newest release crates.io vendors) in libnghttp2-sys 0.1.13.
readonly NGHTTP2_VERSION=1.68.1
readonly CRATE_VERSION=0.1.13+$NGHTTP2_VERSION
readonly CRATE_SHA256=492e00167f1418c15648144f42bbfc63099806ecee9bf8d09a6353d6b4856b3c
readonly CRATE_URL=https://static.crates.io/crates/libnghttp2-sys/libnghttp2-sys-${CRATE_VERSION/+/%2B}.crate
# A slow mirror should not hang a CI run: the crate is about 2 MB.
readonly DOWNLOAD_TIMEOUT_S=120

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly OUT=$ROOT/.cache/nghttp2/$NGHTTP2_VERSION
readonly STAMP=$OUT/.fetched-$CRATE_SHA256

say() { printf '[fetch-nghttp2] %s\n' "$*" >&2; }

mkdir -p "$ROOT/.cache/nghttp2"
exec 9>"$ROOT/.cache/nghttp2/.lock"
flock 9

if [ ! -f "$STAMP" ]; then
    tmp=$(mktemp -d "$ROOT/.cache/nghttp2/.tmp.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    say "downloading libnghttp2-sys $CRATE_VERSION (nghttp2 $NGHTTP2_VERSION) from crates.io"
    curl -fsSL --max-time "$DOWNLOAD_TIMEOUT_S" -o "$tmp/crate.tar.gz" "$CRATE_URL"
    echo "$CRATE_SHA256  $tmp/crate.tar.gz" | sha256sum -c --quiet - || {
        say "error: SHA-256 mismatch for $CRATE_URL"
        exit 1
    }
    top=libnghttp2-sys-$CRATE_VERSION/nghttp2
    tar -xzf "$tmp/crate.tar.gz" -C "$tmp" "$top/lib" "$top/CMakeLists.txt" "$top/COPYING"
    grep -q "project(nghttp2 VERSION $NGHTTP2_VERSION " "$tmp/$top/CMakeLists.txt" || {
        say "error: the crate does not hold nghttp2 $NGHTTP2_VERSION"
        exit 1
    }
    rm -rf "$OUT"
    mv "$tmp/$top" "$OUT"
    touch "$STAMP"
    say "nghttp2 $NGHTTP2_VERSION sources in $OUT"
fi
echo "$OUT"
