#!/usr/bin/env bash
# Builds the Go programs of the interop tests into .cache/interop/bin/ (git-ignored):
#   goclient           our dialer on konnectivity-client v0.36.0 (goclient/, go.mod)
#   goclient-reusable  the same source on konnectivity-client v0.37.0, whose reusable tunnel
#                      carries every dial as a stream of one gRPC connection
#                      (-tags reusable, goclient/go.reusable.mod)
#   h2spec             the HTTP/2 conformance tester, pinned in gotools/go.mod as a tool
#   wiregen            writes the golden wire fixtures (gotools/wiregen)
#   upstream-tests.test  upstream v0.36.0's integration suite (package tests), compiled by
#                      `go test -c` in the source tree scripts/build-upstream.sh prepares
# Everything comes from the Go module proxy. Idempotent (a stamp of the sources' digest),
# safe to run concurrently (flock), niced with -p 1: the machine is shared. Prints the bin
# folder on stdout.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
readonly HERE ROOT
readonly OUT=$ROOT/.cache/interop
readonly BIN=$OUT/bin
readonly BINARIES=(goclient goclient-reusable h2spec wiregen upstream-tests.test)
GO=${GO:-$(command -v go || true)}
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOFLAGS="-buildvcs=false -modcacherw"

say() { printf '[interop-build] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

digest() {
    (cd "$HERE" && cat build.sh goclient/*.go goclient/go.* gotools/go.* gotools/wiregen/*.go) \
        | sha256sum | cut -d' ' -f1
}

built() {
    [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$1" ]] || return 1
    local b
    for b in "${BINARIES[@]}"; do [[ -x $BIN/$b ]] || return 1; done
}

gobuild() {  # output, then go build arguments
    local out=$1
    shift
    say "building $(basename "$out")"
    nice -n 10 "$GO" build -p 1 -trimpath -o "$out.tmp" "$@"
    mv "$out.tmp" "$out"
}

main() {
    local want
    want=$(digest)
    if built "$want"; then
        echo "$BIN"
        return
    fi
    mkdir -p "$BIN"
    exec 9>"$OUT.lock"
    flock 9
    if built "$want"; then
        echo "$BIN"
        return
    fi
    [[ -n $GO && -x $GO ]] || die "no Go toolchain: install Go or set GO=/path/to/go"
    rm -f "$OUT/.stamp"
    # The upstream source tree (and its binaries) first: the suite compiles inside it.
    local upstream_bin
    upstream_bin=$(bash "$ROOT/scripts/build-upstream.sh")
    (cd "$HERE/goclient" && GOFLAGS="$GOFLAGS -mod=readonly" gobuild "$BIN/goclient" .)
    (cd "$HERE/goclient" && GOFLAGS="$GOFLAGS -mod=readonly" \
        gobuild "$BIN/goclient-reusable" -tags reusable -modfile go.reusable.mod .)
    (cd "$HERE/gotools" && GOFLAGS="$GOFLAGS -mod=readonly" \
        gobuild "$BIN/h2spec" github.com/summerwind/h2spec/cmd/h2spec)
    (cd "$HERE/gotools" && GOFLAGS="$GOFLAGS -mod=readonly" gobuild "$BIN/wiregen" ./wiregen)
    say "compiling upstream's integration suite (go test -c ./tests)"
    (cd "$upstream_bin/../src" && GOFLAGS="$GOFLAGS -mod=mod" \
        nice -n 10 "$GO" test -p 1 -c -o "$BIN/upstream-tests.test.tmp" ./tests)
    mv "$BIN/upstream-tests.test.tmp" "$BIN/upstream-tests.test"
    echo "$want" >"$OUT/.stamp"
    echo "$BIN"
}

main "$@"
