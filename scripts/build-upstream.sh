#!/usr/bin/env bash
# Builds the upstream Go peers the compatibility and interop tests run against:
#   proxy-server, proxy-agent, test-client and test-server (cmd/server, cmd/agent,
#   cmd/test-client, cmd/test-server) of sigs.k8s.io/apiserver-network-proxy v0.36.0, and
#   goclient (tests/interop/goclient), our dialer peer on the published konnectivity-client
#   library v0.36.0,
# into .cache/upstream/v0.36.0/bin/ (git-ignored), with the sources they were built from
# beside it (src/, konnectivity-client/). Sources come from the Go module proxy.
#
# Upstream's go.mod replaces konnectivity-client with ./konnectivity-client, a folder the
# module zip lacks: the source is copied into the cache and that replace is swapped for
# the published konnectivity-client module of the same release (v0.36.0; the go.mod pins
# v0.34.0 only as the version its replace stands in for).
#
# Idempotent: a stamp holding the digest of this script and of goclient's sources skips
# the work when nothing changed. Safe to run concurrently (flock). Prints progress on
# stderr and the bin folder on stdout.
#
# Environment: GO (default: go on PATH); GOMODCACHE/GOCACHE as usual (shared across
# clones, so a second checkout reuses downloads and compiled packages).
set -euo pipefail

readonly VERSION=v0.36.0
readonly MODULE=sigs.k8s.io/apiserver-network-proxy
readonly CLIENT_MODULE=$MODULE/konnectivity-client
readonly CLIENT_VERSION=v0.36.0

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly ROOT
readonly OUT=$ROOT/.cache/upstream/$VERSION
readonly BIN=$OUT/bin
readonly GOCLIENT_SRC=$ROOT/tests/interop/goclient
readonly BINARIES=(proxy-server proxy-agent test-client test-server goclient)

say() { printf '[build-upstream] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

GO=${GO:-$(command -v go || true)}
need_go() {
    [[ -n $GO && -x $GO ]] || die "no Go toolchain: install Go >= 1.24 (https://go.dev/dl) or set GO=/path/to/go"
}

# GOTOOLCHAIN=auto lets an older local go fetch the toolchain upstream's go.mod asks for
# (go 1.26.2) from the module proxy; -mod=mod lets the edited go.mod resolve; no VCS stamps
# (the cache folder is no checkout).
export GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
export GOFLAGS="-mod=mod -buildvcs=false -modcacherw"

digest() {
    cat "${BASH_SOURCE[0]}" "$GOCLIENT_SRC/main.go" "$GOCLIENT_SRC/go.mod" "$GOCLIENT_SRC/go.sum" \
        | sha256sum | cut -d' ' -f1
}

built() {
    [[ -f $OUT/.stamp && $(cat "$OUT/.stamp") == "$1" ]] || return 1
    local b
    for b in "${BINARIES[@]}"; do [[ -x $BIN/$b ]] || return 1; done
}

main() {
    local want
    want=$(digest)
    if built "$want"; then
        say "up to date in $BIN"
        echo "$BIN"
        return
    fi
    mkdir -p "$OUT"
    exec 9>"$OUT.lock"
    say "waiting for the build lock"
    flock 9
    if built "$want"; then  # another process built it while we waited
        say "up to date in $BIN"
        echo "$BIN"
        return
    fi
    need_go
    local started=$SECONDS
    rm -f "$OUT/.stamp"
    say "go: $("$GO" version)"

    say "downloading $MODULE@$VERSION"
    local dir
    dir=$("$GO" mod download -json "$MODULE@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -n $dir && -d $dir ]] || die "go mod download gave no source folder for $MODULE@$VERSION"

    say "copying the source into $OUT/src"
    rm -rf "$OUT/src" "$OUT/konnectivity-client"
    cp -r "$dir" "$OUT/src"
    chmod -R u+w "$OUT/src"
    # The client library's source too: the compat tests read metric definitions from it.
    say "downloading $CLIENT_MODULE@$CLIENT_VERSION"
    dir=$("$GO" mod download -json "$CLIENT_MODULE@$CLIENT_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    [[ -n $dir && -d $dir ]] || die "go mod download gave no source folder for $CLIENT_MODULE@$CLIENT_VERSION"
    cp -r "$dir" "$OUT/konnectivity-client"
    chmod -R u+w "$OUT/konnectivity-client"
    (
        cd "$OUT/src"
        "$GO" mod edit -dropreplace="$CLIENT_MODULE" -require="$CLIENT_MODULE@$CLIENT_VERSION"
        say "resolving modules (konnectivity-client -> $CLIENT_VERSION)"
        "$GO" mod download
        mkdir -p "$BIN"
        for pair in proxy-server:./cmd/server proxy-agent:./cmd/agent test-client:./cmd/test-client \
            test-server:./cmd/test-server; do
            say "building ${pair%%:*} from ${pair#*:}"
            "$GO" build -trimpath -o "$BIN/${pair%%:*}.tmp" "${pair#*:}"
            mv "$BIN/${pair%%:*}.tmp" "$BIN/${pair%%:*}"
        done
    )
    say "building goclient from tests/interop/goclient"
    (
        cd "$GOCLIENT_SRC"
        GOFLAGS="-mod=readonly -buildvcs=false -modcacherw" "$GO" build -trimpath -o "$BIN/goclient.tmp" .
        mv "$BIN/goclient.tmp" "$BIN/goclient"
    )
    echo "$want" >"$OUT/.stamp"
    say "built ${BINARIES[*]} in $((SECONDS - started))s"
    echo "$BIN"
}

main "$@"
