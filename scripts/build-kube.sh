#!/usr/bin/env bash
# Builds a real kube-apiserver and a real etcd from Go modules into
# .cache/kube/<version>/bin/, for the tests that talk to the Kubernetes API.
#
# Invariants:
#  - versions are pinned below; the output folder is named after them, so a
#    version bump builds into a new folder and never mixes binaries;
#  - idempotent: when both binaries are present and run, nothing is done;
#  - only the Go module proxy is used (no prebuilt binaries are downloaded).
#
# Why a wrapper module: k8s.io/kubernetes's go.mod replaces its staging modules
# (k8s.io/api, k8s.io/apiserver, ...) with ./staging paths that are not in the
# module zip. A main module's replace lines win over a dependency's, so a small
# wrapper that requires k8s.io/kubernetes and points every staging module at its
# published v0.X.Y tag builds the very same code.
#
# Usage: scripts/build-kube.sh            (prints the bin folder on its last line)
#        KF_KUBE_JOBS=1 scripts/build-kube.sh   (fewer parallel compile jobs)
set -euo pipefail

KUBE_VERSION=v1.37.2    # k8s.io/kubernetes
STAGING_VERSION=v0.37.2 # its staging modules are tagged v0.<minor>.<patch>
ETCD_VERSION=v3.7.0     # the etcd that k8s.io/kubernetes v1.37.2 requires

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/.cache/kube/$KUBE_VERSION"
BIN="$OUT/bin"
# Two cores shared with other work: two compile jobs at low priority.
JOBS=${KF_KUBE_JOBS:-2}

log() { printf '[build-kube] %s\n' "$*" >&2; }

if ! command -v go >/dev/null 2>&1; then
    log "error: 'go' was not found on PATH; install Go (1.22 or newer; the newer"
    log "toolchain that kubernetes needs is then fetched via GOTOOLCHAIN=auto)"
    exit 2
fi

if [[ -x "$BIN/kube-apiserver" && -x "$BIN/etcd" ]] \
    && "$BIN/kube-apiserver" --version >/dev/null 2>&1 \
    && "$BIN/etcd" --version >/dev/null 2>&1; then
    log "already built: $BIN"
    echo "$BIN"
    exit 0
fi

export GOTOOLCHAIN=auto
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
mkdir -p "$BIN" "$OUT/kube-mod" "$OUT/etcd-mod"
start=$(date +%s)

# --- kube-apiserver ----------------------------------------------------------
log "kube-apiserver $KUBE_VERSION: fetching k8s.io/kubernetes go.mod"
cd "$OUT/kube-mod"
# The module's go.mod names every staging module it replaces; reuse that list so
# a version bump needs no hand edit here.
kmod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
if [[ -z "$kmod" || ! -f "$kmod" ]]; then
    log "error: could not download k8s.io/kubernetes@$KUBE_VERSION"
    exit 1
fi
staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[^ ]*\) => ./staging/.*#\1#p' "$kmod")
{
    echo "module kf.local/kubebuild"
    echo
    echo "go $(sed -n 's/^go //p' "$kmod")"
    echo
    echo "require k8s.io/kubernetes $KUBE_VERSION"
    echo
    echo "replace ("
    for m in $staging; do echo "	$m => $m $STAGING_VERSION"; done
    echo ")"
} >go.mod
# A blank import lets `go mod tidy` see the whole package graph of the command.
cat >tools.go <<'EOF'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
EOF
log "kube-apiserver: resolving modules ($(echo "$staging" | wc -w) staging modules pinned at $STAGING_VERSION)"
go mod tidy -e >/dev/null 2>"$OUT/tidy-kube.log" || { cat "$OUT/tidy-kube.log" >&2; exit 1; }
log "kube-apiserver: compiling (-p $JOBS; takes several minutes)"
nice -n 10 go build -p "$JOBS" -trimpath -ldflags "-s -w \
    -X k8s.io/component-base/version.gitVersion=$KUBE_VERSION \
    -X k8s.io/component-base/version.gitMajor=1 \
    -X k8s.io/component-base/version.gitMinor=$(echo "$KUBE_VERSION" | cut -d. -f2)" \
    -o "$BIN/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver
mv "$BIN/kube-apiserver.tmp" "$BIN/kube-apiserver"
log "kube-apiserver: done after $(($(date +%s) - start)) s"

# --- etcd ----------------------------------------------------------------------
log "etcd $ETCD_VERSION: resolving modules"
cd "$OUT/etcd-mod"
cat >go.mod <<EOF
module kf.local/etcdbuild

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
# etcd's own entry point, unchanged: the etcd command is a thin main around it.
cat >main.go <<'EOF'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
go mod tidy >/dev/null 2>"$OUT/tidy-etcd.log" || { cat "$OUT/tidy-etcd.log" >&2; exit 1; }
log "etcd: compiling"
nice -n 10 go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .
mv "$BIN/etcd.tmp" "$BIN/etcd"

"$BIN/kube-apiserver" --version >&2
"$BIN/etcd" --version >&2
log "built in $(($(date +%s) - start)) s; $(du -sh "$BIN" | cut -f1) in $BIN"
echo "$BIN"
